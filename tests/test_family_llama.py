"""The Llama family (models/llama.py) under every plan, through the checks every family passes (family_checks.py)."""

import pytest
from family_checks import run_family_checks


def tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                       attn_implementation="sdpa", tie_word_embeddings=False)


@pytest.mark.slow
def test_llama_under_tp_pp_fsdp_cp_seco_and_a_folder_round_trip(ray_cluster, tmp_path):
    run_family_checks(tiny_llama, tmp_path)
