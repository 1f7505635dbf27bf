"""summary.json describes the run (where it began, its first and last loss, each restart and why), and
plait.log holds what the driver decided and printed, with timestamps; the printed summary is a screen of
scalars."""

import json
import re

import pytest
from plait.runtime.cli import main
from plait.runtime.job import run_job
from plait.runtime.run_summary import screen_summary
from plait.runtime.spec import spec_from_table

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    table = {"job": "toy_job", "run_dir": str(run_dir), "workers": {"num": 2}, "train": {"steps": 6}}
    return run_job(spec_from_table(table))


@pytest.fixture(scope="module")
def restarted(ray_cluster, tmp_path_factory):
    """`plait run` of a 6-step toy job whose last rank dies after step 5; it restarts from the step-4 checkpoint."""
    folder = tmp_path_factory.mktemp("restarted")
    spec = folder / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{folder / "run"}"\n[workers]\nnum = 2\nmax_restarts = 1\n'
                    '[train]\nsteps = 6\ncheckpoint_every = 2\nfail = "crash:5"\n')
    return folder / "run", main(["run", str(spec)])


def test_the_summary_of_a_restarted_run_describes_the_run_and_lists_its_restart(restarted, uninterrupted):
    run_dir, code = restarted
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == 0  # where the run began, not where its second attempt did (the job said 4)
    assert summary["first_loss"] == pytest.approx(uninterrupted["losses"][0], rel=1e-12)
    assert summary["last_loss"] == pytest.approx(uninterrupted["losses"][-1], rel=1e-12)
    assert summary["restarts"] == 1
    (restart,) = summary["restart_log"]
    assert restart["attempt"] == 1 and restart["failed_ranks"] == [1] and restart["kind"] == "ActorDiedError"
    assert "died" in restart["reason"]
    assert restart["resumed_from"] == str(run_dir / "checkpoints" / "step_00000004") and restart["resumed_step"] == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", restart["at"])
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".summary")) == []  # no temp file left


def test_plait_log_holds_what_the_driver_decided_and_printed_with_timestamps(restarted):
    run_dir, _ = restarted
    lines = (run_dir / "plait.log").read_text().splitlines()
    entries = [line for line in lines if STAMP.match(line)]
    text = "\n".join(lines)
    assert entries and entries[0].split(" INFO ")[1].startswith("cluster: ")  # said before the run dir started
    for decision in (r"placed 2 rank\(s\), gloo: rank 0 on \S+ \(node \w+, pid \d+\); rank 1 on",
                     r"run \S+ of toy_job started in \S+: spec resolved in spec.json",
                     r"checkpoint committed: \S+/checkpoints/step_00000002 \(step 2, at \d\d:\d\d:\d\d\)",
                     r"checkpoint committed: \S+/step_00000004 \(step 4, .*\n.* ERROR attempt 0 failed: rank 1 of 2 "
                     r"\(node \S+\) failed",
                     r"rank 1 \(node \S+\) failed \(ActorDiedError\); restart 1/1 from \S+/step_00000004",
                     r"checkpoint committed: \S+/checkpoints/step_00000006 \(step 6, ",
                     r"summary: \{"):
        assert re.search(decision, text), decision
    stamps = [line[:23] for line in entries]
    assert stamps == sorted(stamps)  # held lines were written first, in order


def test_every_plait_line_the_driver_prints_is_in_plait_log(ray_cluster, tmp_path, capsys):
    spec = tmp_path / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{tmp_path / "run"}"\n[workers]\nnum = 2\n[train]\nsteps = 2\n')
    assert main(["run", str(spec)]) == 0
    assert main(["run", str(spec)]) == 0  # a fresh start: the first run moves under earlier/, said in one line
    said = [line[len("[plait] "):] for line in capsys.readouterr().out.splitlines() if line.startswith("[plait] ")]
    assert any(line.startswith("fresh start: the earlier run in") for line in said)
    log = (tmp_path / "run" / "plait.log").read_text()
    assert said and all(line in log for line in said)


def test_the_printed_summary_is_a_screen_of_scalars_and_summary_json_keeps_the_lists():
    summary = {"plan": "dp1", "last_reward": 0.61, "rewards": [0.1] * 12_000,
               "per_step": {str(i): i for i in range(400)}, "stopped": {"signal": "SIGTERM", "exit_code": 143},
               "note": "x" * 1000, "restarts": 0}
    shown = json.loads(screen_summary(summary))
    assert shown["plan"] == "dp1" and shown["last_reward"] == 0.61 and shown["restarts"] == 0
    assert shown["rewards"] == "(list of 12000: see summary.json)"
    assert shown["per_step"] == "(dict of 400: see summary.json)"
    assert shown["stopped"] == {"signal": "SIGTERM", "exit_code": 143}  # a small table of scalars stays
    assert len(shown["note"]) < 400 and len(screen_summary(summary).splitlines()) < 20


def test_a_resumed_run_starts_at_its_checkpoints_step_even_once_that_checkpoint_is_pruned(ray_cluster, tmp_path):
    table = {"job": "toy_job", "run_dir": str(tmp_path / "run"), "workers": {"num": 2},
             "train": {"steps": 4, "checkpoint_every": 2, "keep_last": 1}}
    run_job(spec_from_table(table))
    table["train"].update(steps=8, resume="latest")
    resumed = run_job(spec_from_table(table))  # from step 4, whose checkpoint goes when step 6 is committed
    assert not (tmp_path / "run" / "checkpoints" / "step_00000004").exists()
    assert resumed["start_step"] == 4 and resumed["first_loss"] == resumed["losses"][0]
