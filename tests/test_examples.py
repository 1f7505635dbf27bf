"""The example specs parse, validate, and train a few steps through `plait run`'s code path."""

import importlib.util
from pathlib import Path

import pytest
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(str(p) for p in ROOT.glob("examples/*.toml"))


def addition_inputs(folder: Path) -> dict[str, list[str]]:
    """The RL recipe's inputs (examples/addition_data.py, as the README runs it) in ``folder``, and the overrides
    that point each recipe spec at them (the RL step at the model folder, which stands in for the SFT export)."""
    loaded = importlib.util.spec_from_file_location("addition_data", ROOT / "examples" / "addition_data.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    module.make(folder, held_out=500, sft_share=0.5, seed=0)
    return {"rl_sft_addition": [f"model.path={folder / 'model'}", f"data.files=['{folder / 'sft.parquet'}']",
                                f"data.path={folder / 'sft_tokens'}"],
            "rl_addition": [f"model.path={folder / 'model'}", f"prompts.files=['{folder / 'train.jsonl'}']",
                            f"prompts.eval_files=['{folder / 'test.jsonl'}']"]}


@pytest.mark.parametrize("spec_file", EXAMPLES, ids=lambda p: Path(p).stem)
def test_example_spec_validates_against_its_world(spec_file, tmp_path):
    stem = Path(spec_file).stem
    overrides = addition_inputs(tmp_path / "addition")[stem] if stem in ("rl_sft_addition", "rl_addition") else []
    spec = load_spec(spec_file, overrides)
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
        "train.steps=6", "train.resume=latest", "train.reschedule=true", f"run_dir={tmp_path / 'run'}",
        "data.source=synthetic",
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
    resumed = run_job(load_spec("examples/gpt_dp2.toml", ["train.steps=5", "train.resume=latest",
                                                          "train.reschedule=true", *common]))
    assert resumed["start_step"] == 3 and resumed["checkpoint"].endswith("step_00000005")
