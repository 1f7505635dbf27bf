"""What a test leaves running: Ray actors and placement groups of the session's cluster, child processes of
the test process, and non-daemon threads, each started during the test and still alive after it; and the
cluster's free CPUs, which must be back to what they were before the test.

``conftest.py`` takes a ``snapshot()`` before every test and calls ``end_leftovers(before)`` after it (after
the test's own fixtures have torn down): whatever the test started and did not end is ended here, and the
test gets an error naming it, so the next test starts clean whatever this one did. What was alive before the
test (the session cluster's own processes, a module fixture's cluster or server) is never touched.

A thing a test did end is given ``GRACE_S`` to be reported gone: ``ray.kill`` and ``remove_placement_group``
are asynchronous, and on a machine loaded several times over its cores the GCS learns of a dead actor late.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil

GRACE_S = float(os.environ.get("PLAIT_TEST_LEFTOVER_GRACE_S", "60"))  # tests/test_cleanup.py sets less
# Children of the test process that outlive any one test by design: Python's multiprocessing helpers.
LONG_LIVED = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@dataclass
class Snapshot:
    actors: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    children: set[int] = field(default_factory=set)
    threads: set[int] = field(default_factory=set)
    ray_session: str | None = None
    free: dict[str, float] = field(default_factory=dict)  # the cluster's available CPU and GPU


def _ray_session() -> str | None:
    """This process's Ray session directory, or None when Ray is not initialised here."""
    import ray

    if not ray.is_initialized():
        return None
    node = ray._private.worker._global_node  # noqa: SLF001
    return node.get_session_dir_path() if node is not None else "remote"


def live_actors() -> dict[str, dict]:
    """Actor id -> info of every actor of the connected cluster that is not DEAD."""
    import ray

    if not ray.is_initialized():
        return {}
    return {aid: info for aid, info in ray._private.state.actors().items()  # noqa: SLF001
            if info["State"] != "DEAD"}


