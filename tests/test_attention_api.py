"""One attention API: start positions, keys/values in (a prefix) and out (a cache), a bottom-right causal mask.

Everything in float64, so a prefix + continuation, or token-by-token decoding, must reproduce the plain
forward's logits to rounding (1e-10), and SDPA's top-left ``is_causal`` on unequal lengths would not.
"""

import pytest
import torch
import torch.nn.functional as F
from plait.models.gpt import GPT, GPTConfig, KVCache, causal_attention

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
TOL = 1e-10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CFG).double().eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def close(a, b):
    return (a - b).abs().max().item() <= TOL


def test_prefix_in_cache_then_rest_equals_full_forward(model, tokens):
    full = model(tokens)
    cache = KVCache()
    head = model(tokens[:, :10], cache=cache)
    tail = model(tokens[:, 10:], cache=cache)  # 14 queries over 24 keys: the mask is aligned bottom-right
    assert close(torch.cat([head, tail], 1), full)
    assert cache.get_seq_length() == 24 and cache.keys[0].shape == (2, CFG.kv_heads, 24, CFG.head_dim)


def test_cached_keys_are_stored_after_rope(model, tokens):
    cache = KVCache()
    model(tokens[:, :5], cache=cache)
    x = model.layers["0"].attention_norm(model.tok_embeddings(tokens[:, :5]))
    raw = model.layers["0"].attention.wk(x).view(2, 5, -1, CFG.head_dim)
    cos, sin = model.rope(5)
    from plait.models.gpt import apply_rope

    assert close(cache.keys[0], apply_rope(raw, cos, sin).transpose(1, 2))
    assert not close(cache.keys[0][:, :, 1:], raw.transpose(1, 2)[:, :, 1:])  # position 0 is unrotated


def test_incremental_decoding_with_cache_equals_full_forward(model, tokens):
    full = model(tokens)
    cache = KVCache()
    steps = [model(tokens[:, :4], cache=cache)]
    for i in range(4, tokens.shape[1]):
        steps.append(model(tokens[:, i:i + 1], cache=cache))  # start_pos follows the cache's length
    assert close(torch.cat(steps, 1), full)


def test_prefix_given_as_cache_tensors_and_explicit_start_pos(model, tokens):
    full = model(tokens)
    source = KVCache()
    model(tokens[:, :9], cache=source)
    prefix = KVCache({i: (source.keys[i], source.values[i]) for i in source.keys})
    assert close(model(tokens[:, 9:], start_pos=9, cache=prefix), full[:, 9:])


def test_per_token_positions_equal_start_pos(model, tokens):
    by_start = model(tokens[:, :8], start_pos=20)
    assert close(model(tokens[:, :8], positions=torch.arange(20, 28)), by_start)
    per_row = torch.stack([torch.arange(20, 28), torch.arange(3, 11)])  # (batch, n): each row its own positions
    out = model(tokens[:, :8], positions=per_row)
    assert close(out[0], by_start[0]) and close(out[1], model(tokens[:, :8], start_pos=3)[1])
    # RoPE scores depend on position differences: a shift alone changes nothing, spacing the positions does
    assert close(by_start, model(tokens[:, :8]))
    assert not close(model(tokens[:, :8], positions=torch.arange(0, 16, 2)), by_start)


def test_bottom_right_mask_differs_from_sdpa_top_left_is_causal():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (3, 7, 7))
    # queries are the last 3 of 7 positions: row i sees keys 0..4+i
    full_q = torch.cat([torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64), q], 2)
    expected = F.scaled_dot_product_attention(full_q, k, v, is_causal=True)[:, :, 4:]
    assert close(causal_attention(q, k, v), expected)
    assert not close(F.scaled_dot_product_attention(q, k, v, is_causal=True), expected)


def test_parameter_names_unchanged_and_attend_replaceable(model, tokens):
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["tok_embeddings.weight", "layers.0.attention_norm.weight"]
    assert "layers.2.attention.wq.weight" in names and "output.weight" in names
    seen = []

    def recording(q, k, v):
        seen.append(k.shape[-2])
        return causal_attention(q, k, v)

    copy = GPT(CFG).double().eval()
    copy.load_state_dict(model.state_dict())
    copy.layers["1"].attention.attend = recording
    assert [n for n, _ in copy.named_parameters()] == names
    assert close(copy(tokens), model(tokens)) and seen == [tokens.shape[1]]


def test_a_hugging_face_dynamic_cache_works_too(model, tokens):
    from transformers import DynamicCache

    cache = DynamicCache()
    head = model(tokens[:, :11], cache=cache)
    tail = model(tokens[:, 11:], cache=cache)
    assert close(torch.cat([head, tail], 1), model(tokens))


def test_positions_past_max_seq_len_are_refused(model, tokens):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens, start_pos=CFG.max_seq_len - 4)
