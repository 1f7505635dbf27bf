"""Qwen3-MoE (transformers' ``Qwen3MoeForCausalLM``, used as it is): Qwen3's attention (q/k norms), MoE blocks.

    spec = model_spec("qwen3_moe")      # also by config.model_type "qwen3_moe"

Per block ``mlp.gate`` (``Qwen3MoeTopKRouter``: softmax over the experts, top-k, renormalised only with
``norm_topk_prob``) and ``mlp.experts`` (``Qwen3MoeExperts``, ``moe_intermediate_size`` wide); a layer in
``mlp_only_layers``, or not a multiple of ``decoder_sparse_step``, has a dense ``Qwen3MoeMLP`` instead (no experts
there: expert parallelism leaves it whole). Loss: cross-entropy + ``router_aux_loss_coef`` x HF's load-balancing
loss (models/hf/experts.py); no router z-loss in Qwen3-MoE.

Weights: ``save_pretrained`` writes per-expert tensors ``mlp.experts.<e>.{gate,up,down}_proj.weight``; each rank
reads only its experts', export writes them back.
"""

from __future__ import annotations

from plait.models.hf.experts import build_moe, moe_decoder_tp_plan, moe_shape, stacked_expert_names
from plait.models.hf.family import hf_spec
from plait.models.hf.weights import WeightRef
from plait.models.llama import shard_decoder
from plait.models.spec import register
from torch import nn

EXPERTS = ("mlp.experts",)
ROUTERS = ("mlp.gate",)


def qwen3_moe_weight_names(module: nn.Module) -> dict[str, WeightRef]:
    """Model name -> checkpoint tensor: the same names, stacked experts per-expert gate/up/down projections."""
    return stacked_expert_names(module, lambda name: name, "gate_proj.weight", "up_proj.weight",
                                "down_proj.weight")


def qwen3_moe_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False) -> tuple[dict, dict]:
    return moe_decoder_tp_plan(sequence_parallel, loss_parallel, head_norms=True)


def parallelize_qwen3_moe(model: nn.Module, mesh, sp: bool, lp: bool) -> None:
    shard_decoder(model, mesh, sp, lp, qwen3_moe_tp_plan(sp, lp))


SPEC = register(hf_spec(
    "qwen3_moe", ("qwen3_moe",), build=build_moe, shape=lambda cfg: moe_shape(cfg, "qwen3_moe"), cut_stage=None,
    tensor_parallel=parallelize_qwen3_moe, tp_plan=qwen3_moe_tp_plan, weight_names=qwen3_moe_weight_names,
    kv_projections=("self_attn.k_proj", "self_attn.v_proj"), experts=EXPERTS, routers=ROUTERS))
