"""Versioned weight sync by a torch.distributed broadcast over a group of the trainer's rank 0 and the generators.

    # trainer rank 0 (its own default process group is untouched):
    server = WeightServer(host="127.0.0.1", device=torch.device("cpu"), timeout_s=60)
    server.update(unsharded_parameters(parts), version=k)           # after every optimizer step
    server.address                                                  # (host, port) of its TCPStore
    # generator j (1..G), when the driver runs a sync round n for group epoch e of G + 1 members:
    receiver = WeightReceiver(server.address, device, timeout_s=60)
    version = receiver.receive(model, round_id=n, epoch=e, rank=j, size=G + 1, version=k)

The group is standalone (what vLLM's StatelessProcessGroup and veRL build): a TCPStore hosted by trainer
rank 0, and for each epoch a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA) over
``PrefixStore("epoch<e>/", store)``, rank 0 the trainer, ranks 1..G the generators. It is separate from the
trainer's own process group and from any default group, so a generator needs none.

Protocol (no one waits for a collective the other side never joins): the driver runs a *round* only when
every generator is idle (``plait.rl.rl_job``: no new work is issued while a generator holds an older version
than the newest, the AReaL / veRL "pause rollouts, sync, resume" step). It calls ``receive`` on every
generator; each writes the key ``round/<n>`` = "<epoch> <size> <version>" into the store. The server's
thread waits for ``round/<n>`` (n = 1, 2, ... in order), then broadcasts the version number, then the flat
parameter buffer of that version (it keeps the newest two; when the one asked for is gone, because the
driver had not collected the steps queued after it, the newest goes, and the receiver reports that version)
in buckets of ``bucket_mb`` (names, shapes, dtype and bucket size fixed at the first
update and checked by every receiver against its model). A receiver holds one bucket besides its model and
copies each into the parameters it covers, so a sync never needs a second copy of the model's memory.
The trainer is never blocked: the thread broadcasts a snapshot taken by ``update`` while the next step
trains. Each version crosses the wire once per round, whatever G is.

Failures: every collective has the group's timeout (``timeout_s``). A generator that dies mid-round makes
the others' and the server's broadcast fail after it; the server drops that group and waits for the next
round, and the driver bumps the epoch after any replaced generator or failed round, so the next round
builds a fresh group with the new member. A dead trainer ends the job (the runtime restarts it).

A LoRA policy broadcasts its adapters only (the receiver's ``synced`` names; the layout both sides agree on
is theirs): the frozen base weights are read from the model folder on each side, never sent.
"""

from __future__ import annotations

import datetime
import json
import threading

import torch
from plait.rl.weights import synced_parameters
from plait.runtime.actor_pool import ActorCallError, ActorLost
from torch import nn


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _group(store, epoch: int, rank: int, size: int, device: torch.device, timeout_s: float):
    """A standalone process group of ``size`` members for ``epoch`` (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    prefixed = dist.PrefixStore(f"epoch{epoch}/", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timeout(timeout_s)
        return dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    return dist.ProcessGroupGloo(prefixed, rank, size, _timeout(timeout_s))


def _broadcast(pg, tensor: torch.Tensor) -> None:
    """``tensor`` from member 0 to every member, in place; raises after the group's timeout."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    pg.broadcast([tensor], opts).wait()


def layout(params: dict[str, torch.Tensor]) -> list[list]:
    """What both sides agree on once: [name, shape] in order (one dtype for the whole buffer)."""
    return [[name, list(t.shape)] for name, t in params.items()]


