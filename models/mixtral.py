"""Mixtral (transformers' ``MixtralForCausalLM``, used as it is): Llama's attention, a sparse MoE block per layer.

    spec = model_spec("mixtral")        # also by config.model_type "mixtral"

Per block ``mlp.gate`` (``MixtralTopKRouter``: softmax over the experts, top-k, renormalised) and ``mlp.experts``
(``MixtralExperts``: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``), the experts module expert parallelism
shards on dim 0 (``experts``). Loss: cross-entropy + ``router_aux_loss_coef`` x HF's load-balancing loss (Switch
form over all layers' router logits at once, models/hf/experts.py); Mixtral has no router z-loss.

Weights: transformers 5.23's ``save_pretrained`` writes Mixtral's original per-expert layout,
``model.layers.<i>.block_sparse_moe.experts.<e>.{w1,w2,w3}.weight`` (w1 gate, w3 up, w2 down) and
``block_sparse_moe.gate.weight``; each rank reads only its experts' tensors (and, of those, its rows) and export
writes the same layout back, so ``from_pretrained`` reads it equal.
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


def mixtral_weight_names(module: nn.Module) -> dict[str, WeightRef]:
    """Model name -> checkpoint tensor: ``mlp.`` is ``block_sparse_moe.``; stacked experts are per-expert w1/w3/w2."""
    return stacked_expert_names(module, lambda name: name.replace(".mlp.", ".block_sparse_moe."),
                                "w1.weight", "w3.weight", "w2.weight")


def parallelize_mixtral(model: nn.Module, mesh, sp: bool, lp: bool) -> None:
    shard_decoder(model, mesh, sp, lp, moe_decoder_tp_plan(sp, lp))


SPEC = register(hf_spec(
    "mixtral", ("mixtral",), build=build_moe, shape=lambda cfg: moe_shape(cfg, "mixtral"), cut_stage=None,
    tensor_parallel=parallelize_mixtral, tp_plan=moe_decoder_tp_plan, weight_names=mixtral_weight_names,
    kv_projections=("self_attn.k_proj", "self_attn.v_proj"), experts=EXPERTS, routers=ROUTERS))
