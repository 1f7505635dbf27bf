"""Fault tolerance: a hung rank is named and the job restarts; a rank killed mid-checkpoint loses nothing; a
restart keeps its ranks off the node where the failure was, when the cluster has room elsewhere."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from plait.runtime.job import run_job
from plait.runtime.placement import bundle_selectors, ranks_that_fit
from plait.runtime.spec import spec_from_table
from plait.runtime.watchdog import Seen, Watchdog, WatchdogConfig

# A small floor so a hang shows within seconds; beats often enough to see the rhythm of millisecond steps.
FAST_WATCHDOG = {"floor_s": 5, "factor": 10, "first_step_s": 60, "beat_s": 0.25}


def toy(run_dir: Path, max_restarts: int = 0, watchdog: dict = FAST_WATCHDOG, **train) -> dict:
    table = {"job": "toy_job", "run_dir": str(run_dir), "workers": {"num": 2, "max_restarts": max_restarts},
             "watchdog": watchdog, "train": {"steps": 6, **train}}
    return run_job(spec_from_table(table))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    return toy(tmp_path_factory.mktemp("plain") / "run")


def attempts(run_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(run_dir.glob("attempts.rank*"))}


def watchdog_seeing(*records: dict, silent: tuple[int, ...] = ()) -> Watchdog:
    now = time.monotonic()
    dog = Watchdog("test", len(records), WatchdogConfig())
    dog.seen = {r: Seen(dict(rec, rank=r, beat=1), now, now - (60 if r in silent else 0))
                for r, rec in enumerate(records)}
    return dog


def test_the_rank_named_is_the_silent_one_then_the_one_behind_then_the_one_its_peers_wait_for():
    waiting, computing = {"step": 7, "phase": "collective"}, {"step": 7, "phase": "compute"}
    assert watchdog_seeing(waiting, computing, waiting).culprits() == [1]  # peers wait in the all-reduce for it
    assert watchdog_seeing(waiting, {"step": 6, "phase": "compute"}, waiting).culprits() == [1]  # behind
    assert watchdog_seeing(waiting, waiting, waiting, silent=(2,)).culprits() == [2]  # no heartbeat: gone
    assert watchdog_seeing(computing, computing).culprits() == [0, 1]  # nobody stands out: all are named


def test_a_job_that_reports_no_steps_is_never_called_hung():
    dog = watchdog_seeing({"step": None, "phase": "compute"}, {"step": None, "phase": "compute"})
    dog.poll = lambda: None  # no Ray here: judge what was seen
    dog.call_at -= 10_000
    assert not dog.armed and dog.check(["10.0.0.1", "10.0.0.2"]) is None


def test_without_steps_a_rank_whose_heartbeat_stopped_is_still_called_hung():
    """The driver's wait stays bounded for a job that reports no steps: a frozen process (or a lost node Ray has
    not noticed yet) stops publishing heartbeats, and after watchdog.floor_s it is named."""
    dog = watchdog_seeing({"step": None, "phase": "compute"}, {"step": None, "phase": "compute"}, silent=(1,))
    dog.cfg = WatchdogConfig(floor_s=30)
    dog.poll = lambda: None
    hang = dog.check(["10.0.0.1", "10.0.0.2"])
    assert hang is not None and hang.ranks == [1]
    assert "rank 1 on node 10.0.0.2" in hang.message and "no heartbeat" in hang.message


def test_room_elsewhere_counts_whole_ranks_per_node_under_the_strategy():
    free = {"a": {"CPU": 3.5, "GPU": 2}, "b": {"CPU": 2, "GPU": 0}}
    assert ranks_that_fit(free, 1, 0, "PACK") == 5 and ranks_that_fit(free, 1, 1, "PACK") == 2
    assert ranks_that_fit(free, 1, 0, "STRICT_PACK") == 3 and ranks_that_fit(free, 1, 0, "STRICT_SPREAD") == 2
    assert bundle_selectors(["n1", "n2"], 2) == [{"ray.io/node-id": "!in(n1,n2)"}] * 2
    assert bundle_selectors([], 2) is None


def test_a_rank_stuck_inside_a_step_is_named_and_the_job_restarts_to_the_uninterrupted_result(
        uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "run"
    summary = toy(run_dir, max_restarts=1, fail="hang:4")
    out = capsys.readouterr().out
    assert summary["restarts"] == 1 and summary["start_step"] == 0  # the run began at step 0 ...
    (restart,) = summary["restart_log"]  # ... and restarted from the step-3 checkpoint
    assert (restart["kind"], restart["failed_ranks"], restart["resumed_step"]) == ("Hang", [1], 3)
    assert restart["resumed_from"] == str(run_dir / "checkpoints" / "step_00000003")
    assert torch.equal(summary["weight"], uninterrupted["weight"])
    assert summary["losses"] == uninterrupted["losses"][3:]
    log = (run_dir / "plait.log").read_text()
    found = re.search(r"hung: rank 1 on node \S+ \(node id \w+, pid \d+\): no step progress for (\d+)s after step 3; "
                      r"compute at toy_job.py:\d+ \(train\)", log)
    assert found
    # Detected once the timeout (the 5 s floor: millisecond steps) had passed, not long after it (beats every
    # 0.25 s, the driver polls every 0.5 s; the margin is for a loaded machine).
    assert FAST_WATCHDOG["floor_s"] <= int(found.group(1)) <= 3 * FAST_WATCHDOG["floor_s"]
    assert "Others: rank 0: step 3, collective" in log  # its peer waits for it in the all-reduce
    assert re.search(r"rank 1 \(node \S+\) failed \(Hang\); restart 1/1", out)
    assert "no room elsewhere for 2 ranks" in out and "reusing node(s)" in out  # one node: it is used again
    assert attempts(run_dir) == {"attempts.rank0": "0\n1\n", "attempts.rank1": "0\n1\n"}


def kill_at_marker(run_dir: Path, marker_name: str, before_kill=lambda: None, **toy_args) -> dict:
    """Run the toy job in a thread; when rank 1 writes ``marker_name`` (its pid), SIGKILL that process from
    outside (after ``before_kill()``); return the job's summary once it finished."""
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(toy(run_dir, max_restarts=1, **toy_args)))
    job.start()
    marker = run_dir / marker_name
    deadline = time.monotonic() + 120
    while not marker.exists() and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), f"rank 1 never wrote {marker_name}"
    before_kill()
    os.kill(int(marker.read_text()), signal.SIGKILL)
    job.join(timeout=180)
    assert not job.is_alive()
    return outcome


