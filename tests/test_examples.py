"""The example specs parse, validate, and train a few steps through `plait run`'s code path."""

from pathlib import Path

import pytest
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec

EXAMPLES = sorted(str(p) for p in Path(__file__).resolve().parents[1].glob("examples/*.toml"))


@pytest.mark.parametrize("spec_file", EXAMPLES, ids=lambda p: Path(p).stem)
def test_example_spec_validates_against_its_world(spec_file):
    spec = load_spec(spec_file)
    spec.module.validate(spec.config, spec.workers.num)


@pytest.mark.slow
def test_composed_example_trains_and_checkpoints(ray_cluster, tmp_path):
    spec = load_spec("examples/gpt_tp2_dp2.toml", [
        "train.steps=4", "train.checkpoint_every=2", f"run_dir={tmp_path / 'run'}", "data.source=synthetic",
        "data.num_tokens=40000", f"data.path={tmp_path / 'data'}",
    ])
    summary = run_job(spec)
    assert summary["plan"] == "dp2(fsdp2) tp2+sp pp1"
    assert summary["checkpoint"].endswith("step_00000004") and summary["last_loss"] < summary["first_loss"]
    resumed = run_job(load_spec("examples/gpt_tp2_dp2.toml", [
        "train.steps=6", "train.resume=latest", f"run_dir={tmp_path / 'run'}", "data.source=synthetic",
        "data.num_tokens=40000", f"data.path={tmp_path / 'data'}", "plan.tp=1", "plan.dp=4",
        "plan.sequence_parallel=false", "plan.loss_parallel=false",
    ]))
    assert resumed["start_step"] == 4  # the tp2 x dp2 checkpoint loads under dp4


@pytest.mark.slow
def test_zero_engine_trains_checkpoints_and_resumes_through_the_job(ray_cluster, tmp_path):
    common = ["data.source=synthetic", "data.num_tokens=40000", f"data.path={tmp_path / 'data'}",
              f"run_dir={tmp_path / 'run'}", "plan.engine=zero2", "model.d_model=64", "train.checkpoint_every=0"]
    first = run_job(load_spec("examples/gpt_dp2.toml", ["train.steps=3", *common]))
    assert first["plan"] == "dp2(zero2) tp1 pp1" and first["checkpoint"].endswith("step_00000003")
    resumed = run_job(load_spec("examples/gpt_dp2.toml", ["train.steps=5", "train.resume=latest", *common]))
    assert resumed["start_step"] == 3 and resumed["checkpoint"].endswith("step_00000005")
