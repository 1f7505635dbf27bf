"""Shared fixtures: one embedded Ray cluster per test session (8 logical CPUs on any machine), and after every
test the end of whatever it left running (``cleanup.py``): one failing test never fails the tests after it."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Rank actors unpickle functions defined in test modules by reference: let them import those modules.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
sys.path.insert(0, str(TESTS))

import cleanup  # noqa: E402 - needs the path above
import deepspeed_op  # noqa: E402

deepspeed_op.use_own_extensions_dir()  # before Ray starts: its workers inherit it


@pytest.fixture(scope="session")
def ray_cluster():
    from plait.runtime import ClusterConfig, connect, shutdown

    info = connect(ClusterConfig(num_cpus=8, num_gpus=0))
    yield info
    shutdown()


KEPT = pytest.StashKey[cleanup.Snapshot]()  # what module and session fixtures started: theirs to tear down


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """A module or session fixture may be set up in the middle of a test (``request.getfixturevalue``): what
    it starts outlives the test on purpose, so it is not counted as the test's leftovers."""
    if fixturedef.scope == "function":
        return (yield)
    before = cleanup.snapshot()
    try:
        return (yield)
    finally:
        cleanup.keep_started_since(before, request.config.stash.setdefault(KEPT, cleanup.Snapshot()))


@pytest.fixture(autouse=True)
def nothing_left_running(request):
    """Set up before and torn down after the test's other function fixtures, so their finalizers run first.
    Actors, placement groups, child processes and non-daemon threads the test started and left alive are
    ended here and reported as this test's error at teardown."""
    before = cleanup.snapshot()
    yield
    ended = cleanup.end_leftovers(before, request.config.stash.setdefault(KEPT, cleanup.Snapshot()))
    if ended:
        pytest.fail("the test left these running; they were ended so that the next test starts clean. Tear down "
                    "what a test starts in a fixture finalizer or try/finally:\n  " + "\n  ".join(ended),
                    pytrace=False)


@pytest.fixture
def ray_actors(ray_cluster):
    """A list for the actor handles a test makes with ``ray.remote``: each is killed when the test ends,
    whatever its outcome."""
    import ray

    actors = []
    yield actors
    for actor in actors:
        ray.kill(actor, no_restart=True)


@pytest.fixture
def inside_a_ray_job(tmp_path, monkeypatch):
    """The current directory is Ray's temporary copy of the working directory, as under `ray job submit`."""
    temp = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    temp.mkdir(parents=True)
    monkeypatch.chdir(temp)
    monkeypatch.setenv("PLAIT_RUN_ROOT", str(tmp_path / "runs-root"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    return temp
