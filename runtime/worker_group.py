"""A worker group: N rank actors in one placement group, wired into one torch.distributed group.

    with WorkerGroup(WorkerConfig(num=4), run_dir) as group:
        results = group.run(train, cfg)          # train(ctx: RankContext, cfg) on every rank
        group.start(Trainer, cfg)                # one Trainer(ctx, cfg) per rank, kept between calls
        refs = group.submit("step", batch)       # returns at once: drive other actors meanwhile
        stats = group.gather(refs)               # ... then collect, in rank order

Rank 0's actor opens the rendezvous store on a port the OS picks and keeps it bound (loopback when
every rank is on one machine); each actor initialises torch.distributed through it (NCCL when it
was given a GPU, gloo otherwise). A failure on any rank is raised in the driver as one ``RankError``
naming the rank, its traceback, and whether a restart could fix it (``transient``); the whole group
is torn down (peers blocked in a collective are killed, not waited for). The run directory is only
named here, never created: the runtime creates it once the ranks are placed.

Waits on the ranks are bounded slices: between them a watchdog (runtime/watchdog.py) reads the ranks'
step heartbeats and tears the group down with a ``RankError`` of kind "Hang" naming the rank and node
that stopped keeping the step rhythm. ``avoid_nodes`` keeps the ranks off those Ray nodes (a restart
after a failure there; runtime/placement.py decides whether the cluster has room elsewhere).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from plait.runtime.context import RankContext
from plait.runtime.placement import bundle_selectors
from plait.runtime.rank_actor import Failure, RankActor, end_actors
from plait.runtime.watchdog import Watchdog, WatchdogConfig
from plait.runtime.worker_config import (  # noqa: F401  (re-exported: the names users import from here)
    STRATEGIES,
    PlacementError,
    WorkerConfig,
    gpus_per_rank,
    local_ranks,
)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger("plait")
PEER_GRACE_S = 2.0  # after a communication error, how long the other ranks get to report the root cause
POLL_S = 0.5  # the longest single wait on the ranks: between waits, the watchdog looks at their heartbeats
SETUP_SLACK_S = 120.0  # start-up calls (node info, rendezvous, process group) wait pg_timeout_s plus this


class RankError(RuntimeError):
    """A rank failed. ``rank`` says which (``ranks``: all of them, for a call timeout), ``kind`` the
    exception's class name, ``message`` its one-line cause, ``remote_traceback`` its traceback, and
    ``transient`` whether a restart can fix it (a dead process, a lost node, a communication error,
    a timeout, a hang) or not (any other exception: it would fail the same way again). ``user_error``:
    the rank's exception class marks its message as naming the bad input and the fix (``user_error =
    True``): the CLI prints it in one line and exits 2. ``node_ids``: the Ray node ids of ``ranks`` (what
    a restart keeps its new placement off, when it can)."""

    def __init__(self, rank: int, world_size: int, node_ip: str, detail: str, cause: BaseException | None = None,
                 *, kind: str = "", message: str = "", transient: bool = False, user_error: bool = False,
                 ranks: list[int] | None = None, node_ips: list[str] | None = None,
                 node_ids: list[str] | None = None):
        self.rank, self.node_ip, self.remote_traceback, self.cause = rank, node_ip, detail, cause
        self.kind, self.message, self.transient, self.user_error = kind, message, transient, user_error
        self.ranks, self.node_ips, self.node_ids = ranks or [rank], node_ips or [node_ip], node_ids or []
        who = (f"rank {rank} of {world_size} (node {node_ip})" if len(self.ranks) == 1 else
               f"ranks {', '.join(map(str, self.ranks))} of {world_size} (nodes {', '.join(self.node_ips)})")
        super().__init__(f"{who} failed:\n{detail}")


class WorkerGroup:
    def __init__(self, cfg: WorkerConfig, run_dir: str | Path, *, attempt: int = 0, env: dict[str, str] | None = None,
                 context: dict[str, Any] | None = None, pg_timeout_s: float | None = None,
                 code: dict[str, tuple[str, str]] | None = None, watchdog: WatchdogConfig | None = None,
                 avoid_nodes: Sequence[str] = (), stop_key: str | None = None):
        """``code``: {module name: (path, source)} of local job modules the ranks must import (sent with
        the actors, so nodes need not have the files). ``watchdog``: hang detection (default: on, with
        WatchdogConfig's defaults). ``avoid_nodes``: Ray node ids no rank may be placed on. ``stop_key``: the
        Ray KV key whose presence asks the ranks to stop (``ctx.stop_requested()``; runtime/stop.py)."""
        cfg.check()
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call plait.runtime.connect() first")
        self.cfg, self.run_dir, self.attempt = cfg, Path(run_dir).resolve(), attempt
        self.context = _checked_context(context or {})
        self.world_size = cfg.num
        self.node_ips: list[str] = []
        self.node_ids: list[str] = []
        self.pids: list[int] = []
        self.started = False  # start() built an object on every rank
        self.avoid_nodes = list(avoid_nodes)
        gpus = gpus_per_rank(cfg.gpus_per_worker, ray.cluster_resources().get("GPU", 0), cfg.num)
        self._check_capacity(gpus)
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        watch = watchdog or WatchdogConfig()
        watch.check()
        self.pg = placement_group([dict(bundle) for _ in range(cfg.num)], strategy=cfg.strategy,
                                  bundle_label_selector=bundle_selectors(self.avoid_nodes, cfg.num))
        self.watchdog = Watchdog(f"hb/{self.pg.id.hex()}", cfg.num, watch)
        self.actors: list = []
        try:
            self._wait_placed(bundle)
            threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
            hide_gpus = {} if gpus else {"CUDA_VISIBLE_DEVICES": ""}  # CPU ranks: DeepSpeed must not pick CUDA
            env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **hide_gpus, **(env or {})}
            self.actors = [
                RankActor.options(
                    num_cpus=cfg.cpus_per_worker, num_gpus=gpus, runtime_env={"env_vars": env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                ).remote(threads, code)
                for i in range(cfg.num)
            ]
            timeout_s = pg_timeout_s or cfg.pg_timeout_s
            bound = timeout_s + SETUP_SLACK_S
            infos = self._gather([a.node_info.remote() for a in self.actors], bound)
            self.node_ips = [ip for ip, _, _ in infos]
            self.node_ids = [node_id for _, node_id, _ in infos]
            self.pids = [pid for _, _, pid in infos]
            self.locals = local_ranks(self.node_ids)
            # All ranks on one machine: rendezvous on loopback, never exposed beyond it.
            opened = self.actors[0].open_rendezvous.remote(len(set(self.node_ips)) == 1, cfg.num, timeout_s)
            master = self._gather([opened], bound)[0]
            beats = [(self.watchdog.key(r) if watch.enabled else None, watch.beat_s, stop_key)
                     if watch.enabled or stop_key else None for r in range(cfg.num)]
            setups = [a.setup.remote(self._fields(r), master, timeout_s, beats[r]) for r, a in enumerate(self.actors)]
            self.backend = self._gather(setups, bound)[0]
            log.info("placed %d rank(s), %s: %s", cfg.num, self.backend, "; ".join(
                f"rank {r} on {ip} (node {nid[:12]}, pid {pid})"
                for r, (ip, nid, pid) in enumerate(zip(self.node_ips, self.node_ids, self.pids, strict=True))))
        except BaseException:
            self.shutdown()
            raise

    def _fields(self, rank: int) -> dict:
        local_rank, local_world_size = self.locals[rank]
        return dict(
            rank=rank, world_size=self.world_size, local_rank=local_rank, local_world_size=local_world_size,
            node_ip=self.node_ips[rank], run_dir=self.run_dir, attempt=self.attempt, **self.context,
        )

    def _check_capacity(self, gpus: float) -> None:
        """Fail fast when the cluster could never hold the group, instead of waiting forever."""
        cfg, total = self.cfg, ray.cluster_resources()
        need = {"CPU": cfg.num * cfg.cpus_per_worker, "GPU": cfg.num * gpus}
        for res, amount in need.items():
            have = total.get(res, 0)
            if amount > have:
                hint = (
                    "lower workers.num or workers.cpus_per_worker, or give Ray more logical CPUs "
                    "(cluster.num_cpus for the embedded cluster, `ray start --num-cpus` otherwise)"
                    if res == "CPU" else "lower workers.num or set workers.gpus_per_worker=0 to run on CPU"
                )
                raise PlacementError(
                    f"{cfg.num} ranks x {need[res] / cfg.num:g} {res} need {amount:g} {res}, "
                    f"but the Ray cluster has {have:g}: {hint}"
                )
        per_node = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        if not any(n.get("CPU", 0) >= cfg.cpus_per_worker and n.get("GPU", 0) >= gpus for n in per_node):
            raise PlacementError(
                f"no node can hold one rank ({cfg.cpus_per_worker:g} CPU, {gpus:g} GPU); largest nodes: "
                f"{[{k: n.get(k, 0) for k in ('CPU', 'GPU')} for n in per_node]}"
            )

    def _wait_placed(self, bundle: dict) -> None:
        ready, _ = ray.wait([self.pg.ready()], timeout=self.cfg.placement_timeout_s)
        if not ready:
            off = f" off node(s) {', '.join(n[:12] for n in self.avoid_nodes)}" if self.avoid_nodes else ""
            raise PlacementError(
                f"could not place {self.cfg.num} ranks of {bundle} with strategy {self.cfg.strategy}{off} within "
                f"{self.cfg.placement_timeout_s:g}s; available now: {ray.available_resources()}. Other jobs "
                "hold the rest: wait for them, or ask for fewer ranks"
            )

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``fn(ctx, *args, **kwargs)`` on every rank; return the results in rank order.

        With ``call_timeout_s`` set, ranks that have not returned by then are torn down and reported.
        """
        self.watchdog.call_started()
        return self._gather([a.run.remote(fn, args, kwargs) for a in self._live()], self.cfg.call_timeout_s)

    def run_each(self, fn: Callable, per_rank_args: Sequence[tuple], **kwargs: Any) -> list[Any]:
        """Call ``fn(ctx, *per_rank_args[rank], **kwargs)`` on every rank; results in rank order."""
        rows = self._rows(per_rank_args)
        self.watchdog.call_started()
        return self._gather([a.run.remote(fn, row, kwargs) for a, row in zip(self._live(), rows, strict=True)],
                            self.cfg.call_timeout_s)

    def start(self, factory: Callable | str, *args: Any, per_rank_args: Sequence[tuple] | None = None,
              **kwargs: Any) -> None:
        """Build one object per rank, ``factory(ctx, *args, *per_rank_args[rank], **kwargs)``, kept in the rank
        for ``call``/``submit`` (a second start replaces it). ``factory``: a class or function, or its
        ``"module:qualname"``. A failure is raised like ``run``'s."""
        rows = self._rows(per_rank_args)
        self.watchdog.call_started()
        self._gather([a.start.remote(factory, args + row, kwargs) for a, row in zip(self._live(), rows, strict=True)],
                     self.cfg.call_timeout_s)
        self.started = True

    def call(self, method: str, *args: Any, per_rank_args: Sequence[tuple] | None = None, **kwargs: Any) -> list:
        """``obj.method(*args, *per_rank_args[rank], **kwargs)`` on every rank's object; results in rank order."""
        return self.gather(self.submit(method, *args, per_rank_args=per_rank_args, **kwargs))

    def submit(self, method: str, *args: Any, per_rank_args: Sequence[tuple] | None = None,
               **kwargs: Any) -> list[ray.ObjectRef]:
        """Like ``call`` but returns at once: one ref per rank, in rank order, for ``gather`` (or ``ready``)."""
        if not self.started:
            raise RuntimeError(f"group.submit({method!r}): no object on the ranks yet; call group.start(cls) first")
        rows = self._rows(per_rank_args)
        self.watchdog.call_started()
        return [a.call.remote(method, args + row, kwargs) for a, row in zip(self._live(), rows, strict=True)]

    def gather(self, refs: Sequence[ray.ObjectRef], timeout_s: float | None = None) -> list[Any]:
        """The results of ``submit``'s refs in rank order; a failure tears the group down and raises
        ``RankError`` as ``run`` does. ``timeout_s`` (default ``workers.call_timeout_s``, 0 = none)."""
        self._live()
        if len(refs) != self.world_size:
            raise ValueError(f"group.gather got {len(refs)} refs for {self.world_size} ranks: pass the whole list "
                             "group.submit returned")
        return self._gather(list(refs), self.cfg.call_timeout_s if timeout_s is None else timeout_s)

    def ready(self, refs: Sequence[ray.ObjectRef]) -> bool:
        """Without blocking: True when ``gather(refs)`` would return or raise at once (every rank finished,
        or one failed)."""
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        if len(done) == len(refs):
            return True
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                return True
        return False

    def _rows(self, per_rank_args: Sequence[tuple] | None) -> list[tuple]:
        if per_rank_args is None:
            return [()] * self.world_size
        if len(per_rank_args) != self.world_size or not all(isinstance(r, (tuple, list)) for r in per_rank_args):
            raise ValueError(f"per_rank_args must hold one tuple of arguments per rank ({self.world_size}), got "
                             f"{len(per_rank_args)} entries: {str(per_rank_args)[:200]}")
        return [tuple(r) for r in per_rank_args]

    def _live(self) -> list:
        if not self.actors:
            raise RuntimeError("this worker group was shut down (a rank failed or shutdown() was called)")
        return self.actors

    def _gather(self, refs: list, timeout_s: float = 0.0) -> list[Any]:
        """Results in order; waits in slices of POLL_S, the watchdog looking at the heartbeats between them."""
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        while pending:
            wait_s = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done:
                if deadline is not None and time.monotonic() >= deadline:
                    self._timed_out(sorted(refs.index(r) for r in pending), timeout_s)
                if len(refs) == self.world_size and self.node_ips:
                    hang = self.watchdog.check(self.node_ips)
                    if hang is not None:
                        self._hung(hang.ranks, hang.message)
                continue
            try:
                results[refs.index(done[0])] = ray.get(done[0])
            except ray.exceptions.RayError as e:
                self._fail(refs, {refs.index(done[0]): Failure.of(e)}, pending)
        return [results[r] for r in range(len(refs))]

    def _fail(self, refs: list, failures: dict[int, Failure], pending: list) -> None:
        """Tear the group down and raise the most informative failure among the ranks'.

        A rank's own error often makes its peers fail too ("connection closed by peer"): when the first
        failure is such a transient one, the others get a moment to report theirs before choosing.
        """
        if pending and all(f.transient for f in failures.values()):
            finished, _ = ray.wait(pending, num_returns=len(pending), timeout=PEER_GRACE_S)
            for ref in finished:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    failures[refs.index(ref)] = Failure.of(e)
        rank = min(failures, key=lambda r: failures[r].priority)  # ties: the first to fail
        f = failures[rank]
        if f.priority == 2 and len(refs) == self.world_size:  # a peer's connection error: who went away?
            lost = self._silent_ranks()
            if lost:
                ips = [self.node_ips[r] for r in lost]
                message = (f"{', '.join(f'rank {r} on node {ip}' for r, ip in zip(lost, ips, strict=True))} went "
                           f"silent (no heartbeat: its process or node is gone) while rank {rank} reported: "
                           f"{f.message}")
                self.shutdown(graceful=False)
                raise RankError(lost[0], self.world_size, ips[0], f"{message}\n{f.detail}", f.cause,
                                kind="RankLost", message=message, transient=True, ranks=lost, node_ips=ips,
                                node_ids=[self.node_ids[r] for r in lost])
        ip = self.node_ips[rank] if self.node_ips else "?"
        self.shutdown(graceful=False)
        raise RankError(rank, self.world_size, ip, f.detail, f.cause, kind=f.kind, message=f.message,
                        transient=f.transient, user_error=f.user_error, node_ids=self.node_ids[rank:rank + 1])

    def _silent_ranks(self) -> list[int]:
        """Ranks whose heartbeat stopped (their process or node is gone), given a few beats to show it."""
        if not self.watchdog.cfg.enabled or not self.watchdog.seen:
            return []
        deadline = time.monotonic() + 3 * self.watchdog.cfg.beat_s + 1.0
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
            self.watchdog.poll()
        silent = self.watchdog.silent()
        return silent if len(silent) < self.world_size else []

    def _hung(self, ranks: list[int], message: str) -> None:
        ips = [self.node_ips[r] for r in ranks]
        self.shutdown(graceful=False)
        raise RankError(ranks[0], self.world_size, ips[0], message, kind="Hang", message=message, transient=True,
                        ranks=ranks, node_ips=ips, node_ids=[self.node_ids[r] for r in ranks])

    def _timed_out(self, ranks: list[int], timeout_s: float) -> None:
        ips = [self.node_ips[r] for r in ranks] if self.node_ips else ["?" for _ in ranks]
        where = ", ".join(f"rank {r} on {ip}" for r, ip in zip(ranks, ips, strict=True))
        message = (f"{where} did not return within workers.call_timeout_s={timeout_s:g}s; the group was torn "
                   "down. Raise workers.call_timeout_s if the call needs longer, or look for a rank stuck in a "
                   "collective its peers never entered")
        self.shutdown(graceful=False)
        raise RankError(ranks[0], self.world_size, ips[0], message, kind="CallTimeout", message=message,
                        transient=True, ranks=ranks, node_ips=ips,
                        node_ids=[self.node_ids[r] for r in ranks] if self.node_ids else [])

    def shutdown(self, graceful: bool = True) -> None:
        """End the group, then free its placement group. ``graceful`` (the ranks are idle): each rank stops its
        heartbeat thread and destroys its process group, then its actor exits by itself; otherwise (a rank failed,
        peers may be stuck in a collective) the actors are killed. Either way the actors are gone before the
        placement group is removed (rank_actor.end_actors), so a clean run prints no traceback at its end."""
        actors, self.actors = self.actors, []
        if graceful and actors:
            ray.wait([a.teardown.remote() for a in actors], num_returns=len(actors), timeout=30)
        end_actors(actors, graceful, self.pids, self.node_ids)
        if self.pg is not None:
            remove_placement_group(self.pg)
            _wait_removed(self.pg)
            self.pg = None
            self.watchdog.clear()

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=exc[0] is None)


