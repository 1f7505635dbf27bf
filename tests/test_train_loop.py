"""The one training loop (runtime/trainer.py) as every job drives it: resume, cadence, a stop, faults."""

import json

import pytest
import torch
from plait.runtime.checkpoint import ModelOptimizer
from plait.runtime.context import RankContext, StopFlag
from plait.runtime.faults import parse_faults
from plait.runtime.trainer import LoopConfig, TrainLoop


def context(run_dir, resume_from=None, stop=None) -> RankContext:
    return RankContext(rank=0, world_size=1, local_rank=0, local_world_size=1, node_ip="127.0.0.1",
                       device=torch.device("cpu"), backend="gloo", run_dir=run_dir, run_id="r1",
                       resume_from=resume_from, stop=stop)


def run(ctx, total: int, every: int = 0, stop_after: int = 0, reschedule: bool = False, boundary: int = 1):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = TrainLoop(ctx, LoopConfig(checkpoint_every=every, keep_last=5, reschedule=reschedule), total=total,
                     state=ModelOptimizer([model], [opt]), meta=lambda done: {"position": done}, boundary=boundary)
    for step in loop:
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        loop.step_done(loss=float(step))
        if stop_after and loop.done == stop_after:
            ctx.stop.set("SIGTERM")
    return loop.finish()


def test_checkpoints_follow_the_cadence_and_a_resume_starts_at_the_checkpoint(tmp_path):
    result = run(context(tmp_path), total=5, every=2)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_00000002", "step_00000004", "step_00000005"] and result.steps == 5
    meta = json.loads((tmp_path / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["total_steps"] == 5 and meta["position"] == 4  # the job's position beside the loop's total
    again = run(context(tmp_path, resume_from=tmp_path / "checkpoints" / "step_00000004"), total=5, every=2)
    assert again.start_step == 4 and again.losses == [4.0]  # only the step after the checkpoint ran
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # each step once: the resumed run's line won


def test_a_stop_request_commits_a_checkpoint_at_the_next_boundary_and_ends(tmp_path):
    result = run(context(tmp_path, stop=StopFlag()), total=12, every=0, stop_after=5, boundary=3)
    assert result.stopped and result.steps == 6  # asked after step 5: epoch-like boundaries of 3 steps
    assert (tmp_path / "checkpoints" / "step_00000006" / "meta.json").is_file()


def test_resuming_with_another_total_is_refused_unless_rescheduled(tmp_path):
    run(context(tmp_path), total=4)
    checkpoint = tmp_path / "checkpoints" / "step_00000004"
    with pytest.raises(ValueError, match="train.steps=8 but the checkpoint belongs to a run of 4"):
        run(context(tmp_path, resume_from=checkpoint), total=8)
    assert run(context(tmp_path, resume_from=checkpoint), total=8, reschedule=True).steps == 8


def test_faults_are_parsed_with_their_point_facts_and_arguments():
    (exit_, sleep) = parse_faults("exit@step=4,rank=1,attempt=0; sleep@step,seconds=0.5")
    assert (exit_.action, exit_.point, exit_.at, exit_.where) == ("exit", "step", 4, {"rank": 1, "attempt": 0})
    assert exit_.matches("step", 4, {"rank": 1, "attempt": 0}) and not exit_.matches("step", 4, {"rank": 0})
    assert sleep.at is None and sleep.args == {"seconds": "0.5"} and sleep.matches("step", 9, {})
    with pytest.raises(ValueError, match="ACTION@POINT"):
        parse_faults("explode@step=1")
