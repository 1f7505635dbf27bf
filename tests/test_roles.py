"""Roles in one job: rank objects that keep state between calls, a pool of actors whose results arrive
as they finish, a killed actor reported and replaced while a worker group carries on, and a control
job that drives a trainer group and a generator pool from the driver."""

import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
from plait.runtime.actor_pool import ActorCallError, ActorLost, ActorPool, RestartLimitError
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec
from plait.runtime.worker_group import WorkerConfig, WorkerGroup

TESTS = Path(__file__).resolve().parent


def alive_actors() -> int:
    return sum(1 for a in ray._private.state.actors().values() if a["State"] == "ALIVE")  # noqa: SLF001


class Accumulator:
    """A rank's object: a running total, summed across the ranks on every add."""

    def __init__(self, ctx, scale: float, offset: float = 0.0):
        self.rank, self.scale, self.total, self.calls = ctx.rank, scale, offset, 0

    def add(self, x: float, seconds: float = 0.0) -> dict:
        time.sleep(seconds)
        self.total += self.scale * x
        self.calls += 1
        t = torch.tensor([self.total])
        dist.all_reduce(t)
        return {"rank": self.rank, "total": self.total, "sum": t.item()}

    def state(self) -> tuple[float, int]:
        return self.total, self.calls


def rank_times(ctx, factor: float) -> float:
    return ctx.rank * factor


class Worker:
    """A pool actor: remembers what it did."""

    def __init__(self, name: str):
        self.name, self.done, self.failures = name, 0, 0

    def work(self, x: int, seconds: float) -> str:
        time.sleep(seconds)
        self.done += 1
        return f"{self.name}:{x}"

    def work_when(self, x: int, gate: str) -> str:
        """Returns once the file ``gate`` exists: the test decides the order calls finish in."""
        while not os.path.exists(gate):
            time.sleep(0.01)
        self.done += 1
        return f"{self.name}:{x}"

    def count(self) -> int:
        return self.done

    def fail(self) -> None:
        self.failures += 1
        raise ValueError(f"prompt {self.failures} is malformed")

    def failure_count(self) -> int:
        return self.failures


def test_rank_objects_keep_state_between_calls_and_reduce_across_ranks(ray_cluster, tmp_path):
    with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
        group.start(Accumulator, 2.0, per_rank_args=[(0.0,), (100.0,)])  # Accumulator(ctx, 2.0, offset)
        first = group.call("add", 1.0)
        refs = group.submit("add", 0.0, per_rank_args=[(0.1,), (0.2,)])  # add(0.0, seconds) per rank
        while not group.ready(refs):  # the driver is free meanwhile
            time.sleep(0.05)
        second = group.gather(refs)
        states = group.call("state")
        each = group.run_each(rank_times, [(10.0,), (10.0,)])
    assert [r["total"] for r in first] == [2.0, 102.0] and {r["sum"] for r in first} == {104.0}
    assert [r["total"] for r in second] == [2.0, 102.0] and [r["rank"] for r in second] == [0, 1]
    assert states == [(2.0, 2), (102.0, 2)]  # the same objects answered all three calls
    assert each == [0.0, 10.0]
    assert alive_actors() == 0


def test_calls_before_start_and_wrong_per_rank_args_are_refused(ray_cluster, tmp_path):
    with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
        with pytest.raises(RuntimeError, match=r"call group.start\(cls\) first"):
            group.submit("add", 1.0)
        with pytest.raises(ValueError, match=r"one tuple of arguments per rank \(2\), got 1"):
            group.run_each(rank_times, [(1.0,)])


def test_pool_results_arrive_as_each_call_finishes(ray_cluster, tmp_path):
    gates, finish_order = [tmp_path / f"finish{i}" for i in range(3)], [1, 2, 0]
    with ActorPool(Worker, 3, per_actor_args=[("a",), ("b",), ("c",)], cpus=0.5, name="worker") as pool:
        refs = [pool.submit(i, "work_when", i, str(gates[i]), tag=f"job{i}") for i in range(3)]
        gates[finish_order[0]].touch()
        arrived = []
        for done in pool.as_completed(refs):  # the next call may finish only once this result has arrived
            arrived.append(done)
            if len(arrived) < len(finish_order):
                gates[finish_order[len(arrived)]].touch()
        assert [(i, tag) for i, tag, _ in arrived] == [(1, "job1"), (2, "job2"), (0, "job0")]
        assert [value for _, _, value in arrived] == ["b:1", "c:2", "a:0"]
        assert pool.call_all("count") == [1, 1, 1] and pool.in_flight() == []


