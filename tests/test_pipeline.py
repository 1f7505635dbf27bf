"""Pipeline parallelism (plait.parallel.pipeline): every torch schedule on pp=2 matches one process.

One worker group of 2 gloo ranks runs all cases (a group costs ~6 s to start); each rank trains a
single-process reference GPT itself and compares its own stages' parameters by FQN, which the stage
cut keeps stable. Tolerance: float32, atol 1e-5 on losses and parameters after K=2 optimizer steps.
SGD catches a wrong gradient scale (AdamW is nearly scale-invariant); AdamW checks the rest.
"""

from __future__ import annotations

import math

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.pipeline import (
    SCHEDULES,
    build_pipeline,
    check_schedule,
    layer_ranges,
    schedule_name,
    stage_ids,
)
from plait.runtime import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

GPT_SPEC = model_spec("gpt")

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16)
BATCH, SEQ, MICROBATCHES, STEPS, ATOL = 8, 8, 4, 2, 1e-5
VIRTUAL = {name: 1 if per_rank == 1 else 2 for name, (_, per_rank) in SCHEDULES.items()}
CASES = [(name, opt) for name in SCHEDULES for opt in ("sgd", "adamw")]


def _batches():
    g = torch.Generator().manual_seed(1234)
    return [(torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g),
             torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)) for _ in range(STEPS)]


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _new_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def _reference(kind: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _new_gpt()
    opt = _optimizer(kind, model.parameters())
    losses = []
    for x, y in _batches():
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(pp_mesh, name: str, kind: str) -> dict:
    pipe = build_pipeline(_new_gpt, pp_mesh, GPT_SPEC, schedule=name, microbatches=MICROBATCHES,
                          virtual_stages=VIRTUAL[name], loss_fn=lm_loss, device="cpu")
    opt = _optimizer(kind, pipe.parameters())
    losses = []
    for x, y in _batches():
        loss = pipe.step(x, y)
        opt.step()
        losses.append(None if loss is None else loss.item())
    ref_losses, ref_params = _reference(kind)
    params, initial = pipe.named_parameters(), dict(_new_gpt().named_parameters())
    return {
        "names": sorted(params),
        "stage_ids": [s.stage_index for s in pipe.stages],
        "loss_err": None if losses[0] is None else max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_err": max((p.detach() - ref_params[n]).abs().max().item() for n, p in params.items()),
        "moved": max((p.detach() - initial[n]).abs().max().item() for n, p in params.items()),
    }


def run_all_cases(ctx) -> dict:
    """Rank function: every (schedule, optimizer) case, then the sliced-mesh, meta and error cases."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    out = {case: _train(mesh, *case) for case in CASES}
    # pp as a slice of a (dp, pp, tp) = (1, 2, 1) mesh, the way parallelize() passes mesh["pp"].
    mesh3 = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("dp", "pp", "tp"))
    out["sliced"] = _train(mesh3["pp"], "1F1B", "sgd")
    # A factory on the meta device: stages are materialised on the real device and init_weights() fills them.
    def meta_gpt():
        with torch.device("meta"):
            return GPT(CFG)
    pipe = build_pipeline(meta_gpt, mesh, GPT_SPEC, schedule="ZBVZeroBubble", microbatches=MICROBATCHES,
                          virtual_stages=2, loss_fn=lm_loss, device="cpu")
    x, y = _batches()[0]
    loss = pipe.step(x, y)
    out["meta"] = {"loss": None if loss is None else loss.item(),
                   "on_cpu": all(p.device.type == "cpu" for p in pipe.parameters())}
    # A batch that does not split into equal microbatches is refused before any communication.
    pipe = build_pipeline(_new_gpt, mesh, GPT_SPEC, schedule="GPipe", microbatches=3, loss_fn=lm_loss, device="cpu")
    try:
        pipe.step(x, y)
        out["uneven"] = ""
    except ValueError as e:
        out["uneven"] = str(e)
    return out


@pytest.fixture(scope="module")
def results(ray_cluster, tmp_path_factory):
    return run_ranks(run_all_cases, 2, run_dir=tmp_path_factory.mktemp("pipeline"))


@pytest.mark.parametrize("name,kind", CASES)
def test_schedule_matches_single_process(results, name, kind):
    per_rank = [r[(name, kind)] for r in results]
    # FQNs are the unsplit model's; the ranks' parameters are disjoint and cover the whole model.
    names = [n for r in per_rank for n in r["names"]]
    assert sorted(names) == sorted(n for n, _ in _new_gpt().named_parameters())
    expected = [stage_ids(rank, 2, VIRTUAL[name], SCHEDULES[name][0]) for rank in range(2)]
    assert [r["stage_ids"] for r in per_rank] == expected
    # Exactly the rank holding the last stage reports the loss (rank 0 under V placement).
    last_rank = 0 if SCHEDULES[name][0] == "v" else 1
    assert [r["loss_err"] is not None for r in per_rank] == [rank == last_rank for rank in range(2)]
    assert per_rank[last_rank]["loss_err"] < ATOL
    for rank, r in enumerate(per_rank):
        assert r["moved"] > 1e-3, f"rank {rank}: parameters did not train"
        assert r["param_err"] < ATOL, f"rank {rank}: parameters differ from the reference by {r['param_err']:.2e}"


def test_sliced_mesh_meta_init_and_uneven_batch(results):
    assert results[1]["sliced"]["loss_err"] < ATOL
    assert all(r["sliced"]["param_err"] < ATOL for r in results)
    assert results[0]["meta"]["on_cpu"] and results[1]["meta"]["on_cpu"]
    assert math.isfinite(results[0]["meta"]["loss"]) and results[1]["meta"]["loss"] is None
    for r in results:
        assert "does not split into 3 equal microbatches" in r["uneven"]


# ---- single-process checks: placement, layer ranges, and the error messages ----

@pytest.mark.parametrize("pp,v,style", [(2, 1, "loop"), (2, 2, "loop"), (4, 3, "loop"), (2, 2, "v"), (4, 2, "v")])
def test_stage_ids_agree_with_torch(pp, v, style):
    torch_map = generate_stage_to_rank_mapping(pp, pp * v, style=style)
    for rank in range(pp):
        assert stage_ids(rank, pp, v, style) == sorted(s for s, r in torch_map.items() if r == rank)


def test_stage_ids_from_schedule_name():
    assert stage_ids(0, 2, 2, "ZBVZeroBubble") == [0, 3]
    assert stage_ids(1, 2, 2, "interleaved1f1b") == [1, 3]
    with pytest.raises(ValueError, match="exactly 2 stages per rank"):
        stage_ids(0, 2, 3, "v")


def test_layer_ranges():
    assert layer_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layer_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="n_layers=3 cannot fill 4 pipeline stages"):
        layer_ranges(3, 4)


def test_every_torch_schedule_is_selectable():
    from torch.distributed.pipelining.schedules import get_schedule_class

    for name in SCHEDULES:
        assert get_schedule_class(name).__name__.lower().endswith(name.lower())
    assert schedule_name("dualpipev") == "DualPipeV"


@pytest.mark.parametrize("args,match", [
    (("Chimera", 2, 1, 4), "unknown pipeline schedule 'Chimera'; valid schedules: GPipe, 1F1B, Interleaved1F1B"),
    (("PipelineScheduleMulti", 2, 2, 4), "unknown pipeline schedule"),
    (("GPipe", 2, 2, 4), "GPipe runs exactly one stage per rank, not virtual_stages=2"),
    (("1F1B", 2, 2, 4), "1F1B runs exactly one stage per rank"),
    (("ZBVZeroBubble", 2, 1, 4), "exactly 2 stages per rank in a V: set virtual_stages=2, not 1"),
    (("DualPipeV", 2, 3, 8), "exactly 2 stages per rank"),
    (("1F1B", 4, 1, 3), r"1F1B needs microbatches >= stages \(4\)"),
    (("DualPipeV", 2, 2, 3), r"DualPipeV needs microbatches >= stages \(2\*pp = 4\)"),
    (("Interleaved1F1B", 2, 2, 5), "microbatches=5 must be below pp or a multiple of the 2 rounds"),
    (("InterleavedZeroBubble", 4, 2, 9), "multiple of the 2 rounds it makes; try 8"),
    (("LoopedBFS", 2, 0, 4), "must be >= 1"),
])
def test_schedule_errors(args, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(*args)


@pytest.mark.parametrize("args", [("GPipe", 2, 1, 1), ("1F1B", 2, 1, 2), ("Interleaved1F1B", 4, 2, 6),
                                  ("LoopedBFS", 2, 3, 5), ("ZBVZeroBubble", 2, 2, 1), ("DualPipeV", 2, 2, 4)])
def test_schedule_accepts(args):
    assert check_schedule(*args) == args[0]
