"""Gradient clipping over a parallel plan: the global norm is the single process's, it costs at most one
all-reduce per mesh dimension (not one per parameter), and the scaling reaches every shard.

float64, so the norm of the sharded gradient equals the full gradient's norm to 1e-12. Collectives
are counted with torch.profiler around one clip_grad_norm call: every ``gloo:*`` event is a collective
gloo really ran (DTensor's functional collectives included).
"""

from collections import Counter

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, clip_grad_norm, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=1e6)  # clipping on; the coefficient stays 1
BATCH, SEQ = 4, 16
TOL = 1e-12
TWO_RANKS = {
    "tp2": dict(tp=2, engine="fsdp2"),
    "fsdp2_dp2": dict(dp=2, engine="fsdp2"),
    "pp2": dict(pp=2, schedule="1F1B", microbatches=2),
    "ddp_dp2": dict(dp=2),
}
FOUR_RANKS = {"tp2xdp2_fsdp2": dict(dp=2, tp=2, engine="fsdp2", sequence_parallel=True)}


def batch():
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(9))
    return tokens[:, :-1], tokens[:, 1:]


def full_gradient_norm() -> float:
    torch.manual_seed(0)
    model = GPT(CFG).double()
    inputs, targets = batch()
    lm_loss(model(inputs), targets).backward()
    return torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()


def gloo_collectives(fn, *args) -> tuple[object, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn(*args)
    return result, sum(k for name, k in Counter(e.name for e in prof.events()).items() if name.startswith("gloo:"))


def clip_each_plan(ctx, plans: dict) -> dict:
    inputs, targets = batch()
    out = {}
    for name, kwargs in plans.items():
        plan = ParallelPlan(**kwargs)
        torch.manual_seed(0)
        mesh = build_mesh(plan, "cpu")
        parts = parallelize(lambda: GPT(CFG).double(), plan, mesh, ctx.device, OPTIM, spec=model_spec("gpt"))
        rows = BATCH // plan.dp
        mine = slice(mesh.get_local_rank("dp") * rows, (mesh.get_local_rank("dp") + 1) * rows)
        parts.train_step(inputs[mine], targets[mine], OPTIM.lr)  # grads stay after the step
        step_norm = parts.grad_norm.item()
        norm, collectives = gloo_collectives(clip_grad_norm, parts.modules, step_norm / 2, mesh)
        halved = clip_grad_norm(parts.modules, 1e9, mesh).item()  # after scaling by ~1/2 everywhere
        out[name] = {"step_norm": step_norm, "norm": norm.item(), "dtype": str(norm.dtype), "halved": halved,
                     "collectives": collectives, "dims": sum(mesh[d].size() > 1 for d in mesh.mesh_dim_names)}
    return out


def check(records: dict, reference: float) -> None:
    for name, r in records.items():
        assert r["step_norm"] == pytest.approx(reference, abs=TOL, rel=0), name
        assert r["norm"] == pytest.approx(reference, abs=TOL, rel=0), name
        assert r["dtype"] == "torch.float64", name
        assert r["halved"] == pytest.approx(reference / 2, rel=1e-5), name  # every shard was scaled
        assert r["collectives"] <= r["dims"], (name, r)


@pytest.mark.slow
def test_clip_on_two_ranks_is_the_full_norm_with_one_all_reduce_per_mesh_dim(ray_cluster, tmp_path):
    reference = full_gradient_norm()
    for records in run_ranks(clip_each_plan, 2, TWO_RANKS, run_dir=tmp_path):
        check(records, reference)
        assert records["tp2"]["collectives"] == 1  # not one per parameter (29 DTensor all-reduces before)
        assert records["ddp_dp2"]["collectives"] == 0  # DDP's gradients are complete replicas


@pytest.mark.slow
def test_clip_on_tp2_x_dp2_is_the_full_norm_with_two_all_reduces(ray_cluster, tmp_path):
    reference = full_gradient_norm()
    for records in run_ranks(clip_each_plan, 4, FOUR_RANKS, run_dir=tmp_path):
        check(records, reference)
        assert records["tp2xdp2_fsdp2"]["collectives"] == 2