def test_a_rank_killed_during_a_checkpoint_write_leaves_the_previous_checkpoint_latest(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"

    def not_committed():
        assert not (run_dir / "checkpoints" / "step_00000004").exists()  # mid-write: not committed

    outcome = kill_at_marker(run_dir, "saving.rank1", not_committed, fail="slow_save:4")
    assert outcome["restarts"] == 1 and outcome["restart_log"][0]["resumed_step"] == 3  # step 3 stayed the latest
    assert torch.equal(outcome["weight"], uninterrupted["weight"])
    assert outcome["losses"] == uninterrupted["losses"][3:]
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["step"] == 6


def test_a_rank_killed_from_outside_in_the_middle_of_a_step_restarts_to_the_uninterrupted_result(
        uninterrupted, tmp_path):
    calm = {**FAST_WATCHDOG, "floor_s": 600, "first_step_s": 600}  # the kill, not the watchdog, ends the attempt
    # stuck.rank1 is written inside step 4, between backward and the all-reduce
    outcome = kill_at_marker(tmp_path / "run", "stuck.rank1", watchdog=calm, fail="hang:4")
    assert outcome["restarts"] == 1 and outcome["restart_log"][0]["resumed_step"] == 3
    assert torch.equal(outcome["weight"], uninterrupted["weight"])
    assert outcome["losses"] == uninterrupted["losses"][3:]


# --- two Ray nodes on this machine: a lost node is kept out of the restarted placement ------------------

def ray_node(temp_dir: str, *args: str) -> list[str]:
    """`ray start` for one node on loopback with its own temp dir and free ports (two nodes share a machine)."""
    from test_ray_job_submit import free_ports

    manager, objects, metrics, agent, agent_grpc, env_agent = free_ports(6)
    return ["ray", "start", "--node-ip-address=127.0.0.1", "--num-gpus=0", f"--temp-dir={temp_dir}",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", "--disable-usage-stats", *args]


@pytest.fixture
def two_nodes():
    """A head and a worker node, 4 CPUs each; afterwards only these two are stopped (by their temp dirs)."""
    import subprocess
    import sys
    import tempfile

    from plait.runtime.cluster import stop_local_cluster
    from test_ray_job_submit import free_ports

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PLAIT_RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    head_dir, worker_dir = (tempfile.mkdtemp(prefix=f"plait-{n}-", dir="/tmp") for n in ("head", "wrk"))
    (gcs,) = free_ports(1)
    try:
        subprocess.run(ray_node(head_dir, "--head", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=false"),
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(ray_node(worker_dir, f"--address=127.0.0.1:{gcs}", "--num-cpus=4"),
                       env=env, check=True, capture_output=True, timeout=120)
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "worker_dir": worker_dir}
    finally:
        stop_local_cluster(worker_dir)
        stop_local_cluster(head_dir)


def kill_node(temp_dir: str) -> int:
    """SIGKILL the raylet of the node started with ``temp_dir`` and everything under it (its workers): the
    node is gone without telling anyone. Returns the raylet's pid."""
    import psutil

    raylet = next(p for p in psutil.process_iter(["cmdline"])
                  if "raylet" in " ".join(p.info["cmdline"] or [])[:200] and temp_dir in " ".join(p.info["cmdline"]))
    for p in [*raylet.children(recursive=True), raylet]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return raylet.pid


@pytest.mark.slow
def test_a_lost_node_is_kept_out_of_the_restarted_placement(ray_cluster, two_nodes, tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    train = {"steps": 14, "step_sleep_s": 0.4, "record_nodes": True}
    spec = tmp_path / "spread.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{run_dir}"\n[workers]\nnum = 2\nstrategy = "SPREAD"\n'
                    f'max_restarts = 1\n[watchdog]\n' + "".join(f"{k} = {v}\n" for k, v in FAST_WATCHDOG.items())
                    + "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items()))
    tests = Path(__file__).resolve().parent
    job = subprocess.Popen([sys.executable, "-m", "plait.runtime", "run", str(spec), "--address", two_nodes["address"]],
                           cwd=tests, env=two_nodes["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while job.poll() is None and time.monotonic() < deadline and \
                (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.2)
        placed = [json.loads((run_dir / f"node.attempt0.rank{r}").read_text()) for r in range(2)]
        assert sorted(p["head"] for p in placed) == [False, True]  # SPREAD: one rank on each node
        lost = next(p["node_id"] for p in placed if not p["head"])
        kill_node(two_nodes["worker_dir"])
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    assert f"placing the new group off node(s) {lost[:12]}" in out
    again = [json.loads((run_dir / f"node.attempt1.rank{r}").read_text()) for r in range(2)]
    assert all(p["head"] and p["node_id"] != lost for p in again)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["restart_log"][0]["resumed_step"] > 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 15))  # the restart's steps replaced the lost attempt's
    logged = {row["step"]: row["loss"] for row in rows}
    plain = run_job(spec_from_table({"job": "toy_job", "run_dir": str(tmp_path / "plain"), "workers": {"num": 2},
                                     "train": {"steps": 14}}))
    assert [logged[s] for s in range(1, 15)] == plain["losses"]
