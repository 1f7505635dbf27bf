"""One rank of a worker group: a Ray actor that owns a torch.distributed process group.

The driver (runtime/worker_group.py) places the actors, asks rank 0 to open the rendezvous store,
then calls ``setup`` on every rank and ``run`` for each job call. A rank may also hold one user
object (``start`` builds it, ``call`` calls its methods), so state lives between calls. The same
actor, without ``setup``, is one slot of an ``ActorPool`` (runtime/actor_pool.py).

A failure inside the actor comes back as ``RemoteFailure``: its kind, its one-line message, its
traceback, and whether a restart can fix it (``classify``), decided here where the real exception
object is. On the driver, ``Failure.of`` reads any Ray error of a call back into those terms.
"""

from __future__ import annotations

import importlib
import os
import re
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import ray
from plait.runtime.context import RankContext
from plait.runtime.rank_setup import Placement, Rendezvous, setup_rank
from plait.runtime.watchdog import Heartbeat

# What gloo (and NCCL through RuntimeError) says when a peer process went away mid-collective.
_PEER_GONE = re.compile(r"(closed|reset) by peer|broken pipe", re.IGNORECASE)


def classify(exc: BaseException) -> tuple[str, str, bool, bool]:
    """``(kind, message, transient, user_error)`` of an exception raised on a rank.

    Transient (a restart can fix it): communication and timeout errors (torch.distributed.DistError
    and subclasses, ConnectionError, TimeoutError, a RuntimeError saying a peer closed or reset the
    connection) and anything carrying ``transient = True``. Anything else would fail the same way
    again (bad input, a corrupt file, an import or config error, a bug), and so does an exception
    carrying ``transient = False``. ``user_error``: the exception's class says its message names the
    bad input and the fix (``user_error = True``): the CLI prints that one line and exits 2. Such an
    error is never transient unless the class says so.
    """
    import torch.distributed as dist

    kind, message = type(exc).__name__, str(exc)
    user_error = getattr(exc, "user_error", False) is True
    flag = getattr(exc, "transient", None)
    if isinstance(flag, bool):
        return kind, message, flag, user_error
    if user_error:
        return kind, message, False, True
    if isinstance(exc, (dist.DistError, ConnectionError, TimeoutError)):
        return kind, message, True, False
    return kind, message, isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(message)), False


class RemoteFailure(Exception):
    """An exception raised on a rank, reduced to plain strings so it always reaches the driver."""

    def __init__(self, kind: str, message: str, transient: bool, user_error: bool, tb: str):
        super().__init__(kind, message, transient, user_error, tb)
        self.kind, self.message, self.transient, self.user_error, self.tb = kind, message, transient, user_error, tb

    @classmethod
    def of(cls, exc: BaseException) -> "RemoteFailure":
        return cls(*classify(exc), "".join(traceback.format_exception(exc)))

    def __str__(self) -> str:
        return self.tb


@dataclass
class Failure:
    """What a call's Ray error means, read on the driver."""

    kind: str
    message: str
    transient: bool
    user_error: bool  # the message names the bad input and the fix (the exception class's ``user_error``)
    detail: str  # what the user reads: the remote traceback, or what happened to the process
    cause: BaseException | None
    died: bool = False  # the actor's process (or node) is gone

    @property
    def priority(self) -> int:
        """Lower is more informative: a real error, then a dead process, then a peer's communication error."""
        return 0 if not self.transient else 1 if self.died else 2

    @classmethod
    def of(cls, e: ray.exceptions.RayError) -> "Failure":
        if isinstance(e, ray.exceptions.RayTaskError):
            cause = e.cause
            if isinstance(cause, RemoteFailure):
                return cls(cause.kind, cause.message, cause.transient, cause.user_error, cause.tb, cause)
            inner = getattr(cause, "client_exc", None)  # e.g. the actor could not unpickle (import) the function
            return cls(*classify(inner if isinstance(inner, BaseException) else cause or e), str(e), cause)
        if isinstance(e, ray.exceptions.RuntimeEnvSetupError):  # the actor's environment cannot be built
            return cls(type(e).__name__, str(e), False, False, str(e), e)
        died = isinstance(e, ray.exceptions.RayActorError)
        detail = f"the actor's process died: {e}" if died else str(e)
        return cls(type(e).__name__, detail, True, False, detail, e, died=died)


