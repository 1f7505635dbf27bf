"""An actor pool: N stateful actors of one user class, outside any torch.distributed group.

    pool = ActorPool(Generator, 3, args=(cfg,), per_actor_args=[(0,), (1,), (2,)], cpus=1, name="generator")
    for i in range(len(pool)):
        pool.submit(i, "generate", prompts[i], tag=("batch", i))    # returns an ObjectRef at once
    while pool.in_flight():
        try:
            i, tag, rollout = pool.next_done()                      # whichever call finishes first
        except ActorLost as e:                                      # its process died (a real kill, OOM, lost node)
            pool.replace(e.index)                                   # a fresh Generator(cfg, e.index) in its slot
            pool.resubmit(e.lost)                                   # the calls it took with it
    pool.shutdown()

Each slot is a Ray actor (runtime/rank_actor.py's ``RankActor``, never set up as a rank) holding one
``cls(*args, *per_actor_args[i], **kwargs)``. The class travels with the ``start`` call, after the
actor's ``__init__`` installed the job's local modules (``code``), so a class defined in a job
module that exists only on the driver works, passed as an object or as ``"module:QualName"``.

Failures, one actor at a time, never touching the others or any worker group:
- the process died (``ActorLost``): every call in flight on it is reported lost (``lost``), the
  slot is dead until ``replace(i)``, which restarts it with its constructor arguments, at most
  ``max_restarts`` times per slot (then ``RestartLimitError``);
- the method raised (``ActorCallError``: index, method, kind, message, remote traceback): the actor
  lives on and nothing is retried, since a bug would repeat.
Not thread-safe: drive a pool from one thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import ray
from plait.runtime.rank_actor import Failure, RankActor, end_actors
from plait.runtime.worker_group import PlacementError


class Done(NamedTuple):
    """A finished call: ``i, tag, value = pool.next_done()``."""

    index: int  # the actor slot that ran it
    tag: Any  # what submit(tag=...) was given (default: the method name)
    value: Any


@dataclass
class Call:
    """A call in flight, with what it takes to submit it again."""

    index: int
    method: str
    args: tuple
    kwargs: dict
    tag: Any
    ref: ray.ObjectRef = field(repr=False)


class ActorLost(RuntimeError):
    """Actor ``index``'s process died; ``lost`` holds every call that was in flight on it."""

    def __init__(self, name: str, index: int, lost: list[Call], detail: str):
        self.name, self.index, self.lost, self.detail = name, index, lost, detail
        calls = ", ".join(f"{c.method}(tag={c.tag!r})" for c in lost) or "none"
        super().__init__(f"{name} actor {index} died; calls lost: {calls}. pool.replace({index}) starts a fresh one, "
                         f"pool.resubmit(err.lost) sends the lost calls again. Cause: {detail}")


class ActorCallError(RuntimeError):
    """A method raised on actor ``index`` (the actor lives on; nothing was retried)."""

    def __init__(self, name: str, index: int, method: str, f: Failure):
        self.name, self.index, self.method = name, index, method
        self.kind, self.message, self.transient, self.remote_traceback = f.kind, f.message, f.transient, f.detail
        self.user_error = f.user_error
        super().__init__(f"{name} actor {index}: {method} raised {f.kind}: {f.message}\n{f.detail}")


class RestartLimitError(RuntimeError):
    """``replace(i)`` was asked for more than ``max_restarts`` replacements of slot i."""


