"""One run at a time in a run directory (and a storage location): a second start is refused at once naming the
host and pid that hold it; a lock left by a dead driver is taken over and said so; the lock goes with the run."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from plait.runtime.cli import main
from plait.runtime.cluster import stop_local_cluster
from plait.runtime.run_lock import LOCK, STALE_BEATS, RunDirLocked, RunLock
from plait.runtime.storage_location import StorageLocation
from test_storage_location import s3  # noqa: F401 - a moto S3 server on 127.0.0.1

TESTS = Path(__file__).resolve().parent
PLAIT = str(Path(sys.executable).parent / "plait")
HOST = socket.gethostname()


def lock_written_by(folder: Path, host: str = HOST, pid: int = 1, beat_s: float = 5.0, age_s: float = 0.0) -> Path:
    """A lock file as another driver would have left it, its heartbeat ``age_s`` old."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_started": 1.0, "started": "2026-01-02T03:04:05",
                                "run_id": "20260102-030405-abcd", "command": "plait run other.toml",
                                "token": "feedfacefeedface", "beat_s": beat_s}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_start_is_refused_at_once_naming_the_host_and_pid_that_hold_the_run_dir(tmp_path):
    with RunLock.hold(tmp_path / "run", run_id="first", command="plait run a.toml"):
        started = time.monotonic()
        with pytest.raises(RunDirLocked) as info:
            RunLock.hold(tmp_path / "run", run_id="second")
        assert time.monotonic() - started < 5  # at once, not after a timeout
    message = str(info.value)
    assert f"run_dir {tmp_path / 'run'} is in use by another plait run: host {HOST}, pid {os.getpid()}" in message
    assert "`plait run a.toml`" in message and "choose another run_dir" in message
    assert info.value.user_error is True  # the CLI prints it in one line and exits 2
    assert not (tmp_path / "run" / LOCK).exists()  # released with the run


def test_a_lock_whose_process_is_gone_is_taken_over_and_said_so(tmp_path):
    pid = dead_pid()
    lock_written_by(tmp_path / "run", pid=pid)
    with RunLock.hold(tmp_path / "run", run_id="mine") as locks:
        assert json.loads((tmp_path / "run" / LOCK).read_text())["run_id"] == "mine"
    assert locks.notes == [f"run_dir {tmp_path / 'run'}: took over the lock left by host {HOST}, pid {pid}, started "
                           f"2026-01-02T03:04:05, run 20260102-030405-abcd (`plait run other.toml`): its process "
                           f"{pid} on {HOST} is no longer running"]


def test_a_lock_from_another_host_holds_while_its_heartbeat_is_fresh_and_is_taken_over_once_stale(tmp_path):
    lock_written_by(tmp_path / "run", host="gpu-node-7", pid=os.getpid(), beat_s=5.0, age_s=3)
    with pytest.raises(RunDirLocked, match="host gpu-node-7, pid"):
        RunLock.hold(tmp_path / "run")
    lock_written_by(tmp_path / "run", host="gpu-node-7", pid=os.getpid(), beat_s=5.0, age_s=STALE_BEATS * 5 + 10)
    with RunLock.hold(tmp_path / "run") as locks:
        assert "its heartbeat is" in locks.notes[0] and "(stale after 30s)" in locks.notes[0]


def test_the_holder_keeps_its_heartbeat_fresh_and_a_failed_start_leaves_no_folder_behind(tmp_path):
    with RunLock.hold(tmp_path / "runs" / "new", beat_s=0.2):
        path = tmp_path / "runs" / "new" / LOCK
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(1.5)
        assert time.time() - path.stat().st_mtime < 5
    assert not (tmp_path / "runs").exists()  # the folders the lock made for itself are gone with it


def test_a_storage_location_is_locked_too_and_its_stale_lock_taken_over(s3, tmp_path):  # noqa: F811
    storage = StorageLocation.parse(s3(f"lock-{time.monotonic_ns()}"))
    with RunLock.hold(tmp_path / "a", storage, run_id="first"):
        with pytest.raises(RunDirLocked, match=rf"storage {storage} is in use by another plait run: host {HOST}"):
            RunLock.hold(tmp_path / "b", storage)  # another run_dir, the same storage
        assert not (tmp_path / "b" / LOCK).exists()  # the run_dir lock it took is released again
    assert not storage.exists(LOCK)
    storage.write_marker(LOCK, json.dumps({"host": HOST, "pid": dead_pid(), "pid_started": 1.0, "started": "x",
                                           "run_id": "r", "command": "", "token": "t", "beat_s": 5.0}).encode())
    with RunLock.hold(tmp_path / "c", storage) as locks:
        assert "is no longer running" in locks.notes[0]


def driver_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PLAIT_RAY_ADDRESS")}
    return {**env, "RAY_TMPDIR": ray_tmp, "PLAIT_PROGRESS": "off",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")]))}


def test_two_runs_started_2s_apart_in_one_run_dir_the_second_is_refused_and_the_first_is_whole(tmp_path):
    spec = tmp_path / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{tmp_path / "twin"}"\n[workers]\nnum = 2\n'
                    '[train]\nsteps = 30\nstep_sleep_s = 0.2\n')
    ray_tmp = tempfile.mkdtemp(prefix="plait-lock-", dir="/tmp")
    first = subprocess.Popen([PLAIT, "run", str(spec)], env=driver_env(ray_tmp), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "twin" / LOCK).exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        time.sleep(2)
        second = subprocess.run([PLAIT, "run", str(spec)], env=driver_env(ray_tmp), capture_output=True, text=True,
                                timeout=300)
        assert first.poll() is None  # the second was refused while the first still runs
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"plait: error: run_dir {tmp_path / 'twin'} is in use by another plait run: host {HOST}, pid {first.pid}")
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        stop_local_cluster(ray_tmp)
    steps = [json.loads(line)["step"] for line in (tmp_path / "twin" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert not (tmp_path / "twin" / "earlier").exists() and not (tmp_path / "twin" / LOCK).exists()
    assert json.loads((tmp_path / "twin" / "summary.json").read_text())["run_id"] == \
        json.loads((tmp_path / "twin" / "run.json").read_text())["run_id"]


def test_a_run_after_a_killed_driver_takes_its_lock_over(ray_cluster, tmp_path, capsys):
    lock_written_by(tmp_path / "run", pid=dead_pid())  # what `kill -9` of a driver leaves
    spec = tmp_path / "toy.toml"
    spec.write_text(f'job = "toy_job"\nrun_dir = "{tmp_path / "run"}"\n[workers]\nnum = 2\n[train]\nsteps = 2\n')
    assert main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "took over the lock left by" in out and "is no longer running" in out
    assert "took over the lock left by" in (tmp_path / "run" / "plait.log").read_text()
    assert not (tmp_path / "run" / LOCK).exists() and not (tmp_path / "run" / "earlier").exists()
