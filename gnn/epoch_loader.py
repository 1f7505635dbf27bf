"""What both epoch loaders share: the EpochLoader interface, each rank's share of an epoch, and the background
thread that makes batches ahead of the caller.

    for epoch in range(epochs):
        for mb, x in loader.epoch(epoch):     # x: (len(mb.n_id), F) rows of mb.n_id
            ...
    loader.stats()      # sample_s, read_s, wait_s, batches, rows_read, bytes_read, host_hit_rate, ...
    loader.close()      # or `with loader:`; stops the thread (also when an epoch is left early)

The loaders (``OnlineLoader`` in gnn/online_loader.py, ``PackedLoader`` in gnn/packed_loader.py) run
``prefetch`` batches ahead on one thread (``prefetch=0``: made on the caller's thread) and give every rank the
same number of batches per epoch: of an epoch's ``B`` batches in order, rank ``r`` takes batches
``r, r + W, ...`` below ``(B // W) * W`` (the tail is dropped), so the ranks' batches are disjoint and DDP steps
match.

``stats()`` (cumulative since construction or ``reset_stats()``): ``batches``, ``sample_s`` and ``read_s``
(seconds the thread spent sampling and reading), ``assemble_s`` (building x), ``wait_s`` (the caller blocked
waiting for a batch), ``rows_read`` / ``bytes_read`` (rows and bytes asked of the store: real disk reads for the
direct-I/O stores and the packs; for an mmap store the bytes of the distinct rows of each request, which the page
cache may serve), ``bytes_needed`` (rows the disk had to give, counting a row once per batch asking for it, x row
bytes: bytes_read / bytes_needed is the read amplification against those rows), ``distinct_rows`` (per epoch, the
distinct rows its batches asked for, summed over epochs) and ``distinct_bytes_needed`` (per epoch, the bytes of the
distinct rows outside a fixed host cache, summed: bytes_read / distinct_bytes_needed is the read amplification
against what the epoch needs from disk at least), ``host_hits``, ``host_rows_read`` and ``host_hit_rate`` per cache
tier.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from plait.gnn.sampler import MiniBatch

_DONE = object()

class EpochLoader(Protocol):
    def epoch(self, epoch: int) -> Iterator[tuple[MiniBatch, torch.Tensor]]: ...

    def stats(self) -> dict: ...

    def reset_stats(self) -> None: ...

    def num_batches(self) -> int: ...

    def close(self) -> None: ...


def rank_batches(order: Sequence[int] | np.ndarray, rank: int, world_size: int) -> list[int]:
    """This rank's share of an epoch's batch ``order``: positions rank, rank + W, ... below (B // W) * W."""
    order = np.asarray(order)
    keep = len(order) // world_size * world_size
    return order[rank:keep:world_size].tolist()


def check_rank(rank: int, world_size: int, num_batches: int, what: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{what}: rank {rank} is not in [0, world_size={world_size})")
    if num_batches < world_size:
        raise ValueError(f"{what}: {num_batches} batches per epoch cannot give each of {world_size} ranks one; "
                         "use a smaller batch_size or fewer ranks")


class Prefetcher:
    """``produce(item)`` for each item on one daemon thread, at most ``depth`` results waiting; iterate to take
    them in order. An exception on the thread is raised to the consumer; ``close()`` stops the thread."""

    def __init__(self, items: list, produce: Callable, depth: int, name: str):
        self.items, self.produce, self.wait_s = items, produce, 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                if self._stop.is_set():
                    return
                if not self._put(self.produce(item)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(_Failure(e))
            return
        self._put(_DONE)

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            value = self._next()
            self.wait_s += time.perf_counter() - t0
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value

    def _next(self):
        while True:
            try:
                return self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError("this epoch's iterator was stopped (a later epoch started or the loader was "
                                       "closed); iterate one epoch at a time") from None

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class LoaderBase:
    """The epoch loop, threads and timing shared by both loaders; subclasses give _order and _produce."""

    prefetch: int
    _name: str

    def __init__(self, prefetch: int, num_rows: int):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.prefetch = int(prefetch)
        self._seen = np.zeros(num_rows, dtype=np.uint8)  # this epoch: 1 = row asked, 2 = and from disk
        self._active: Prefetcher | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.reset_stats()

    def reset_stats(self) -> None:
        self._t = {"sample_s": 0.0, "read_s": 0.0, "assemble_s": 0.0, "wait_s": 0.0, "batches": 0,
                   "distinct_rows": 0, "distinct_bytes_needed": 0}

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self._t[key] += value

    def _count_distinct(self, ids: np.ndarray, disk_ids: np.ndarray, row_bytes: int) -> None:
        """Count the rows ``ids`` (and ``disk_ids``, those of them the disk gives) not yet asked this epoch."""
        seen = self._seen
        new = int(np.count_nonzero(seen[ids] == 0))
        seen[ids] |= 1
        new_disk = int(np.count_nonzero(seen[disk_ids] < 2))
        seen[disk_ids] = 3
        with self._lock:
            self._t["distinct_rows"] += new
            self._t["distinct_bytes_needed"] += new_disk * row_bytes

    def epoch(self, epoch: int) -> Iterator[tuple[MiniBatch, torch.Tensor]]:
        """This rank's batches of ``epoch`` with their features; the thread starts at the first ``next``."""
        if self._closed:
            raise RuntimeError(f"{self._name} is closed; make a new loader")
        return self._iterate(int(epoch))

    def _iterate(self, epoch: int) -> Iterator[tuple[MiniBatch, torch.Tensor]]:
        plan = self._order(epoch)
        self._stop_active()
        self._seen[:] = 0  # distinct rows are counted per epoch
        if self.prefetch == 0:
            for item in plan:
                t0 = time.perf_counter()
                out = self._produce(epoch, item)
                self._add("wait_s", time.perf_counter() - t0)
                self._add("batches", 1)
                yield out
            return
        self._stop_active()
        pf = Prefetcher(plan, lambda item: self._produce(epoch, item), self.prefetch,
                         f"plait-{self._name}-e{epoch}")
        self._active = pf
        counted = 0.0
        try:
            for out in pf:
                self._add("wait_s", pf.wait_s - counted)
                counted = pf.wait_s
                self._add("batches", 1)
                yield out
        finally:
            pf.close()
            self._add("wait_s", pf.wait_s - counted)
            if self._active is pf:
                self._active = None

    def _stop_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop the background thread (if an epoch is running) and release files; idempotent."""
        self._stop_active()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def torch_rows(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows
    rows = np.asarray(rows)
    if not rows.flags.writeable or not rows.flags.c_contiguous:
        rows = np.array(rows)
    return torch.from_numpy(rows)


def epoch_train_loop(ctx, t, per_epoch: int, model: torch.nn.Module, optimizer, **meta):
    """The one training loop (runtime/trainer.py) over ``t.epochs`` epochs of ``per_epoch`` batches, an epoch a
    boundary: checkpoints (and a stop request) land at epoch ends, and a resume starts an epoch (its batches depend
    on the ranks, so the epoch is stored, with ``meta``). Both GNN tasks (node, link) drive it."""
    from plait.runtime.checkpoint import ModelOptimizer
    from plait.runtime.trainer import TrainLoop

    return TrainLoop(ctx, t, total=t.epochs * per_epoch, state=ModelOptimizer([model], [optimizer]),
                     boundary=per_epoch, meta=lambda done: {"epoch": done // per_epoch, "loader": t.loader, **meta},
                     resume_step=lambda saved: int(saved["epoch"]) * per_epoch, schedule_follows_total=False)
