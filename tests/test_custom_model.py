"""parallelize() trains a model of your own with your own loss: an MLP classifier (class-label targets)
under DDP, FSDP2 and DeepSpeed ZeRO-2 on 2 gloo ranks equals one process on the full batch.

float64 throughout, so DDP and FSDP2 differ from the reference only in reduction order: losses and
final parameters within 1e-9 after 3 AdamW steps with clipping on. ZeRO-2 runs the float64 model too
(DeepSpeed keeps the module's dtype without fp16/bf16), but its gradient norm is float32
(stage_1_and_2.get_grad_norm_direct), so the clipping coefficient carries float32 rounding: 1e-6 there
(seen: 1.2e-9 on the third loss).
DeepSpeed's first initialize JIT-compiles its CPU comm op (~60 s, cached in ~/.cache/plait/torch_extensions).
"""

import pytest
import torch
import torch.nn.functional as F
from plait.parallel.data_parallel import full_parameters
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, check_model, make_optimizer, parallelize
from plait.parallel.plan import ParallelPlan, PlanError
from plait.runtime import run_ranks
from torch import nn

FEATURES, HIDDEN, CLASSES = 8, 16, 4
STEPS, BATCH = 3, 8
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.5)
TOL = 1e-9
TOLERANCE = {"ddp": TOL, "fsdp2": TOL, "zero2": 1e-6}
ENGINES = ("ddp", "fsdp2", "zero2")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES)).double()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)  # (batch, classes) against (batch,): lm_loss would flatten wrongly


def batches():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(STEPS, BATCH, FEATURES, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return features, labels


def reference():
    model = mlp()
    opt = make_optimizer(model.parameters(), OPTIM)
    features, labels = batches()
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = classification_loss(model(features[s]), labels[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def train_each_engine(ctx):
    features, labels = batches()
    out = {}
    for engine in ENGINES:
        plan = ParallelPlan(dp=ctx.world_size, engine=engine)
        plan.validate(ctx.world_size, None, BATCH // plan.dp)  # no model config: a model of our own
        mesh = build_mesh(plan, "cpu")
        parts = parallelize(mlp, plan, mesh, ctx.device, OPTIM, global_batch=BATCH, loss_fn=classification_loss)
        rows = features.shape[1] // plan.dp
        mine = slice(mesh.get_local_rank("dp") * rows, (mesh.get_local_rank("dp") + 1) * rows)
        losses = [parts.train_step(features[s, mine], labels[s, mine], OPTIM.lr) for s in range(STEPS)]
        params = full_parameters(parts.engine if parts.engine is not None else parts.modules[0])
        out[engine] = losses, {name.removeprefix("module."): p for name, p in params.items()}
        if parts.engine is not None:
            parts.engine.destroy()
    return out


@pytest.mark.slow
def test_mlp_classifier_trains_like_one_process_under_ddp_fsdp2_and_zero2(ray_cluster, tmp_path):
    ref_losses, ref_params = reference()
    moved = max((ref_params[n] - p).abs().max().item() for n, p in mlp().named_parameters())
    assert moved > 1e3 * TOL  # a trained model is told apart from an untrained one
    for per_engine in run_ranks(train_each_engine, 2, run_dir=tmp_path):
        for engine in ENGINES:
            losses, params = per_engine[engine]
            tol = TOLERANCE[engine]
            assert losses == pytest.approx(ref_losses, abs=tol, rel=0), engine
            assert params.keys() == ref_params.keys(), engine
            for name, p in params.items():
                assert p.dtype == torch.float64, (engine, name)
                torch.testing.assert_close(p, ref_params[name], atol=tol, rtol=0, msg=f"{engine} {name}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=2, engine="fsdp2"), r"plan.tp=2: splitting a model over tp needs a tensor-parallel plan from its "
                                 r"family's spec .* Sequential \(no model spec given\) has none"),
    (dict(pp=2, microbatches=2), r"plan.pp=2: .*a pipeline stage cut .* use pp=1"),
    (dict(mixed_precision="bf16"), r"the model has torch.float64 parameters .* build it in float32"),
])
def test_what_a_custom_model_cannot_do_is_refused_by_name(kwargs, message):
    with pytest.raises(PlanError, match=message):
        check_model(mlp(), ParallelPlan(**kwargs))


def test_parallelize_refuses_tensor_parallelism_of_a_custom_model_before_it_touches_a_mesh():
    with pytest.raises(PlanError, match=r"plan.tp=2: .*use tp=1"):
        parallelize(mlp, ParallelPlan(tp=2, engine="fsdp2"), None, torch.device("cpu"), OPTIM,
                    loss_fn=classification_loss)