_OWN_FIELDS = {"rank", "world_size", "local_rank", "local_world_size", "node_ip", "device", "backend", "run_dir",
               "attempt", "heartbeat", "stop"}


def _checked_context(context: dict[str, Any]) -> dict[str, Any]:
    """The caller's extra RankContext fields (run_id, resume_from, ...): only fields the group does not set."""
    allowed = {f.name for f in dataclasses.fields(RankContext)} - _OWN_FIELDS
    unknown = sorted(set(context) - allowed)
    if unknown:
        raise ValueError(f"WorkerGroup(context=...) keys {unknown} are not RankContext fields it may set; "
                         f"allowed: {sorted(allowed)}")
    return dict(context)


def _wait_removed(pg, timeout_s: float = 10.0) -> None:
    """Block until Ray records the placement group as removed, so its resources are free again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.util.placement_group_table(pg).get("state") == "REMOVED":
            return
        time.sleep(0.05)


def run_ranks(fn: Callable, num: int, *args: Any, run_dir: str | Path, cpus_per_worker: float = 1.0,
              **kwargs: Any) -> list[Any]:
    """Start a group of ``num`` ranks, call ``fn(ctx, *args, **kwargs)`` on each, tear it down."""
    with WorkerGroup(WorkerConfig(num=num, cpus_per_worker=cpus_per_worker), run_dir) as group:
        return group.run(fn, *args, **kwargs)
