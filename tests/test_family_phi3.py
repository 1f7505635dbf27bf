"""Phi-3 (models/phi3.py): fused qkv_proj and gate_up_proj sharded by their parts, under every plan
(family_checks.py), and the split model equal to transformers' own Phi3ForCausalLM."""

import pytest
import torch
from family_checks import build, run_family_checks, tokens


def tiny_phi3():
    from transformers import Phi3Config

    return Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation="sdpa", tie_word_embeddings=False)


def test_the_split_model_is_transformers_phi3_with_each_fused_projection_as_its_parts(tmp_path):
    from plait.models.hf.export import export_hf_folder
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM

    model, spec, cfg = build(tiny_phi3)
    attn = model.model.layers[0].self_attn
    assert [n for n, _ in attn.qkv_proj.named_children()] == ["q", "k", "v"]
    assert (attn.qkv_proj.q.out_features, attn.qkv_proj.k.out_features) == (64, 32)  # 4 heads, 2 kv heads of 16
    export_hf_folder(model, tmp_path / "hf", cfg, spec=spec)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    assert type(native) is Phi3ForCausalLM and "model.layers.0.self_attn.qkv_proj.weight" in native.state_dict()
    x, _ = tokens(128)
    assert torch.allclose(native(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_phi3_under_tp_pp_fsdp_cp_seco_and_a_folder_round_trip(ray_cluster, tmp_path):
    run_family_checks(tiny_phi3, tmp_path)
