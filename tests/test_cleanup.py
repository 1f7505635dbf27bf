"""One failing test never fails the tests after it: whatever a test leaves running (Ray actors, placement
groups, child processes) is ended after it and reported as that test's error alone, while what a module
fixture started lives on. Checked on a test session of its own (this folder's conftest.py and cleanup.py, its
own embedded Ray cluster)."""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from deepspeed_op import remove_stale_lock

TESTS = Path(__file__).resolve().parent

LEAKY = textwrap.dedent('''
    import subprocess
    import sys
    import time

    import psutil
    import pytest
    import ray

    kept = []


    def test_fails_with_its_actors_alive(ray_cluster):
        class Sleeper:
            def ping(self):
                return "pong"

        actors = [ray.remote(num_cpus=1)(Sleeper).remote() for _ in range(2)]
        assert ray.get([a.ping.remote() for a in actors]) == ["pong", "pong"]
        assert False, "fails on purpose while its actors are alive"


    def test_leaves_a_placement_group_and_a_process(ray_cluster):
        from ray.util.placement_group import placement_group

        kept.append(placement_group([{"CPU": 2}]))
        ray.get(kept[-1].ready())
        kept.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"]))


    def test_the_next_test_starts_clean(ray_cluster):
        from cleanup import live_actors, live_placement_groups

        assert live_actors() == {} and live_placement_groups() == {}
        assert not psutil.pid_exists(kept[1].pid)  # the sleeping process was killed
        deadline = time.monotonic() + 60  # the removed group's CPUs come back to the cluster
        while ray.available_resources().get("CPU") != 8 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources()["CPU"] == 8


    @pytest.fixture(scope="module")
    def server():
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
        yield proc
        proc.kill()
        proc.wait()


    def test_a_module_fixture_set_up_inside_a_test_is_not_its_leftover(request):
        assert request.getfixturevalue("server").poll() is None


    def test_the_module_fixture_lives_on(server):
        assert server.poll() is None
    ''')


@pytest.mark.slow
def test_what_a_test_leaves_running_is_ended_and_fails_that_test_alone(tmp_path):
    for name in ("conftest.py", "cleanup.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    env = {**os.environ, "PLAIT_TEST_LEFTOVER_GRACE_S": "10"}  # each leaking test waits this long for its leftovers
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_leaky.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    out = done.stdout
    summary = [line for line in out.splitlines() if line.startswith(("PASSED", "FAILED", "ERROR"))]
    assert sorted(line.split(" - ")[0] for line in summary) == [
        "ERROR test_leaky.py::test_fails_with_its_actors_alive",
        "ERROR test_leaky.py::test_leaves_a_placement_group_and_a_process",
        "FAILED test_leaky.py::test_fails_with_its_actors_alive",
        "PASSED test_leaky.py::test_a_module_fixture_set_up_inside_a_test_is_not_its_leftover",
        "PASSED test_leaky.py::test_leaves_a_placement_group_and_a_process",
        "PASSED test_leaky.py::test_the_module_fixture_lives_on",
        "PASSED test_leaky.py::test_the_next_test_starts_clean",
    ], out[-4000:]
    # the two actors are each named (pytest may repeat a report's first line in its short summary)
    assert len(set(re.findall(r"\.Sleeper \(pid (\d+)", out))) == 2 and "placement group " in out
    assert "child process pid " in out and "time.sleep(900)" in out
    assert "they were ended so that the next test starts clean" in out


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_builds_is_kept(tmp_path):
    lock = tmp_path / "lock"  # torch's FileBaton in DeepSpeed's build folder: every other load waits on it
    lock.touch()
    old = time.time() - 120
    os.utime(lock, (old, old))
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], cwd=tmp_path)
    try:
        assert not remove_stale_lock(tmp_path) and lock.exists()  # a process works in the folder: a build runs
    finally:
        builder.kill()
        builder.wait()
    assert remove_stale_lock(tmp_path) and not lock.exists()
    lock.touch()
    assert not remove_stale_lock(tmp_path) and lock.exists()  # just taken: a build may be starting
