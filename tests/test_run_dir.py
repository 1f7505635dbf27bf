"""The runtime owns the run directory: earlier runs are kept, a failed launch changes nothing, resume
paths are checked on the driver, restarts load only this run's own checkpoints, repeatable errors
use no restart."""

import json
import logging
import shutil

import pytest
import torch
from plait.runtime.checkpoint import Checkpointer, CorruptCheckpointError, ModelOptimizer
from plait.runtime.cli import main
from plait.runtime.config import ConfigError
from plait.runtime.job import run_job
from plait.runtime.spec import spec_from_table
from plait.runtime.worker_group import PlacementError, RankError


def toy(run_dir, num=2, max_restarts=0, **train):
    table = {"job": "toy_job", "run_dir": str(run_dir), "workers": {"num": num, "max_restarts": max_restarts},
             "train": train}
    return run_job(spec_from_table(table))


def steps_logged(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def ckpt_names(folder) -> list[str]:
    return [p.name for p in Checkpointer(folder).committed()]


@pytest.fixture(scope="module")
def used_run_dir(ray_cluster, tmp_path_factory):
    """A run directory after one 4-step run, checkpointed every step."""
    run_dir = tmp_path_factory.mktemp("used") / "run"
    first = toy(run_dir, steps=4, keep_last=4)
    shutil.copytree(run_dir / "checkpoints", run_dir.parent / "pristine")  # later tests move run_dir's aside
    return run_dir, first


def test_fresh_runs_in_one_run_dir_keep_every_earlier_run(ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    toy(run_dir, steps=4)
    toy(run_dir, steps=2)  # fewer steps: its own checkpoints and metrics only, nothing pruned
    third = toy(run_dir, steps=3)
    assert steps_logged(run_dir) == [1, 2, 3] and third["start_step"] == 0
    assert ckpt_names(run_dir / "checkpoints") == ["step_00000001", "step_00000002", "step_00000003"]
    earlier = sorted((run_dir / "earlier").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(earlier) == 2
    assert [steps_logged(e) for e in earlier] == [[1, 2, 3, 4], [1, 2]]
    assert ckpt_names(earlier[0] / "checkpoints") == ["step_00000002", "step_00000003", "step_00000004"]
    assert ckpt_names(earlier[1] / "checkpoints") == ["step_00000001", "step_00000002"]
    for e in earlier:
        assert {"spec.json", "plait.log", "run.json", "summary.json"} <= {p.name for p in e.iterdir()}
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == third["run_id"]


def test_a_failed_launch_changes_nothing_on_disk(used_run_dir):
    run_dir, _ = used_run_dir
    before = snapshot(run_dir)
    with pytest.raises(PlacementError, match="need 64 CPU"):
        toy(run_dir, num=64, steps=2)  # more ranks than the cluster has
    with pytest.raises(ConfigError, match="does not exist"):
        toy(run_dir, steps=2, resume=str(run_dir / "checkpoints" / "step_00000009"))
    assert snapshot(run_dir) == before


def test_missing_resume_path_exits_2_listing_the_committed_checkpoints(used_run_dir, tmp_path, capsys):
    run_dir, _ = used_run_dir
    spec = tmp_path / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{run_dir}"\n[workers]\nnum = 2\nmax_restarts = 1\n')
    missing = run_dir / "checkpoints" / "step_00000009"
    assert main(["run", str(spec), f"train.resume='{missing}'"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {missing} does not exist" in err
    assert all(f"step_0000000{i}" in err for i in (1, 2, 3, 4))


def test_restart_resumes_the_given_checkpoint_when_the_run_has_none_of_its_own(used_run_dir):
    run_dir, first = used_run_dir
    start = run_dir / "checkpoints" / "step_00000002"
    # A fresh run from the earlier run's step 2 that crashes at step 3 before saving anything itself.
    again = toy(run_dir, max_restarts=1, steps=4, checkpoint_every=0, resume=str(start), fail="crash:3")
    assert again["restarts"] == 1 and again["start_step"] == 2
    assert "/earlier/" in again["resume_from"] and again["resume_from"].endswith("checkpoints/step_00000002")
    assert torch.equal(again["weight"], first["weight"])  # steps 3-4 from step 2 == the uninterrupted run


@pytest.mark.parametrize("fail", ["value_error:2", "import_error"])
def test_an_error_that_would_repeat_uses_no_restart(ray_cluster, tmp_path, fail):
    run_dir = tmp_path / "run"
    with pytest.raises(RankError) as info:
        toy(run_dir, max_restarts=2, steps=3, fail=fail)
    assert info.value.transient is False
    attempts = [p.read_text() for p in run_dir.glob("attempts.rank*")]  # a rank killed early may not write
    assert attempts and set(attempts) == {"0\n"}  # one attempt, no restart


def test_corrupt_resume_checkpoint_is_refused_before_launch_naming_the_file(used_run_dir, tmp_path):
    run_dir, _ = used_run_dir
    copy = tmp_path / "ckpts"
    shutil.copytree(run_dir.parent / "pristine", copy)
    victim = copy / "step_00000003" / "__0_0.distcp"
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    with pytest.raises(ConfigError) as info:
        toy(tmp_path / "other", steps=4, resume=str(copy / "step_00000003"))
    msg = str(info.value)
    assert "step_00000003 is corrupt: file __0_0.distcp is truncated" in msg
    assert f"train.resume={copy / 'step_00000002'}" in msg  # the previous committed checkpoint
    assert not (tmp_path / "other").exists()


def test_checkpoint_with_garbage_bytes_fails_in_one_line_naming_the_folder(tmp_path):
    model = torch.nn.Linear(4, 2)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, ModelOptimizer(model))
    ckpt.save(2, ModelOptimizer(model))
    data = tmp_path / "step_00000002" / "__0_0.distcp"
    data.write_bytes(b"\x00garbage" * (data.stat().st_size // 8 + 1))  # same length or longer: not truncated
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt.load(tmp_path / "step_00000002", ModelOptimizer(torch.nn.Linear(4, 2)))
    msg = str(info.value)
    assert str(tmp_path / "step_00000002") in msg and f"train.resume={tmp_path / 'step_00000001'}" in msg
    assert len(msg.splitlines()) == 1 and info.value.transient is False


def test_latest_names_the_uncommitted_folders_it_skips(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, ModelOptimizer(torch.nn.Linear(2, 2)))
    (tmp_path / "step_00000002").mkdir()  # copied in by hand, never committed
    with caplog.at_level(logging.WARNING, logger="plait"):
        assert ckpt.latest().name == "step_00000001"
    assert "step_00000002" in caplog.text and "no meta.json" in caplog.text


def test_a_run_dir_holding_the_users_own_files_is_refused(ray_cluster, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match="notes.txt"):
        toy(mine, steps=1)
    assert snapshot(mine) == {"notes.txt": b"my notes"}


def test_a_checkpoint_corrupt_inside_is_one_line_exit_2_and_no_restart(used_run_dir, tmp_path, capsys):
    run_dir, _ = used_run_dir
    copy = tmp_path / "ckpts"
    shutil.copytree(run_dir.parent / "pristine", copy)
    for data in (copy / "step_00000004").glob("*.distcp"):  # right length, garbage bytes: DCP fails to load
        data.write_bytes(b"\x00garbage" * (data.stat().st_size // 8 + 1))
    spec = tmp_path / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{tmp_path / "run"}"\n[workers]\nnum = 2\nmax_restarts = 2\n')
    assert main(["run", str(spec), f"train.resume='{copy / 'step_00000004'}'", "train.steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000004 could not be loaded" in err[0]
    assert f"train.resume={copy / 'step_00000003'}" in err[0]
    assert set(p.read_text() for p in (tmp_path / "run").glob("attempts.rank*")) == {"0\n"}
