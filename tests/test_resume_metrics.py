"""A resumed or restarted run's metrics hold each step once, in metrics.jsonl and in TensorBoard: the
steps after the checkpoint are logged again by the resumed run, and its values win."""

import json
from pathlib import Path

import pytest
from plait.runtime.job import run_job
from plait.runtime.metrics import drop_steps_after
from plait.runtime.spec import spec_from_table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def toy(run_dir: Path, max_restarts: int = 0, **train) -> dict:
    table = {"job": "toy_job", "run_dir": str(run_dir), "workers": {"num": 2, "max_restarts": max_restarts},
             "train": {"steps": 6, **train}}
    return run_job(spec_from_table(table))


def jsonl_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def tensorboard_steps_and_losses(run_dir: Path) -> tuple[list[int], dict[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    return [e.step for e in scalars], {e.step: e.value for e in scalars}


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    toy(run_dir, checkpoint_every=2)
    return jsonl_losses(run_dir)


def test_a_restarted_run_logs_each_step_once_with_the_restarted_values(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # the last rank dies after step 5; the restart resumes from the step-4 checkpoint and logs 5 and 6 again
    summary = toy(run_dir, max_restarts=1, checkpoint_every=2, fail="crash:5")
    assert summary["restarts"] == 1
    assert jsonl_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert jsonl_losses(run_dir) == pytest.approx(uninterrupted, rel=1e-9)
    steps, losses = tensorboard_steps_and_losses(run_dir)
    assert steps == [1, 2, 3, 4, 5, 6] and losses == pytest.approx(uninterrupted, rel=1e-6)


def test_a_resume_after_a_failure_keeps_the_steps_up_to_its_checkpoint_and_logs_the_rest_once(uninterrupted,
                                                                                              tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="process died"):
        toy(run_dir, checkpoint_every=2, fail="crash:5")  # no restart: the run ends after logging step 5
    assert jsonl_steps(run_dir)[-1] >= 5
    toy(run_dir, checkpoint_every=2, resume="latest")  # from step 4
    assert jsonl_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert jsonl_losses(run_dir) == pytest.approx(uninterrupted, rel=1e-9)
    steps, losses = tensorboard_steps_and_losses(run_dir)
    assert steps == [1, 2, 3, 4, 5, 6] and losses == pytest.approx(uninterrupted, rel=1e-6)


def test_dropping_later_steps_rewrites_the_file_whole_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert drop_steps_after(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # nothing left beside it
