"""mixed_precision="bf16" trains in bf16 under every plan: bf16 activations, float32 master parameters
(what the optimizer steps) and float32 gradients, and the loss still falls.

FSDP2 with dp > 1 casts through its MixedPrecisionPolicy (sharded float32 parameters, bf16 compute,
float32 gradients); DDP, tensor parallelism without FSDP (engine fsdp2 at dp=1 included), pipeline
stages and one rank run each part's forward under torch.autocast; DeepSpeed ZeRO-2 keeps bf16
working copies in the module and float32 masters in its optimizer. Activations are the outputs of
every nn.Linear, seen by forward hooks. Two worker groups: one rank, and two ranks running five plans
one after another (a fresh mesh per plan).
"""

import math

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks
from torch import nn
from torch.distributed.tensor import DTensor

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0)
BATCH, SEQ, STEPS = 4, 16, 3

ONE_RANK = {"one_rank": dict()}
TWO_RANKS = {
    "ddp_dp2_checkpointed": dict(dp=2, activation_checkpointing="full"),
    "tp2": dict(tp=2),
    "fsdp2_engine_tp2_dp1_loss_parallel": dict(tp=2, engine="fsdp2", sequence_parallel=True, loss_parallel=True),
    "pp2_1f1b": dict(pp=2, schedule="1F1B", microbatches=2),
    "fsdp2_dp2": dict(dp=2, engine="fsdp2"),
    "zero2_dp2": dict(dp=2, engine="zero2"),
}


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _dtypes(tensors) -> list[str]:
    return sorted({str(_local(t).dtype).removeprefix("torch.") for t in tensors})


def train_and_record(ctx, plans: dict) -> dict:
    """Per plan: dtypes of Linear outputs, of what the optimizer steps and of the gradients; the losses
    of STEPS steps on one fixed batch (so they must fall)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)
    out = {}
    for name, kwargs in plans.items():
        plan = ParallelPlan(mixed_precision="bf16", **kwargs)
        plan.validate(ctx.world_size, CFG, BATCH // plan.dp, model_dtype=torch.float32)
        torch.manual_seed(0)
        mesh = build_mesh(plan, "cpu")
        parts = parallelize(lambda: GPT(CFG), plan, mesh, ctx.device, OPTIM, global_batch=BATCH, spec=model_spec("gpt"))
        activations: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _args, y, seen=activations: seen.append(y.detach()))
                 for part in parts.modules for m in part.modules() if isinstance(m, nn.Linear)]
        rows = BATCH // plan.dp
        mine = tokens[mesh.get_local_rank("dp") * rows:(mesh.get_local_rank("dp") + 1) * rows]
        losses = [parts.train_step(mine[:, :-1], mine[:, 1:], OPTIM.lr) for _ in range(STEPS)]
        params = [p for part in parts.modules for p in part.parameters()]
        if parts.engine is not None:  # DeepSpeed: bf16 working copies in the module, fp32 masters it steps
            stepped = parts.engine.optimizer.single_partition_of_fp32_groups
        else:
            stepped = [p for opt in parts.optimizers for group in opt.param_groups for p in group["params"]]
        out[name] = {"activations": _dtypes(activations), "stepped": _dtypes(stepped),
                     "module_params": _dtypes(params), "grads": _dtypes(p.grad for p in params if p.grad is not None),
                     "hooked": len(hooks), "losses": losses}
        for h in hooks:
            h.remove()
        if parts.engine is not None:
            parts.engine.destroy()
    return out


def check(records: dict, name: str) -> None:
    r = records[name]
    assert r["hooked"] > 0, name
    assert r["activations"] == ["bfloat16"], (name, r)
    assert r["stepped"] == ["float32"], (name, r)
    losses = r["losses"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (name, losses)
    if name.startswith("zero"):
        assert r["module_params"] == ["bfloat16"], (name, r)  # DeepSpeed's bf16 mode, as documented
    else:
        assert r["module_params"] == ["float32"], (name, r)
        assert r["grads"] == ["float32"], (name, r)


def test_bf16_on_one_rank_computes_in_bf16_from_fp32_parameters(ray_cluster, tmp_path):
    (records,) = run_ranks(train_and_record, 1, ONE_RANK, run_dir=tmp_path)
    check(records, "one_rank")


@pytest.mark.slow
def test_bf16_under_ddp_tp_pipeline_fsdp2_and_zero2_computes_in_bf16_from_fp32_parameters(ray_cluster, tmp_path):
    for records in run_ranks(train_and_record, 2, TWO_RANKS, run_dir=tmp_path):
        for name in TWO_RANKS:
            check(records, name)


def test_rope_tables_stay_float32_when_the_model_is_cast():
    fp32 = GPT(CFG)
    for dtype in (torch.bfloat16, torch.float64):
        cast = GPT(CFG).to(dtype)
        assert cast.rope_cos.dtype == cast.rope_sin.dtype == torch.float32, dtype
        assert torch.equal(cast.rope_cos, fp32.rope_cos) and torch.equal(cast.rope_sin, fp32.rope_sin), dtype
    assert next(cast.parameters()).dtype == torch.float64


def test_bf16_queries_are_rotated_by_fp32_angles():
    from plait.models.gpt import apply_rope

    model = GPT(CFG)
    q = torch.randn(2, SEQ, CFG.n_heads, CFG.head_dim).bfloat16()
    cos, sin = model.rope_cos[:SEQ], model.rope_sin[:SEQ]
    rotated = apply_rope(q, cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, apply_rope(q.float(), cos, sin).bfloat16())  # rounded once, at the end
