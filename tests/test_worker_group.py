"""The worker group: ranks, errors that name the rank and say if a restart helps, placement, teardown."""

import os
import sys
import threading
import time

import pytest
import ray
import torch
import torch.distributed as dist
from plait.runtime import PlacementError, RankError, WorkerConfig, WorkerGroup
from plait.runtime.worker_group import gpus_per_rank, local_ranks


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


def fail_after_peer_sees_closed_connection(ctx):
    if ctx.rank == 1:
        dist.destroy_process_group()  # rank 0's barrier now fails with "Connection closed by peer"...
        time.sleep(0.3)
        raise ValueError("shard 3 is unreadable")  # ...but this is the cause the user must see
    dist.barrier()


def raise_on_rank_one(ctx, exc):
    if ctx.rank == 1:
        raise exc
    return ctx.rank


def hang_on_rank_one(ctx):
    if ctx.rank == 1:
        time.sleep(600)
    return ctx.rank


def rendezvous_view(ctx):
    t = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(t)
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                          "CUDA_VISIBLE_DEVICES")}
    return {"sum": t.item(), "run_id": ctx.run_id, "resume_from": ctx.resume_from, **env}


def test_ranks_see_world_and_reduce_across_it(ray_cluster, tmp_path):
    before = ray.cluster_resources()["CPU"]
    assert cpus_back_to(before)  # what an earlier test placed has been given back (Ray frees it asynchronously)
    run_dir = tmp_path / "run"
    with WorkerGroup(WorkerConfig(num=3), run_dir) as group:
        out = group.run(identity_and_sum)
    assert not run_dir.exists()  # the runtime creates the run directory, after placement
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
    assert (err.kind, err.message, err.transient) == ("ValueError", "corrupt batch 7", False)  # would repeat
    assert alive_actors() == 0  # the blocked ranks were torn down, not leaked
    with pytest.raises(RuntimeError, match="shut down"):
        group.run(identity_and_sum)


def test_dead_worker_process_is_reported_by_rank(ray_cluster, tmp_path):
    with pytest.raises(RankError, match=r"(?s)rank 1 of 2 .*process died") as info:
        with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
            group.run(die_on_rank_one)
    assert info.value.rank == 1 and info.value.transient  # a crash: a restart can fix it
    assert alive_actors() == 0


def test_communication_errors_are_transient(ray_cluster, tmp_path):
    with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
        with pytest.raises(RankError) as info:
            group.run(raise_on_rank_one, dist.DistNetworkError("store at 10.0.0.7:29500 unreachable"))
    err = info.value
    assert (err.rank, err.kind, err.transient) == (1, "DistNetworkError", True)
    assert err.message == "store at 10.0.0.7:29500 unreachable"
    with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
        with pytest.raises(RankError) as info:
            group.run(raise_on_rank_one, ConnectionResetError("peer went away"))
    assert (info.value.kind, info.value.transient) == ("ConnectionResetError", True)


def test_root_cause_is_reported_not_the_peers_connection_error(ray_cluster, tmp_path):
    with pytest.raises(RankError) as info:
        with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
            group.run(fail_after_peer_sees_closed_connection)
    err = info.value
    assert (err.rank, err.kind, err.message, err.transient) == (1, "ValueError", "shard 3 is unreadable", False)
    assert alive_actors() == 0


def test_code_the_ranks_cannot_import_is_not_transient(ray_cluster, tmp_path):
    (tmp_path / "driver_only_job.py").write_text("def train(ctx):\n    return ctx.rank\n")
    sys.path.insert(0, str(tmp_path))  # importable here, not on the ranks
    try:
        import driver_only_job

        with pytest.raises(RankError) as info:
            with WorkerGroup(WorkerConfig(num=2), tmp_path) as group:
                group.run(driver_only_job.train)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("driver_only_job", None)
    err = info.value
    assert (err.kind, err.transient) == ("ModuleNotFoundError", False)
    assert "driver_only_job" in err.message


def test_call_timeout_tears_down_and_names_the_ranks_still_running(ray_cluster, tmp_path):
    with pytest.raises(RankError) as info:
        with WorkerGroup(WorkerConfig(num=2, call_timeout_s=3), tmp_path) as group:
            group.run(hang_on_rank_one)
    err = info.value
    assert err.ranks == [1] and err.transient and err.kind == "CallTimeout"
    assert f"rank 1 on {err.node_ips[0]} did not return within workers.call_timeout_s=3s" in str(err)
    assert alive_actors() == 0


def test_context_fields_reach_every_rank_and_cpu_ranks_see_no_gpu(ray_cluster, tmp_path):
    context = {"run_id": "20260101-abc", "resume_from": tmp_path / "ckpt" / "step_10"}
    with WorkerGroup(WorkerConfig(num=2, gpus_per_worker=0), tmp_path, context=context) as group:
        out = group.run(rendezvous_view)
    assert [(o["run_id"], o["resume_from"]) for o in out] == [(context["run_id"], context["resume_from"])] * 2
    assert [o["CUDA_VISIBLE_DEVICES"] for o in out] == ["", ""]  # DeepSpeed cannot pick CUDA on a CPU rank
    assert [(o["LOCAL_RANK"], o["LOCAL_WORLD_SIZE"]) for o in out] == [("0", "2"), ("1", "2")]
    with pytest.raises(ValueError, match=r"\['rank'\] are not RankContext fields"):
        WorkerGroup(WorkerConfig(num=2), tmp_path, context={"rank": 5})


def test_groups_started_at_once_each_get_their_own_rendezvous(ray_cluster, tmp_path):
    results: dict[int, list] = {}

    def start_and_reduce(i: int) -> None:
        with WorkerGroup(WorkerConfig(num=2), tmp_path / str(i)) as group:
            results[i] = group.run(rendezvous_view)

    threads = [threading.Thread(target=start_and_reduce, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1]
    assert all(o["sum"] == 3.0 for out in results.values() for o in out)
    assert {o["MASTER_ADDR"] for out in results.values() for o in out} == {"127.0.0.1"}  # one node: loopback
    assert results[0][0]["MASTER_PORT"] != results[1][0]["MASTER_PORT"]
    assert alive_actors() == 0


def test_auto_gpus_fail_when_the_cluster_has_some_but_too_few():
    assert gpus_per_rank(-1, 8, 8) == 1
    assert gpus_per_rank(-1, 0, 8) == 0  # no GPU at all: CPU ranks
    assert gpus_per_rank(0, 8, 8) == 0 and gpus_per_rank(2, 0, 8) == 2  # asked explicitly
    with pytest.raises(PlacementError, match=r"has 3 GPU: ask for at most 3 ranks, or set workers.gpus_per_worker=0"):
        gpus_per_rank(-1, 3, 8)


def test_local_ranks_follow_ray_nodes_not_addresses():
    assert local_ranks(["a", "b", "a", "b"]) == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert local_ranks(["a", "a", "a"]) == [(0, 3), (1, 3), (2, 3)]


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
