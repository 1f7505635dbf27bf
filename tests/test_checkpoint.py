"""Checkpoints: resume equals an uninterrupted run, restarts after a killed rank, torn writes ignored."""

import json
import os

import pytest
import torch
from plait.models.gpt import GPT, GPTConfig
from plait.runtime.checkpoint import Checkpointer
from plait.runtime.cli import main
from plait.runtime.faults import ENV
from plait.runtime.job import run_job
from plait.runtime.spec import spec_from_table
from plait.runtime.worker_group import RankError

MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}


def tiny_job(tmp_path, run: str, max_restarts: int = 0, faults: str = "", **train):
    """The job; ``faults``: PLAIT_FAULTS for this run (runtime/faults.py), e.g. rank 1 dies after step 4."""
    table = {
        "job": "plait.lm.lm_job",
        "run_dir": str(tmp_path / run),
        "workers": {"num": 2, "max_restarts": max_restarts},
        "model": MODEL,
        "data": {"path": str(tmp_path / "data"), "source": "synthetic", "num_tokens": 20_000},
        "train": {"steps": 6, "global_batch": 8, "seq_len": 16, "dtype": "float64", "checkpoint_every": 0,
                  "optim": {"lr": 1e-2, "warmup_steps": 2}, **train},
        "plan": {"dp": 2},
    }
    previous = os.environ.pop(ENV, None)
    try:
        if faults:
            os.environ[ENV] = faults
        return run_job(spec_from_table(table))
    finally:
        os.environ.pop(ENV, None)
        if previous is not None:
            os.environ[ENV] = previous


def final_params(checkpoint: str) -> dict:
    model = GPT(GPTConfig(**MODEL)).double()
    Checkpointer(checkpoint).load(checkpoint, model)  # single process: DCP needs no process group
    return model.state_dict()


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    return tmp, tiny_job(tmp, "full")


def test_run_writes_metrics_tensorboard_plot_and_checkpoint(uninterrupted):
    tmp, summary = uninterrupted
    run_dir = tmp / "full"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["mem_bytes"] > 0 and r["step_time_s"] > 0 for r in records)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "metrics.png").stat().st_size > 1000
    assert summary["checkpoint"].endswith("step_00000006") and summary["last_loss"] < summary["first_loss"]
    assert main(["plot", str(run_dir), "--out", str(tmp / "again.png")]) == 0  # `plait plot RUN_DIR`
    assert (tmp / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp / "nowhere")]) == 2


def losses_by_step(run_dir) -> dict[int, float]:
    """The last logged loss of each step (a resumed run appends the steps it repeats)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resume_from_step_k_matches_uninterrupted_run(uninterrupted):
    tmp, full = uninterrupted
    # The same 6-step job, interrupted: rank 1 dies after step 4, the last checkpoint is step 3.
    with pytest.raises(RankError, match="process died"):
        tiny_job(tmp, "split", checkpoint_every=3, faults="exit@step=4,rank=1,attempt=0")
    rest = tiny_job(tmp, "split", resume="latest")
    assert rest["start_step"] == 3
    assert losses_by_step(tmp / "split") == losses_by_step(tmp / "full")  # bit-identical, step by step
    assert_same_params(final_params(rest["checkpoint"]), final_params(full["checkpoint"]))


def test_fresh_start_keeps_the_previous_run_under_earlier(uninterrupted):
    tmp, _ = uninterrupted
    again = tiny_job(tmp, "again", steps=4, checkpoint_every=2)
    short = tiny_job(tmp, "again", steps=2, checkpoint_every=2)  # a new run in the same run_dir
    assert short["start_step"] == 0 and short["checkpoint"].endswith("again/checkpoints/step_00000002")
    assert sorted(losses_by_step(tmp / "again")) == [1, 2]
    (earlier,) = (tmp / "again" / "earlier").iterdir()
    assert Checkpointer(earlier / "checkpoints").latest().name == "step_00000004"
    assert again["checkpoint"].endswith("step_00000004")


def test_killed_rank_restarts_from_latest_checkpoint(uninterrupted):
    tmp, full = uninterrupted
    crashed = tiny_job(tmp, "crash", max_restarts=1, checkpoint_every=2, faults="exit@step=3,rank=1,attempt=0")
    assert crashed["restarts"] == 1 and crashed["start_step"] == 0  # the run began at step 0 ...
    assert crashed["restart_log"][0]["resumed_step"] == 2  # ... and resumed from the step-2 checkpoint
    assert_same_params(final_params(crashed["checkpoint"]), final_params(full["checkpoint"]))


class ExplodingModel(GPT):
    def state_dict(self, *args, **kwargs):
        raise OSError("disk full")


def test_torn_checkpoint_is_never_latest(tmp_path):
    cfg = GPTConfig(**MODEL)
    torch.manual_seed(1)
    good = GPT(cfg)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(1, good)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(2, ExplodingModel(cfg))  # dies mid-write
    assert (tmp_path / ".step_00000002.tmp").is_dir()
    (tmp_path / "step_00000003").mkdir()  # a folder with no meta.json is not a committed checkpoint
    assert ckpt.latest().name == "step_00000001"
    fresh = GPT(cfg)
    meta = ckpt.load("latest", fresh)
    assert meta["step"] == 1
    assert_same_params(fresh.state_dict(), good.state_dict())
    with pytest.raises(FileNotFoundError, match="not a committed checkpoint"):
        ckpt.load(tmp_path / "step_00000003", fresh)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model = GPT(GPTConfig(**MODEL))
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, model)
    assert [p.name for p in ckpt.committed()] == ["step_00000002", "step_00000003"]