def resolve_factory(factory: Callable | str) -> Callable:
    """A class or factory, or its ``"module:qualname"`` name, imported here (after ``install_modules``)."""
    if not isinstance(factory, str):
        return factory
    module_name, sep, qualname = factory.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"factory name {factory!r}: write it as 'module:QualName', e.g. 'my_job:Generator'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def node_ip() -> str:
    """The address this node registered with Ray (127.0.0.1 for the embedded cluster)."""
    try:
        return ray._private.worker.global_worker.node_ip_address  # noqa: SLF001
    except AttributeError:
        return ray.util.get_node_ip_address()


def install_modules(code: dict[str, tuple[str, str]]) -> None:
    """Make the driver's local job modules importable here: ``{name: (file path, source)}``. Functions
    of such a module then unpickle by reference, as if the file existed on this node."""
    import importlib.util
    import sys

    for name, (path, source) in code.items():
        if name in sys.modules:
            continue
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, origin=path))
        module.__file__ = path
        sys.modules[name] = module
        exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - the user's own job code


@ray.remote
class RankActor:
    """One rank. Owns its torch.distributed process group (and, on rank 0, the rendezvous store)."""

    def __init__(self, threads: int, code: dict[str, tuple[str, str]] | None = None):
        import torch

        torch.set_num_threads(threads)
        install_modules(code or {})
        self.ctx: RankContext | None = None
        self.store = None
        self.obj: Any = None  # the user's object, built by start()
        self.heartbeat: Heartbeat | None = None  # set up with the rank (setup's ``heartbeat``)

    def pid(self) -> int:
        return os.getpid()

    def node_info(self) -> tuple[str, str, int]:
        """``(node ip, Ray node id, pid)``: the id tells nodes apart even when they share an ip."""
        return node_ip(), ray.get_runtime_context().get_node_id(), os.getpid()

    def open_rendezvous(self, loopback: bool, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Start the rendezvous store on a port the OS picks; it stays bound, so no other group can take it."""
        import torch.distributed as dist

        host = "127.0.0.1" if loopback else node_ip()
        try:
            self.store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=timeout_s))
        except BaseException as e:
            raise RemoteFailure.of(e) from None
        return host, self.store.port

    def setup(self, fields: dict, master: tuple[str, int], timeout_s: float,
              heartbeat: tuple[str | None, float, str | None] | None = None) -> str:
        """Join the process group. ``heartbeat``: ``(key, beat_s, stop_key)``: publish step progress under ``key``
        (None: not watched) and look for a stop request under ``stop_key`` (None: none can come) every ``beat_s``
        (runtime/watchdog.py, runtime/stop.py); None for neither."""
        try:
            stop = None
            if heartbeat is not None:
                key, beat_s, stop_key = heartbeat
                self.heartbeat = Heartbeat(key, fields["rank"], ray.get_runtime_context().get_node_id(), beat_s,
                                           stop_key)
                self.heartbeat.start()
                stop = self.heartbeat.stop_flag if stop_key is not None else None
            return self._setup(dict(fields, heartbeat=self.heartbeat, stop=stop), master, timeout_s)
        except BaseException as e:
            raise RemoteFailure.of(e) from None

    def _watch(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.watch()

    def _setup(self, fields: dict, master: tuple[str, int], timeout_s: float) -> str:
        import torch

        gpus = ray.get_gpu_ids()
        if gpus and not torch.cuda.is_available():
            raise RuntimeError(
                f"rank {fields['rank']} on node {fields['node_ip']} was given GPU {gpus} but torch "
                f"{torch.__version__} there cannot use CUDA (a CPU build of torch, or no driver): install CUDA "
                "torch on that node, or set workers.gpus_per_worker=0 to run the ranks on CPU"
            )
        fields = dict(fields)
        placement = Placement(*(fields.pop(k) for k in ("rank", "world_size", "local_rank", "local_world_size",
                                                          "node_ip")), launcher="ray")
        # Rank 0 holds the store it opened; the others join it at master.
        rendezvous = Rendezvous(*master, store=self.store if placement.rank == 0 else None)
        # Ray shows this actor only its own GPU(s) (CUDA_VISIBLE_DEVICES): setup_rank picks cuda:0.
        self.ctx = setup_rank(placement, rendezvous, use_gpu=bool(gpus), timeout_s=timeout_s, **fields)
        return self.ctx.backend

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        self._watch()
        try:
            return fn(self.ctx, *args, **kwargs)
        except BaseException as e:  # keep the remote traceback readable in the driver
            raise RemoteFailure.of(e) from None

    def start(self, factory: Callable | str, args: tuple, kwargs: dict, with_context: bool = True) -> None:
        """Build the user's object: ``factory(ctx, *args, **kwargs)`` on a rank, ``factory(*args, **kwargs)``
        in a pool. Its class arrives here with this call, after ``__init__`` installed the job's code."""
        self._watch()
        try:
            factory = resolve_factory(factory)
            self.obj = factory(self.ctx, *args, **kwargs) if with_context else factory(*args, **kwargs)
        except BaseException as e:
            raise RemoteFailure.of(e) from None

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """``obj.method(*args, **kwargs)`` on the object ``start`` built."""
        self._watch()
        try:
            if self.obj is None:
                raise RuntimeError(f"no object to call {method!r} on: start(cls) must build it first")
            bound = getattr(self.obj, method, None)
            if not callable(bound):
                raise AttributeError(f"{type(self.obj).__name__} has no method {method!r}")
            return bound(*args, **kwargs)
        except BaseException as e:
            raise RemoteFailure.of(e) from None

    def teardown(self) -> None:
        """Before the actor exits: stop the heartbeat thread, leave the process group, close the store."""
        import torch.distributed as dist

        if self.heartbeat is not None:
            self.heartbeat.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = None
        self.obj = None


EXIT_WAIT_S = 10.0  # how long ending actors may take before they are killed (graceful) or given up on


def end_actors(actors: list, graceful: bool | list[bool] = True, pids: list[int] | None = None,
               node_ids: list[str] | None = None, wait_s: float = EXIT_WAIT_S) -> None:
    """End actors so that none is still exiting when its resources are taken back (a placement group removed, the
    Ray cluster shut down): Ray signals a worker it still counts as running, and a SIGTERM that lands while Python
    finalizes prints "Exception ignored ... SystemExit" or aborts the process. ``graceful`` (for all, or per
    actor): the actor is idle and exits by itself (Ray's ``__ray_terminate__``), waited for up to ``wait_s``; the
    rest (busy ones: peers stuck in a collective, calls being dropped) are killed. Then, up to ``wait_s``, until
    Ray records every one dead and the processes on this node (``pids`` on ``node_ids``) are gone."""
    if not actors:
        return
    polite = graceful if isinstance(graceful, list) else [graceful] * len(actors)
    exits = {i: a.__ray_terminate__.remote() for i, a in enumerate(actors) if polite[i]}
    done, _ = ray.wait(list(exits.values()), num_returns=len(exits), timeout=wait_s) if exits else ([], [])
    left = [i for i in range(len(actors)) if i not in exits or exits[i] not in done]
    for i in left:
        ray.kill(actors[i], no_restart=True)
    deadline = time.monotonic() + wait_s
    _wait_recorded_dead(actors, deadline)
    here = ray.get_runtime_context().get_node_id()
    pids, node_ids = pids or [], node_ids or []
    _wait_exited([pid for pid, node in zip(pids, node_ids, strict=False) if pid and node == here], deadline)


def _wait_recorded_dead(actors: list, deadline: float) -> None:
    from ray._private import state  # noqa: PLC0415 - the GCS's actor table (no dashboard needed)

    waiting = [a._actor_id.hex() for a in actors]  # noqa: SLF001 - the handle's id, as Ray's own tools read it
    while waiting and time.monotonic() < deadline:
        waiting = [i for i in waiting if (state.actors(actor_id=i) or {}).get("State") != "DEAD"]
        if waiting:
            time.sleep(0.05)


def _wait_exited(pids: list[int], deadline: float) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
