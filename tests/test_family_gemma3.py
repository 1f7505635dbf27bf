"""Gemma-3 text (models/gemma3.py): four norms a layer, scaled embeddings, q/k norms, a sliding-window layer and
final logit soft-capping, under every plan (family_checks.py)."""

import pytest
import torch
from family_checks import build, run_family_checks, tokens


def tiny_gemma3():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                            query_pre_attn_scalar=16, final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, attn_implementation="sdpa", tie_word_embeddings=True)


def test_the_tiny_gemma3_uses_its_window_and_soft_cap():
    """The checks below would pass vacuously if the window or the cap did nothing: they change the logits."""
    model, _, cfg = build(tiny_gemma3)
    x, _ = tokens(128)
    logits = model(input_ids=x).logits
    assert logits.abs().max() < 3.0  # soft-capped
    model.config.sliding_window = 64
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 64 if layer.self_attn.sliding_window else None
    assert not torch.allclose(model(input_ids=x).logits, logits)


@pytest.mark.slow
def test_gemma3_under_tp_pp_fsdp_cp_seco_and_a_folder_round_trip(ray_cluster, tmp_path):
    # Gemma's RMSNorm computes in float32 even for a float64 model, twice as many norms a layer as Llama's, and the
    # embedding's gradient comes scaled by sqrt(hidden) = 8: its float64 gradients agree to ~2e-8, not 1e-8.
    run_family_checks(tiny_gemma3, tmp_path, grad_tol=1e-7)