def test_killed_pool_actor_is_reported_with_its_lost_call_and_replaced_while_a_group_trains(ray_cluster, tmp_path):
    with WorkerGroup(WorkerConfig(num=2), tmp_path) as group, \
            ActorPool(Worker, 2, per_actor_args=[("a",), ("b",)], cpus=0.5, name="generator", max_restarts=1) as pool:
        group.start(Accumulator, 1.0)
        training = group.submit("add", 1.0, seconds=2.0)  # the group trains while the pool's actor dies
        pool.submit(0, "work", 0, 0.0, tag="quick")
        pool.submit(1, "work", 1, 3.0, tag="long")  # killed long before it ends
        old_pid = pool.pids[1]
        os.kill(old_pid, signal.SIGKILL)
        outcomes = []
        while pool.in_flight():
            try:
                outcomes.append(pool.next_done())
            except ActorLost as e:
                outcomes.append(e)
        lost = next(o for o in outcomes if isinstance(o, ActorLost))
        assert lost.index == 1 and [(c.index, c.method, c.tag) for c in lost.lost] == [(1, "work", "long")]
        assert "generator actor 1 died" in str(lost) and "pool.replace(1)" in str(lost)
        assert [o.value for o in outcomes if not isinstance(o, ActorLost)] == ["a:0"]
        with pytest.raises(RuntimeError, match=r"actor 1 is dead: call pool.replace\(1\)"):
            pool.submit(1, "count")
        pool.replace(1)
        assert pool.pids[1] != old_pid and pool.restarts == [0, 1]
        assert pool.call(1, "count") == 0 and pool.call(0, "count") == 1  # a fresh actor; the other kept its state
        [(i, tag, value)] = list(pool.as_completed(pool.resubmit(lost.lost)))
        assert (i, tag, value) == (1, "long", "b:1")
        assert [r["sum"] for r in group.gather(training)] == [2.0, 2.0]
        assert group.call("state") == [(1.0, 1), (1.0, 1)]  # the group's objects are the same ones
        with pytest.raises(RestartLimitError, match=r"actor 1 was replaced 1 time\(s\) already, .*max_restarts=1"):
            pool.replace(1)


def test_an_exception_in_a_pool_method_names_the_actor_and_is_not_retried(ray_cluster):
    with ActorPool(Worker, 2, per_actor_args=[("a",), ("b",)], cpus=0.5, name="generator", max_concurrency=2) as pool:
        pool.submit(0, "work", 0, 60.0)
        assert pool.call(0, "count") == 0  # max_concurrency=2: it answers while a long call runs
        pid = pool.pids[1]
        with pytest.raises(ActorCallError) as info:
            pool.call(1, "fail")
        err = info.value
        assert (err.index, err.method, err.kind, err.message) == (1, "fail", "ValueError", "prompt 1 is malformed")
        assert "generator actor 1: fail raised ValueError" in str(err) and "in fail" in err.remote_traceback
        assert pool.call(1, "failure_count") == 1  # called once, not retried; the same actor lives on
        assert pool.pids[1] == pid and pool.restarts == [0, 0]


def test_a_pool_class_from_a_module_only_the_driver_has_runs_by_name(ray_cluster, tmp_path):
    name = f"driver_only_pool_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text("class Echo:\n    def __init__(self, prefix):\n        self.prefix = prefix\n\n"
                    "    def echo(self, x):\n        return self.prefix + x\n")
    code = {name: (str(path), path.read_text())}
    sys.path.insert(0, str(tmp_path))
    try:
        __import__(name)
        by_object = ActorPool(sys.modules[name].Echo, 1, args=(">",), cpus=0.5, code=code)
        by_name = ActorPool(f"{name}:Echo", 1, args=("<",), cpus=0.5, code=code)
        with by_object, by_name:
            assert by_object.call(0, "echo", "x") == ">x" and by_name.call(0, "echo", "y") == "<y"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def write_control_job(folder: Path, **work) -> Path:
    """tests/control_job.py under a fresh name beside a spec: the actors get its code shipped, not imported."""
    name = f"control_job_{uuid.uuid4().hex[:8]}"
    shutil.copy(TESTS / "control_job.py", folder / f"{name}.py")
    table = "".join(f"{k} = {v}\n" for k, v in work.items())
    (folder / "spec.toml").write_text(f'job = "{name}"\nrun_dir = "{folder / "run"}"\n[workers]\nmax_restarts = 1\n'
                                      f"[work]\n{table}")
    return folder / "spec.toml"


def test_a_control_job_drives_a_trainer_group_and_a_generator_pool(ray_cluster, tmp_path):
    summary = run_job(load_spec(write_control_job(tmp_path, rounds=3, generators=2)))
    assert summary["version"] == 3 and summary["seen"] == 9.0 and summary["ranks_agree"]  # 3 rounds x (1 + 2)
    assert summary["made"] == [4, 4] and summary["restarts"] == 0  # 3 rounds + the one drained at the end
    run = tmp_path / "run"
    assert (run / "summary.json").exists() and (run / "run.json").exists() and (run / "spec.json").exists()
    assert alive_actors() == 0  # the group and the pool were torn down


def test_a_rank_crash_restarts_control_from_the_restart_point(ray_cluster, tmp_path):
    summary = run_job(load_spec(write_control_job(tmp_path, rounds=3, generators=1, crash_round=2)))
    assert summary["restarts"] == 1 and summary["attempt"] == 1
    assert summary["version"] == 3 and summary["made"] == [4]  # the second attempt ran whole, on fresh actors
    assert "rank 1 of 2" in (tmp_path / "run" / "plait.log").read_text()
    assert alive_actors() == 0
