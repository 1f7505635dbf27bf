"""Context parallelism (cp) as a dimension of Plait's plans: the layout, the GPT under ring attention,
and cp composed with FSDP2, DDP, tensor parallelism, clipping and checkpoints.

float64 throughout, so the single-process reference on the full sequence is matched to 1e-9: the only
differences are reduction orders (log-sum-exp merges, gradient averages over dp x cp).
"""

import pytest
import torch
import torch.distributed as dist
from plait.models import estimate_for, model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.context_parallel import apply_context_parallel, shard_batch
from plait.parallel.mesh import MESH_DIMS, Layout, build_mesh, coordinates, data_mesh, rank_grid
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks
from test_clip import clip_each_plan
from test_clip import full_gradient_norm as clip_reference_norm
from test_plans import STEPS, TOL, check_against_reference, plan_rank, resume_rank, save_rank

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)  # GQA 4:2
BATCH, SEQ = 2, 32


def test_layout_is_dp_pp_cp_tp_with_tp_innermost():
    plan = ParallelPlan(dp=2, cp=2, tp=2, engine="fsdp2")
    assert MESH_DIMS == ("dp", "pp", "cp", "tp") and plan.world_size == 8
    assert torch.equal(rank_grid(plan), torch.arange(8).view(2, 1, 2, 2))
    layout = Layout.of(plan)
    assert layout.coordinates(5) == {"dp": 1, "pp": 0, "cp": 0, "tp": 1}
    assert [layout.rank(**layout.coordinates(r)) for r in range(8)] == list(range(8))
    assert layout.dp_cp == 4 and plan.describe() == "dp2(fsdp2) cp2 tp2 pp1"


def test_estimate_splits_tokens_over_cp_and_shards_over_dp_x_cp():
    one = estimate_for(CFG, ParallelPlan(engine="fsdp2"), global_batch=BATCH, seq_len=SEQ)[0]
    rows = estimate_for(CFG, ParallelPlan(cp=2, engine="fsdp2"), global_batch=BATCH, seq_len=SEQ)
    assert [r.cp for r in rows] == [0, 1]
    assert sum(r.params for r in rows) == one.params  # FSDP2 over the 2 cp ranks: each holds half
    rope_tables = BATCH * SEQ // 2 * CFG.head_dim * 4  # gathered at the zigzag positions (cp > 1 only)
    assert rows[0].activations - rope_tables == pytest.approx(one.activations / 2, abs=8)


def reference_loss_and_grads():
    torch.manual_seed(0)
    model = GPT(CFG).double()
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, tokens


def cp_loss_and_grads(cp_mesh):
    """This cp rank's piece through a ring-attention GPT; loss and gradients averaged over the cp group."""
    _, _, tokens = reference_loss_and_grads()
    torch.manual_seed(0)
    model = apply_context_parallel(GPT(CFG).double(), cp_mesh, model_spec("gpt").attention)
    inputs, targets = shard_batch(tokens[:, :-1], tokens[:, 1:], cp_mesh.get_local_rank(), cp_mesh.size())
    loss = lm_loss(model(inputs), targets)
    loss.backward()
    values = [loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in model.parameters()]
    flat = torch.cat(values)
    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=cp_mesh.get_group())
    grads, at = {}, 1
    for name, p in model.named_parameters():
        grads[name] = flat[at:at + p.numel()].view_as(p)
        at += p.numel()
    return flat[0].item(), grads


def cp2_and_cp4_rank(ctx):
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    cp4 = init_device_mesh("cpu", (4,), mesh_dim_names=("cp",))["cp"]
    mesh = build_mesh(ParallelPlan(dp=2, cp=2, engine="fsdp2"), "cpu")
    return {"cp4": cp_loss_and_grads(cp4), "cp2": cp_loss_and_grads(mesh["cp"]),
            "coords": coordinates(mesh), "dp_cp": data_mesh(mesh).mesh.tolist()}