class ActorPool:
    def __init__(self, cls: type | Callable | str, num: int, *, args: tuple = (), kwargs: dict | None = None,
                 per_actor_args: Sequence[tuple] | None = None, cpus: float = 1.0, gpus: float = 0.0,
                 env: dict[str, str] | None = None, code: dict[str, tuple[str, str]] | None = None,
                 name: str = "actor", max_restarts: int = 0, max_concurrency: int = 1, threads: int = 0,
                 strategy: str = "DEFAULT", placement_timeout_s: float = 60.0):
        """``cls``: a class (or factory) or its ``"module:QualName"``; slot i holds
        ``cls(*args, *per_actor_args[i], **kwargs)``. ``cpus``/``gpus``: Ray resources of each actor.
        ``env``: environment variables. ``code``: the job's local modules ({name: (path, source)}).
        ``max_concurrency`` > 1 lets an actor run that many calls at once (threads). ``threads``: torch
        intra-op threads (0 = max(1, int(cpus))). ``strategy``: "DEFAULT" (Ray packs) or "SPREAD" (across
        nodes). ``placement_timeout_s``: how long to wait for resources."""
        if num < 1:
            raise ValueError(f"ActorPool({name!r}, num={num}): need at least one actor")
        if per_actor_args is not None and (len(per_actor_args) != num or
                                           not all(isinstance(r, (tuple, list)) for r in per_actor_args)):
            raise ValueError(f"per_actor_args must hold one tuple of arguments per actor ({num}), got "
                             f"{str(per_actor_args)[:200]}")
        if max_restarts < 0 or cpus < 0 or gpus < 0 or max_concurrency < 1:
            raise ValueError(f"ActorPool({name!r}): max_restarts={max_restarts}, cpus={cpus}, gpus={gpus} must be "
                             f">= 0 and max_concurrency={max_concurrency} >= 1")
        if strategy not in ("DEFAULT", "SPREAD"):
            raise ValueError(f"ActorPool({name!r}, strategy={strategy!r}): choose DEFAULT or SPREAD")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call plait.runtime.connect() first")
        self.cls, self.name, self.max_restarts = cls, name, max_restarts
        self._ctor = [(tuple(args) + tuple(row), dict(kwargs or {})) for row in (per_actor_args or [()] * num)]
        self._check_capacity(num, cpus, gpus)
        hide_gpus = {} if gpus else {"CUDA_VISIBLE_DEVICES": ""}
        threads = threads or max(1, int(cpus))
        env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **hide_gpus, **(env or {})}
        self._options = dict(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env},
                             max_concurrency=max_concurrency, max_restarts=0, scheduling_strategy=strategy)
        self._threads, self._code, self._timeout_s = threads, code or {}, placement_timeout_s
        self.actors: list = [None] * num
        self.pids: list[int] = [0] * num  # each actor's process id (its slot's current one)
        self.node_ids: list[str] = [""] * num  # the Ray node each runs on
        self.restarts = [0] * num  # replacements per slot
        self._calls: dict[ray.ObjectRef, Call] = {}
        try:
            self._start(list(range(num)))
        except BaseException:
            self.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def _check_capacity(self, num: int, cpus: float, gpus: float) -> None:
        total = ray.cluster_resources()
        for res, each in (("CPU", cpus), ("GPU", gpus)):
            if num * each > total.get(res, 0):
                raise PlacementError(f"{self.name} pool: {num} actors x {each:g} {res} need {num * each:g} {res}, "
                                     f"but the Ray cluster has {total.get(res, 0):g}: ask for fewer actors or less "
                                     f"{res} each (cpus=..., gpus=...)")

    def _start(self, slots: list[int]) -> None:
        """Start the actors of ``slots``, wait until each runs, then build their objects."""
        for i in slots:
            self.actors[i] = RankActor.options(**self._options).remote(self._threads, self._code)
        pids = [self.actors[i].node_info.remote() for i in slots]
        ready, _ = ray.wait(pids, num_returns=len(pids), timeout=self._timeout_s)
        if len(ready) < len(pids):
            raise PlacementError(
                f"could not start {len(pids)} {self.name} actor(s) of {self._options['num_cpus']:g} CPU, "
                f"{self._options['num_gpus']:g} GPU within {self._timeout_s:g}s; available now: "
                f"{ray.available_resources()}. Other actors hold the rest: free them, or ask for less")
        starts = [self.actors[i].start.remote(self.cls, *self._ctor[i], False) for i in slots]
        for i, pid_ref, start_ref in zip(slots, pids, starts, strict=True):
            try:
                _, self.node_ids[i], self.pids[i] = ray.get(pid_ref)
                ray.get(start_ref)
            except ray.exceptions.RayError as e:  # the constructor (or the job's code) failed: it would again
                self._kill(i)
                raise ActorCallError(self.name, i, "__init__", Failure.of(e)) from None

    def submit(self, i: int, method: str, *args: Any, tag: Any = None, **kwargs: Any) -> ray.ObjectRef:
        """Call ``obj.method(*args, **kwargs)`` on actor ``i``; returns its ref at once. ``tag`` (default: the
        method name) comes back with the result from ``next_done``/``as_completed``."""
        if not 0 <= i < len(self.actors):
            raise IndexError(f"{self.name} pool has actors 0..{len(self.actors) - 1}, not {i}")
        if self.actors[i] is None:
            raise RuntimeError(f"{self.name} actor {i} is dead: call pool.replace({i}) before submitting to it")
        ref = self.actors[i].call.remote(method, args, kwargs)
        self._calls[ref] = Call(i, method, args, kwargs, method if tag is None else tag, ref)
        return ref

    def resubmit(self, calls: Iterable[Call], index: int | None = None) -> list[ray.ObjectRef]:
        """Send calls again (e.g. ``ActorLost.lost``), each to its own slot or to ``index``."""
        return [self.submit(c.index if index is None else index, c.method, *c.args, tag=c.tag, **c.kwargs)
                for c in calls]

    def call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """``submit`` and wait for its result."""
        return self._collect(self.submit(i, method, *args, **kwargs)).value

    def call_all(self, method: str, *args: Any, per_actor_args: Sequence[tuple] | None = None,
                 **kwargs: Any) -> list[Any]:
        """``obj.method(*args, *per_actor_args[i], **kwargs)`` on every actor; results in actor order. Every
        call runs to its end; then the first failure (by actor index) is raised."""
        rows = per_actor_args if per_actor_args is not None else [()] * len(self.actors)
        if len(rows) != len(self.actors):
            raise ValueError(f"per_actor_args has {len(rows)} entries for {len(self.actors)} {self.name} actors")
        refs = [self.submit(i, method, *args, *row, **kwargs) for i, row in enumerate(rows)]
        ray.wait(refs, num_returns=len(refs))
        results, errors = [], []
        for ref in refs:
            try:
                results.append(self._collect(ref).value)
            except (ActorLost, ActorCallError) as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return results

    def in_flight(self, i: int | None = None) -> list[Call]:
        """The calls submitted and not yet collected (on actor ``i``, or all), oldest first."""
        return [c for c in self._calls.values() if i is None or c.index == i]

    def next_done(self, timeout_s: float | None = None) -> Done | None:
        """The next call in flight to finish, as ``(index, tag, value)``; None if none finished within
        ``timeout_s`` (None: wait as long as it takes). Raises ``ActorLost`` / ``ActorCallError``."""
        if not self._calls:
            raise RuntimeError(f"{self.name} pool: no call in flight to wait for; submit one first")
        done, _ = ray.wait(list(self._calls), num_returns=1, timeout=timeout_s)
        return self._collect(done[0]) if done else None

    def as_completed(self, refs: Iterable[ray.ObjectRef] | None = None,
                     timeout_s: float | None = None) -> Iterator[Done]:
        """Yield ``(index, tag, value)`` for ``refs`` (default: every call in flight) as each finishes.
        Raises ``ActorLost`` / ``ActorCallError`` at the failed call, and TimeoutError when none of the
        rest finishes within ``timeout_s``; calls not yet yielded stay in ``in_flight()``."""
        pending = list(self._calls) if refs is None else list(refs)
        unknown = [r for r in pending if r not in self._calls]
        if unknown:
            raise ValueError(f"{len(unknown)} ref(s) are not calls in flight on the {self.name} pool (collected "
                             "already, lost with their actor, or from another pool)")
        while pending:
            pending = [r for r in pending if r in self._calls]  # calls lost with their actor are gone
            if not pending:
                return
            done, _ = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not done:
                running = ", ".join(f"{c.method} on actor {c.index}" for c in map(self._calls.get, pending))
                raise TimeoutError(f"{self.name} pool: nothing finished within {timeout_s:g}s; running: {running}")
            pending.remove(done[0])
            yield self._collect(done[0])

    def _collect(self, ref: ray.ObjectRef) -> Done:
        c = self._calls.pop(ref)
        try:
            return Done(c.index, c.tag, ray.get(ref))
        except ray.exceptions.RayError as e:
            f = Failure.of(e)
            if not f.died:
                raise ActorCallError(self.name, c.index, c.method, f) from None
            lost = [c] + self._drop(c.index)
            self._kill(c.index)
            raise ActorLost(self.name, c.index, lost, f.detail) from None

    def _drop(self, i: int) -> list[Call]:
        lost = self.in_flight(i)
        for c in lost:
            del self._calls[c.ref]
        return lost

    def replace(self, i: int) -> list[Call]:
        """Start a fresh actor in slot ``i`` with its constructor arguments (a live one is killed first);
        returns the calls that were still in flight on the old one. Refused beyond ``max_restarts``."""
        if not 0 <= i < len(self.actors):
            raise IndexError(f"{self.name} pool has actors 0..{len(self.actors) - 1}, not {i}")
        if self.restarts[i] >= self.max_restarts:
            raise RestartLimitError(
                f"{self.name} actor {i} was replaced {self.restarts[i]} time(s) already, the pool's max_restarts="
                f"{self.max_restarts}: raise max_restarts, or find out why it keeps dying (see its log under "
                "the run directory's ray_logs)")
        lost = self._drop(i)
        self._kill(i)
        self.restarts[i] += 1
        self._start([i])
        return lost

    def _kill(self, i: int) -> None:
        if self.actors[i] is not None:
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = None

    def shutdown(self, graceful: bool = True) -> None:
        """End every actor; calls in flight are dropped. ``graceful``: an idle actor exits by itself, one with a
        call in flight is killed; otherwise all are killed. Either way they are gone when this returns."""
        busy = {c.index for c in self._calls.values()}
        self._calls.clear()
        live = [i for i, a in enumerate(self.actors) if a is not None]
        end_actors([self.actors[i] for i in live], [graceful and i not in busy for i in live],
                   [self.pids[i] for i in live], [self.node_ids[i] for i in live])
        self.actors = [None] * len(self.actors)

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=exc[0] is None)