def live_placement_groups() -> dict[str, dict]:
    """Placement group id -> info of every placement group of the connected cluster not yet removed."""
    import ray

    if not ray.is_initialized():
        return {}
    return {pid: info for pid, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def live_children() -> dict[int, psutil.Process]:
    """Direct children of this process that are running (zombies are already gone)."""
    out = {}
    for child in psutil.Process().children(recursive=False):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(name in " ".join(child.cmdline()) for name in LONG_LIVED):
                continue
        except psutil.NoSuchProcess:
            continue
        out[child.pid] = child
    return out


def live_threads() -> dict[int, threading.Thread]:
    """Non-daemon threads other than the main one: each would keep the test session from exiting."""
    return {t.ident: t for t in threading.enumerate()
            if t.is_alive() and not t.daemon and t is not threading.main_thread() and t.ident is not None}


def free_resources() -> dict[str, float]:
    """The connected cluster's available CPU and GPU (Ray hands back a dead actor's share a little later)."""
    import ray

    if not ray.is_initialized():
        return {}
    free = ray.available_resources()
    return {res: free.get(res, 0.0) for res in ("CPU", "GPU")}


def snapshot() -> Snapshot:
    return Snapshot(set(live_actors()), set(live_placement_groups()), set(live_children()), set(live_threads()),
                    _ray_session(), free_resources())


def wait_resources_back(before: Snapshot, timeout_s: float) -> dict[str, tuple[float, float]]:
    """Wait until the cluster has at least as much available as before the test; returns what is still short
    after ``timeout_s`` (resource -> (before, now))."""
    if before.ray_session is None or before.ray_session != _ray_session():
        return {}
    deadline = time.monotonic() + timeout_s
    while True:
        now = free_resources()
        short = {res: (had, now.get(res, 0.0)) for res, had in before.free.items() if now.get(res, 0.0) < had}
        if not short or time.monotonic() >= deadline:
            return short
        time.sleep(0.25)


def _started_since(before: Snapshot, kept: Snapshot | None = None) -> tuple[dict, dict, dict, dict]:
    """What is alive now and was neither alive at ``before`` nor started by a broader fixture (``kept``)."""
    kept = kept or Snapshot()
    session = _ray_session()
    same_cluster = before.ray_session is not None and before.ray_session == session
    actors = {k: v for k, v in live_actors().items()
              if k not in before.actors and k not in kept.actors} if same_cluster else {}
    groups = {k: v for k, v in live_placement_groups().items()
              if k not in before.groups and k not in kept.groups} if same_cluster else {}
    children = {}
    for pid, proc in live_children().items():
        if pid in before.children or pid in kept.children:
            continue
        try:
            if session and session != "remote" and session in " ".join(proc.cmdline()):
                continue  # the processes of a Ray cluster the test started in this process (ray.init)
        except psutil.NoSuchProcess:
            continue
        children[pid] = proc
    threads = {k: v for k, v in live_threads().items() if k not in before.threads and k not in kept.threads}
    return actors, groups, children, threads


def keep_started_since(before: Snapshot, kept: Snapshot) -> None:
    """Add what was started since ``before`` to ``kept``: a module or session fixture set up in the middle of
    a test (``request.getfixturevalue``) owns it, and tears it down after the test."""
    actors, groups, children, threads = _started_since(before)
    kept.actors |= set(actors)
    kept.groups |= set(groups)
    kept.children |= set(children)
    kept.threads |= set(threads)


def leftovers(before: Snapshot, kept: Snapshot | None = None,
              grace_s: float = GRACE_S) -> tuple[dict, dict, dict, dict]:
    """What was started since ``before`` (and is not ``kept``) and is still alive once ``grace_s`` has passed
    (returns early when nothing is left)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = _started_since(before, kept)
        if not any(found) or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def describe_actor(info: dict) -> str:
    return f"{info.get('ActorClassName') or 'actor'} (pid {info.get('Pid') or '?'}, {info['State']})"


def describe_process(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.NoSuchProcess:
        return f"pid {proc.pid} (gone)"


def kill_actor(actor_id: str, info: dict) -> None:
    """Kill an actor by id: through its handle when this process holds one (a failed test's traceback keeps
    its handles alive), else its process (every node is this machine in the tests)."""
    import ray

    try:
        ray._private.worker.global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)  # noqa: SLF001
        return
    except Exception:  # noqa: BLE001 - no handle here: the actor belongs to another driver or was never ours
        pass
    if info.get("Pid"):
        try:
            os.kill(int(info["Pid"]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_group(group_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))


def kill_tree(proc: psutil.Process) -> None:
    try:
        procs = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def end_leftovers(before: Snapshot, kept: Snapshot | None = None, grace_s: float = GRACE_S) -> list[str]:
    """End what the test left running (see the module docstring), except what broader fixtures own
    (``kept``); returns one line per thing ended, empty when the test left nothing."""
    actors, groups, children, threads = leftovers(before, kept, grace_s)
    lines = []
    for aid, info in actors.items():
        kill_actor(aid, info)
        lines.append(f"Ray actor {describe_actor(info)}: killed")
    for gid, info in groups.items():
        remove_group(gid)
        lines.append(f"placement group {gid} ({info.get('name') or 'unnamed'}, {info['state']}): removed")
    for proc in children.values():
        lines.append(f"child process {describe_process(proc)}: killed with its children")
        kill_tree(proc)
    for t in threads.values():
        lines.append(f"non-daemon thread {t.name!r}: still running (a thread cannot be killed; join it)")
    if actors:  # wait until the kills have landed, so the next test's snapshot does not see them
        deadline = time.monotonic() + grace_s
        while set(actors) & set(live_actors()) and time.monotonic() < deadline:
            time.sleep(0.5)
    # The next test starts with the cluster's CPUs back (tests compare free CPUs before and after).
    for res, (had, now) in wait_resources_back(before, grace_s).items():
        lines.append(f"the cluster's available {res} is {now:g}, {had:g} before the test: something still holds it")
    return lines


def run_process_group(cmd: list[str], timeout_s: float, merge_stderr: bool = False,
                      **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)`` in a session of its own whose
    whole process group is killed if the command times out or the test is interrupted: a timed-out
    ``plait run`` under bash, or torchrun's ranks, do not outlive it (``subprocess.run`` kills only the process
    it started). A command that ends by itself may leave daemons on purpose (``ray start``): they are left.
    ``merge_stderr``: stderr goes into stdout, in order. Raises ``subprocess.TimeoutExpired`` as
    ``subprocess.run`` does."""
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                            **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
