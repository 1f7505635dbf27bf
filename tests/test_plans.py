"""Each parallel dimension alone and composed trains exactly like one process on the full batch
(DDP on 2 ranks included); DCP checkpoints reshard across plans.

Every run uses float64, so the only differences from the single-process reference are reduction
orders: losses and gathered parameters agree to 1e-9 after k optimizer steps (with clipping on).
"""

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.activation_checkpoint import clean_fqn
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, make_optimizer, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks
from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
from torch.distributed.tensor import DTensor

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.5)
STEPS, BATCH, SEQ = 3, 8, 16
TOL = 1e-9


def batches():
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, CFG.vocab_size, (STEPS * 2, BATCH, SEQ + 1), generator=g)
    return data[..., :-1], data[..., 1:]


def reference(steps: int = STEPS):
    torch.manual_seed(0)
    model = GPT(CFG).double()
    opt = make_optimizer(model.parameters(), OPTIM)
    inputs, targets = batches()
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = lm_loss(model(inputs[s]), targets[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def clean(name: str) -> str:
    """The unwrapped model's name: no DDP 'module.' prefix, no checkpoint-wrapper segment."""
    return clean_fqn(name.removeprefix("module."))


def full_params(modules) -> dict:
    out = {}
    for m in modules:
        for name, p in m.named_parameters():
            t = p.detach()
            out[clean(name)] = t.full_tensor() if isinstance(t, DTensor) else t.clone()
    return out


def setup(ctx, plan_kwargs):
    plan = ParallelPlan(**plan_kwargs)
    plan.validate(ctx.world_size, CFG, BATCH // plan.dp)
    torch.manual_seed(0)
    mesh = build_mesh(plan, "cpu")
    parts = parallelize(lambda: GPT(CFG).double(), plan, mesh, ctx.device, OPTIM, global_batch=BATCH,
                        spec=model_spec("gpt"))
    return plan, mesh, parts


def train_steps(parts, plan, mesh, start, stop):
    inputs, targets = batches()
    per = BATCH // plan.dp
    rows = slice(mesh.get_local_rank("dp") * per, (mesh.get_local_rank("dp") + 1) * per)
    return [parts.train_step(inputs[s, rows], targets[s, rows], OPTIM.lr) for s in range(start, stop)]


def plan_rank(ctx, plan_kwargs):
    plan, mesh, parts = setup(ctx, plan_kwargs)
    losses = train_steps(parts, plan, mesh, 0, STEPS)
    return losses, full_params(parts.modules)


def check_against_reference(results):
    ref_losses, ref_state = reference()
    merged = {}
    for losses, params in results:
        assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=TOL), losses
        merged.update(params)
    assert set(merged) == {k for k in ref_state if not k.startswith("rope_")}
    for name, value in merged.items():
        assert torch.allclose(value, ref_state[name], rtol=0, atol=TOL), name


PLANS = {
    "ddp_dp2": dict(dp=2),
    "tp2": dict(tp=2, engine="fsdp2"),
    "tp2_sp_lossparallel": dict(tp=2, engine="fsdp2", sequence_parallel=True, loss_parallel=True),
    "pp2_1f1b": dict(pp=2, microbatches=4, schedule="1F1B"),
    "fsdp2_dp2_ac_full": dict(dp=2, engine="fsdp2", activation_checkpointing="full"),
    "tp2xdp2": dict(dp=2, tp=2, engine="fsdp2", sequence_parallel=True),
    "tp2xpp2": dict(tp=2, pp=2, engine="fsdp2", microbatches=2, schedule="GPipe"),
    "pp2xdp2_fsdp2": dict(dp=2, pp=2, engine="fsdp2", microbatches=2, schedule="1F1B"),
    "pp2xdp2_interleaved_selective_ac": dict(dp=2, pp=2, engine="fsdp2", microbatches=2, virtual_stages=2,
                                             schedule="Interleaved1F1B", activation_checkpointing="selective"),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_plan_matches_single_process_reference(ray_cluster, tmp_path, name):
    kwargs = PLANS[name]
    world = ParallelPlan(**kwargs).world_size
    check_against_reference(run_ranks(plan_rank, world, kwargs, run_dir=tmp_path))


@pytest.mark.slow
def test_tp2_pp2_dp2_on_eight_ranks_matches_reference(ray_cluster, tmp_path):
    kwargs = dict(dp=2, tp=2, pp=2, engine="fsdp2", microbatches=2, schedule="1F1B", sequence_parallel=True)
    check_against_reference(run_ranks(plan_rank, 8, kwargs, run_dir=tmp_path))


def save_rank(ctx, plan_kwargs, ckpt_dir):
    plan, mesh, parts = setup(ctx, plan_kwargs)
    losses = train_steps(parts, plan, mesh, 0, STEPS)
    Checkpointer(ckpt_dir).save(STEPS, ModelOptimizer(parts.modules, parts.optimizers))
    return losses + train_steps(parts, plan, mesh, STEPS, 2 * STEPS)  # the uninterrupted continuation


def resume_rank(ctx, plan_kwargs, ckpt_dir):
    plan, mesh, parts = setup(ctx, plan_kwargs)
    meta = Checkpointer(ckpt_dir).load("latest", ModelOptimizer(parts.modules, parts.optimizers))
    return train_steps(parts, plan, mesh, meta["step"], 2 * STEPS)


@pytest.mark.parametrize("resume_plan", [dict(dp=4, engine="fsdp2"),
                                         dict(dp=2, pp=2, engine="fsdp2", microbatches=2)])
def test_checkpoint_saved_under_tp2xdp2_resumes_under_another_plan(ray_cluster, tmp_path, resume_plan):
    saved = run_ranks(save_rank, 4, dict(dp=2, tp=2, engine="fsdp2"), tmp_path / "ckpt", run_dir=tmp_path)
    resumed = run_ranks(resume_rank, 4, resume_plan, tmp_path / "ckpt", run_dir=tmp_path)
    continuation = torch.tensor(saved[0][STEPS:])
    for losses in resumed:
        assert torch.allclose(torch.tensor(losses), continuation, rtol=0, atol=TOL)
