"""The worker group: ranks, errors that name the rank, fail-fast placement, clean teardown."""

import os
import time

import pytest
import ray
import torch
import torch.distributed as dist
from plait.runtime import PlacementError, RankError, WorkerConfig, WorkerGroup


def alive_actors() -> int:
    return sum(1 for a in ray._private.state.actors().values() if a["State"] == "ALIVE")  # noqa: SLF001


def cpus_back_to(expected: float, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == expected:
            return True
        time.sleep(0.1)
    return False


def identity_and_sum(ctx):
    t = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(t)
    return {"rank": ctx.rank, "world": ctx.world_size, "local": ctx.local_rank, "sum": t.item(),
            "backend": ctx.backend, "pg_world": dist.get_world_size(), "threads": torch.get_num_threads()}


def fail_on_rank_two(ctx):
    if ctx.rank == 2:
        raise ValueError("corrupt batch 7")
    dist.barrier()  # the healthy ranks block here; the group must not wait for them


def die_on_rank_one(ctx):
    if ctx.rank == 1:
        os._exit(3)
    dist.barrier()


def test_ranks_see_world_and_reduce_across_it(ray_cluster, tmp_path):
    before = ray.available_resources()["CPU"]
    with WorkerGroup(WorkerConfig(num=3), tmp_path) as group:
        out = group.run(identity_and_sum)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["pg_world"] == 3 and o["sum"] == 6.0 for o in out)
    assert [o["local"] for o in out] == [0, 1, 2]  # one node
    assert {o["backend"] for o in out} == {"gloo"} and {o["threads"] for o in out} == {1}
    assert alive_actors() == 0
    assert cpus_back_to(before)


def test_exception_on_a_rank_surfaces_with_rank_and_traceback(ray_cluster, tmp_path):
    group = WorkerGroup(WorkerConfig(num=4), tmp_path)
    with pytest.raises(RankError) as info:
        group.run(fail_on_rank_two)
    err = info.value
    assert err.rank == 2 and "rank 2 of 4" in str(err)
    assert "ValueError: corrupt batch 7" in str(err) and "fail_on_rank_two" in err.remote_traceback
    assert alive_actors() == 0  # the blocked ranks were torn down, not leaked
    with pytest.raises(RuntimeError, match="shut down"):
        group.run(identity_and_sum)


def test_dead_worker_process_is_reported_by_rank(ray_cluster, tmp_path):
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 .*process died"):
        with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
            group.run(die_on_rank_one)
    assert alive_actors() == 0


def test_over_asking_fails_fast_with_what_is_missing(ray_cluster, tmp_path):
    with pytest.raises(PlacementError, match=r"need 64 CPU, but the Ray cluster has 8"):
        WorkerGroup(WorkerConfig(num=16, cpus_per_worker=4), tmp_path)
    with pytest.raises(PlacementError, match=r"GPU"):
        WorkerGroup(WorkerConfig(num=2, gpus_per_worker=1), tmp_path)
    assert alive_actors() == 0


def test_busy_cluster_times_out_instead_of_hanging(ray_cluster, tmp_path):
    with WorkerGroup(WorkerConfig(num=6), tmp_path):
        with pytest.raises(PlacementError, match=r"could not place 4 ranks .* within 2s"):
            WorkerGroup(WorkerConfig(num=4, placement_timeout_s=2), tmp_path)
    assert alive_actors() == 0