def test_cp2_and_cp4_loss_and_gradients_equal_the_full_sequence(ray_cluster, tmp_path):
    ref_loss, ref_grads, _ = reference_loss_and_grads()
    results = run_ranks(cp2_and_cp4_rank, 4, run_dir=tmp_path)
    for rank, out in enumerate(results):
        assert out["coords"] == {"dp": rank // 2, "pp": 0, "cp": rank % 2, "tp": 0}
        assert out["dp_cp"] == [0, 1, 2, 3]
        for key in ("cp2", "cp4"):
            loss, grads = out[key]
            assert loss == pytest.approx(ref_loss, abs=TOL, rel=0), key
            for name, g in ref_grads.items():
                assert torch.allclose(grads[name], g, rtol=0, atol=TOL), (key, name)


def test_cp2_plans_on_two_ranks_train_like_one_process(ray_cluster, tmp_path):
    """3 AdamW steps with clipping active (test_plans' reference): FSDP2 sharded over cp, DDP over cp."""
    for kwargs in (dict(cp=2, engine="fsdp2"), dict(cp=2, engine="ddp")):
        check_against_reference(run_ranks(plan_rank, 2, kwargs, run_dir=tmp_path))


@pytest.mark.parametrize("kwargs", [
    dict(dp=2, cp=2, engine="fsdp2", activation_checkpointing="full"),
    dict(cp=2, tp=2, engine="fsdp2", sequence_parallel=True, loss_parallel=True),
], ids=["cp2xdp2_fsdp2_ac", "cp2xtp2_sp_lossparallel"])
def test_cp2_composed_on_four_ranks_trains_like_one_process(ray_cluster, tmp_path, kwargs):
    check_against_reference(run_ranks(plan_rank, 4, kwargs, run_dir=tmp_path))


def test_clip_under_cp_is_the_full_norm_with_one_all_reduce_per_sharded_dim(ray_cluster, tmp_path):
    reference = clip_reference_norm()
    plans = {"cp2_fsdp2": dict(cp=2, engine="fsdp2"), "cp2_ddp": dict(cp=2)}
    for records in run_ranks(clip_each_plan, 2, plans, run_dir=tmp_path):
        for name, r in records.items():
            assert r["step_norm"] == pytest.approx(reference, abs=1e-12, rel=0), name
            assert r["norm"] == pytest.approx(reference, abs=1e-12, rel=0), name
            assert r["halved"] == pytest.approx(reference / 2, rel=1e-5), name
        assert records["cp2_fsdp2"]["collectives"] == 1  # shards over cp: one all-reduce over cp
        assert records["cp2_ddp"]["collectives"] == 0  # DDP's gradients are complete replicas over cp


def test_checkpoint_saved_under_cp2_resumes_under_cp1(ray_cluster, tmp_path):
    saved = run_ranks(save_rank, 2, dict(cp=2, engine="fsdp2"), tmp_path / "ckpt", run_dir=tmp_path)
    resumed = run_ranks(resume_rank, 2, dict(dp=2, engine="fsdp2"), tmp_path / "ckpt", run_dir=tmp_path)
    continuation = torch.tensor(saved[0][STEPS:])
    for losses in resumed:
        assert torch.allclose(torch.tensor(losses), continuation, rtol=0, atol=TOL)


@pytest.mark.slow
def test_cp2_dp2_example_trains_through_the_job(ray_cluster, tmp_path):
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    summary = run_job(load_spec("examples/gpt_cp2_dp2.toml", [
        "train.steps=3", "train.checkpoint_every=0", f"run_dir={tmp_path / 'run'}", "data.source=synthetic",
        "data.num_tokens=40000", f"data.path={tmp_path / 'data'}", "model.d_model=64",
    ]))
    assert summary["plan"] == "dp2(fsdp2) cp2 tp1 pp1" and summary["last_loss"] < summary["first_loss"]