class WeightServer:
    """Trainer rank 0's side: hosts the store and broadcasts the newest version when a round asks for it."""

    def __init__(self, host: str = "127.0.0.1", device: torch.device | None = None, timeout_s: float = 60.0,
                 bucket_mb: float = 64.0):
        import torch.distributed as dist

        if bucket_mb <= 0:
            raise ValueError(f"rl.weight_sync_bucket_mb={bucket_mb}: a bucket needs a positive size")
        self.device, self.timeout_s, self.bucket_bytes = device or torch.device("cpu"), timeout_s, bucket_mb * 2**20
        self.bucket = 0  # elements per bucket, fixed with the layout at the first update
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=_timeout(timeout_s))
        self.address = (host, int(self.store.port))
        self.version, self.snapshots, self._layout = -1, {}, None  # the newest two versions' flat buffers
        self.rounds_served, self.rounds_failed, self.errors = 0, 0, []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._epoch, self._pg = -1, None
        self._thread = threading.Thread(target=self._serve, name="weight-broadcast", daemon=True)
        self._thread.start()

    def update(self, params: dict[str, torch.Tensor], version: int) -> int:
        """Snapshot ``params`` (clean names -> full tensors) as ``version``; returns its size in bytes."""
        if version <= self.version:
            raise ValueError(f"weight version {version} after version {self.version}: versions only grow")
        dtypes = {t.dtype for t in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"broadcast weight sync sends one flat buffer of one dtype; the parameters have {dtypes}:"
                             " use rl.weight_sync = 'object_store' for mixed dtypes")
        flat = torch.cat([t.detach().reshape(-1) for t in params.values()]).to(self.device)
        shape = layout(params)
        with self._lock:
            if self._layout is None:
                self._layout, self.bucket = shape, max(1, int(self.bucket_bytes // flat.element_size()))
                self.store.set("layout", json.dumps({"layout": shape, "dtype": str(flat.dtype),
                                                     "bucket": self.bucket}))
            elif shape != self._layout:
                raise ValueError("the parameter layout changed between versions; it is agreed once at setup")
            self.version, self.snapshots = version, {v: f for v, f in self.snapshots.items() if v == self.version}
            self.snapshots[version] = flat
        return flat.numel() * flat.element_size()

    def _serve(self) -> None:
        n = 1
        while not self._stop.is_set():
            if not self.store.check([f"round/{n}"]):  # polled: a blocking wait cannot see the stop flag
                self._stop.wait(0.005)
                continue
            try:
                epoch, size, asked = map(int, self.store.get(f"round/{n}").decode().split())
                with self._lock:
                    version = asked if asked in self.snapshots else self.version
                    flat = self.snapshots[version]
                if epoch != self._epoch:
                    self._pg, self._epoch = _group(self.store, epoch, 0, size, self.device, self.timeout_s), epoch
                _broadcast(self._pg, torch.tensor([version], dtype=torch.int64, device=self.device))
                for lo in range(0, flat.numel(), self.bucket):
                    _broadcast(self._pg, flat[lo:lo + self.bucket])
                self.rounds_served += 1
            except Exception as e:  # noqa: BLE001 - a member died: drop the group, the driver bumps the epoch
                self.rounds_failed += 1
                self.errors.append(f"round {n}: {type(e).__name__}: {e}"[:300])
                self._pg, self._epoch = None, -1
            n += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class WeightReceiver:
    """A generator's side: joins round ``n``'s broadcast and loads the version it receives into a model."""

    def __init__(self, address: tuple[str, int], device: torch.device | None = None, timeout_s: float = 60.0,
                 synced=None):
        """``synced``: which of the model's parameters the trainer broadcasts (by name; None: all of them, a LoRA
        policy: its adapters, ``plait.models.lora.synced_names``)."""
        import torch.distributed as dist

        self.device, self.timeout_s, self.synced = device or torch.device("cpu"), timeout_s, synced
        self.store = dist.TCPStore(address[0], int(address[1]), is_master=False, timeout=_timeout(timeout_s))
        self._epoch, self._pg, self._layout, self._dtype = -1, None, None, None

    def _agree(self, model: nn.Module) -> None:
        meta = json.loads(self.store.get("layout").decode())  # blocks until the trainer's first update
        own = layout(synced_parameters(model, self.synced))
        if meta["layout"] != own:
            theirs = {n: s for n, s in meta["layout"]}
            diff = [(n, theirs.get(n), s) for n, s in own if theirs.get(n) != s][:3]
            raise ValueError(f"the trainer broadcasts a different parameter layout than this generator's model "
                             f"(name, trainer shape, generator shape): {diff}. Build both from the same [model]")
        self._layout, self._dtype = own, getattr(torch, meta["dtype"].removeprefix("torch."))
        self.bucket = int(meta["bucket"])

    def receive(self, model: nn.Module, round_id: int, epoch: int, rank: int, size: int, version: int) -> int:
        """Join round ``round_id`` as member ``rank`` of ``size``; load weight ``version`` (the server's newest
        if it no longer holds that one); return the version loaded."""
        if self._layout is None:
            self._agree(model)
        self.store.set(f"round/{round_id}", f"{epoch} {size} {version}")
        try:
            if epoch != self._epoch:
                self._pg, self._epoch = _group(self.store, epoch, rank, size, self.device, self.timeout_s), epoch
            got = torch.zeros(1, dtype=torch.int64, device=self.device)
            _broadcast(self._pg, got)
            params = [p.detach() for p in synced_parameters(model, self.synced).values()]
            total = sum(p.numel() for p in params)
            buf = torch.empty(min(self.bucket, total), dtype=self._dtype, device=self.device)
            for lo in range(0, total, self.bucket):
                chunk = buf[:min(self.bucket, total - lo)]
                _broadcast(self._pg, chunk)
                _scatter(chunk, lo, params)
        except Exception:
            self._pg, self._epoch = None, -1  # the group is broken: the next round builds the next epoch's
            raise
        return int(got.item())


@torch.no_grad()
def _scatter(chunk: torch.Tensor, lo: int, params: list[torch.Tensor]) -> None:
    """Copy ``chunk`` (elements lo .. lo + len of the parameters laid end to end) into the parameters."""
    hi, offset = lo + chunk.numel(), 0
    for p in params:
        start, end = max(lo, offset), min(hi, offset + p.numel())
        if start < end:
            p.view(-1)[start - offset:end - offset].copy_(chunk[start - lo:end - lo])
        offset += p.numel()
        if offset >= hi:
            break


def sync_round(pool, address: tuple[str, int], version: int, held: list[int], sync: dict, timeout_s: float) -> None:
    """The driver's side: every generator of ``pool`` (all idle; ``Generator.sync_weights``) joins round
    ``sync["round"] + 1`` of group epoch ``sync["epoch"]`` and loads ``version`` from trainer rank 0; ``held``
    (per slot) gets the versions loaded. A round with a dead or failing member bumps the epoch
    (the next round builds a fresh group) and replaces the dead; its survivors return after the timeout.
    Three failed rounds in a row raise (the store is unreachable, or the trainer's server is gone)."""
    sync["round"] += 1
    try:
        held[:] = pool.call_all("sync_weights", address, sync["round"], sync["epoch"], len(pool.actors) + 1, version,
                                timeout_s)
        sync["in_a_row"] = 0
    except (ActorLost, ActorCallError) as e:
        sync["failed"] += 1
        sync["in_a_row"] = sync.get("in_a_row", 0) + 1
        if sync["in_a_row"] >= 3:
            raise RuntimeError(f"broadcast weight sync failed {sync['in_a_row']} rounds in a row (last: {e}); is "
                               f"trainer rank 0's store at {address[0]}:{address[1]} reachable from the generators? "
                               "Set rl.weight_sync_host to an address they reach, or use rl.weight_sync="
                               "'object_store'") from e
        sync["epoch"] += 1
        held[:] = [-1] * len(held)
        for i, actor in enumerate(pool.actors):
            if actor is None:
                pool.replace(i)
