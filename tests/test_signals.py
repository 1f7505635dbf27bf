"""Stopping a run: Ctrl-C (SIGINT to the terminal's process group) or SIGTERM (what Slurm and Kubernetes
send) makes the ranks commit a checkpoint at the next step and return; the run ends with one line naming
that checkpoint and the exact command that continues it, exit 130 or 143, no traceback. A second Ctrl-C,
or ranks that do not stop within workers.stop_grace_s, stop it at once."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from plait.runtime.cli import main
from plait.runtime.cluster import stop_local_cluster

TESTS = Path(__file__).resolve().parent
PLAIT = str(Path(sys.executable).parent / "plait")
NOISE = ("Traceback", "Exception ignored", "Fatal Python error")


class Driver:
    """`plait run` in its own session (as a terminal runs it), with its own Ray temp dir; output to files."""

    def __init__(self, args: list[str], folder: Path):
        self.ray_tmp = tempfile.mkdtemp(prefix="plait-sig-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PLAIT_RAY_ADDRESS")}
        env.update(RAY_TMPDIR=self.ray_tmp, PYTHONUNBUFFERED="1", PLAIT_PROGRESS="off",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")])))
        self.out, self.err = open(folder / "driver.out", "w+"), open(folder / "driver.err", "w+")
        self.proc = subprocess.Popen([PLAIT, "run", *args], stdout=self.out, stderr=self.err, env=env, cwd=folder,
                                     start_new_session=True)

    def output(self) -> str:
        return Path(self.out.name).read_text() + Path(self.err.name).read_text()

    def wait_for(self, ready, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert self.proc.poll() is None, f"the run ended early ({self.proc.returncode}):\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {timeout_s}s:\n{self.output()[-3000:]}"
            time.sleep(0.5)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the foreground process group

    def finish(self, timeout_s: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close()
        self.err.close()
        stop_local_cluster(self.ray_tmp)


@pytest.fixture
def driver(tmp_path):
    started = []

    def start(*args: str) -> Driver:
        started.append(Driver(list(args), tmp_path))
        return started[-1]

    yield start
    for d in started:
        d.close()


def toy_spec(folder: Path, **train) -> Path:
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in {"steps": 400, "step_sleep_s": 0.1, **train}.items())
    spec = folder / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "run"\n[workers]\nnum = 2\nstop_grace_s = 60\n[train]\n{table}')
    return spec


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.startswith("[plait] ")][-1]


def test_ctrl_c_commits_a_checkpoint_names_it_with_the_command_to_continue_and_exits_130(driver, tmp_path,
                                                                                          monkeypatch, ray_cluster):
    spec = toy_spec(tmp_path, checkpoint_every=0)  # no regular checkpoints: the stop commits the only one
    run = driver(str(spec), "train.steps=400")
    run.wait_for(lambda: len(steps_logged(tmp_path / "run")) >= 3)
    run.ctrl_c()
    assert run.finish() == 130
    output = run.output()
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    stopped_at = steps_logged(tmp_path / "run")[-1]
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{stopped_at:08d}"
    command = f"plait run {spec} train.steps=400 train.resume=latest"
    assert last_line(output) == (f"[plait] stopped by Ctrl-C (SIGINT): the ranks committed a checkpoint at a step "
                                 f"boundary and returned; last committed checkpoint {checkpoint}; continue with: "
                                 f"{command}")
    assert (checkpoint / "meta.json").is_file() and stopped_at < 400
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"]["signal"] == "SIGINT" and summary["stopped"]["continue_with"] == command
    assert "stopped by Ctrl-C (SIGINT)" in (tmp_path / "run" / "plait.log").read_text()
    assert not (tmp_path / "run" / ".plait.lock").exists()
    # the printed command continues the run (two more steps here): each step logged once, from the checkpoint on
    monkeypatch.chdir(tmp_path)
    assert main([*command.split()[1:], f"train.steps={stopped_at + 2}", "train.step_sleep_s=0"]) == 0
    assert steps_logged(tmp_path / "run") == list(range(1, stopped_at + 3))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["start_step"] == stopped_at


def test_sigterm_to_the_driver_commits_a_checkpoint_and_exits_143(driver, tmp_path):
    spec = toy_spec(tmp_path, checkpoint_every=5)
    run = driver(str(spec))
    run.wait_for(lambda: len(steps_logged(tmp_path / "run")) >= 3)
    run.proc.send_signal(signal.SIGTERM)  # to the driver alone, as Kubernetes does
    assert run.finish() == 143
    output = run.output()
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    stopped_at = steps_logged(tmp_path / "run")[-1]
    assert re.fullmatch(rf"\[plait\] stopped by SIGTERM: .*; last committed checkpoint \S+/run/checkpoints/step_"
                        rf"{stopped_at:08d}; continue with: plait run {spec} train.resume=latest", last_line(output))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"]["signal"] == "SIGTERM"


def test_a_second_ctrl_c_stops_at_once(driver, tmp_path):
    spec = toy_spec(tmp_path, checkpoint_every=2, honor_stop=False)  # a loop that never asks to stop
    run = driver(str(spec))
    run.wait_for(lambda: len(steps_logged(tmp_path / "run")) >= 3)
    run.ctrl_c()
    run.wait_for(lambda: "asking the ranks to commit a checkpoint" in run.output())
    run.ctrl_c()
    assert run.finish(timeout_s=120) == 130
    output = run.output()
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    assert re.fullmatch(r"\[plait\] stopped by Ctrl-C \(SIGINT\): a second SIGINT stopped it at once; the ranks were "
                        r"torn down; last committed checkpoint \S+/step_\d{8}; continue with: .*train.resume=latest",
                        last_line(output))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped"]["signal"] == "SIGINT"
    assert not (tmp_path / "run" / ".plait.lock").exists()


def test_ranks_that_do_not_stop_within_the_grace_period_are_torn_down(driver, tmp_path):
    spec = toy_spec(tmp_path, checkpoint_every=0, honor_stop=False)
    run = driver(str(spec), "workers.stop_grace_s=3")
    run.wait_for(lambda: len(steps_logged(tmp_path / "run")) >= 3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout_s=120) == 143
    output = run.output()
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    assert ("stopped by SIGTERM: the ranks did not stop within workers.stop_grace_s=3s and were torn down; no "
            "checkpoint committed yet; continue with: ") in last_line(output)


def test_a_control_job_sees_the_stop_and_its_groups_and_pools_are_closed(driver, tmp_path):
    (tmp_path / "control_spec.toml").write_text(
        'job = "control_job"\nrun_dir = "run"\n[cluster]\nnum_cpus = 4\n[work]\nrounds = 400\nround_sleep_s = 0.2\n')
    run = driver(str(tmp_path / "control_spec.toml"))
    run.wait_for(lambda: "started in" in ((tmp_path / "run" / "plait.log").read_text()
                                          if (tmp_path / "run" / "plait.log").is_file() else ""))
    time.sleep(3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    output = run.output()
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"]["how"] == "control returned" and 1 <= summary["stopped_at"] < 400


def test_ctrl_c_before_the_ranks_start_stops_at_once_and_leaves_the_earlier_run_in_place(driver, tmp_path):
    spec = toy_spec(tmp_path, steps=2, step_sleep_s=0.0)
    first = driver(str(spec))
    assert first.finish() == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    run = driver(str(spec), "train.prepare_s=120")  # a fresh start, interrupted while it builds its data
    run.wait_for(lambda: "[toy] preparing" in run.output())
    run.ctrl_c()
    assert run.finish(timeout_s=120) == 130
    output = run.output()
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    assert last_line(output) == (f"[plait] stopped by Ctrl-C (SIGINT): no rank was running yet; no checkpoint "
                                 f"committed yet; continue with: plait run {spec} train.prepare_s=120")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing moved, nothing written
