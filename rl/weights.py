"""Versioned weight publication from the trainer to the generators.

    # trainer (rank 0 of its group), after optimizer step k:
    published = publish(unsharded_parameters(parts), version=k)     # one ray.put of CPU tensors
    # driver: keeps the newest, hands it with every generate call
    store.update(published); pool.submit(i, "generate", work, store.latest)
    # generator, between generations:
    if published.version > self.version: load_weights(model, published.fetch())

Each version is put in the Ray object store ONCE, as a state dict of contiguous CPU tensors named as in the
unwrapped model (``plait.parallel.parallelize.unsharded_parameters``: no ``_checkpoint_wrapped_module.``,
``_orig_mod.`` or DDP ``module.``). ``Published`` carries the ObjectRef inside a list, so passing it to an
actor call does not make Ray fetch the weights before the call starts: a generator that already holds that
version never copies them, and one that needs them fetches them once (zero-copy from the node's shared
memory when it is on the trainer's node). The driver never fetches weights; it keeps only the newest
``Published`` (older versions are freed once no call in flight holds them), so memory stays at about two
copies of the model however long the run.

``rl.weight_sync = "broadcast"`` replaces the object store with a torch.distributed broadcast from the
trainer's rank 0 over a standalone group holding the generators (``plait.rl.weight_broadcast``); then a
``Published`` carries only the version and size (``ref`` empty) and the generators load weights in the
driver's sync rounds instead of ``fetch``.

A LoRA policy (``[train.lora]``, ``plait.models.lora``) syncs its adapters only: both sides build the same
adapted model from the same folder, and the ``synced`` names (the adapters) are all a version carries, by
either path; ``num_bytes`` is then the adapters' size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Published:
    version: int
    ref: list = field(repr=False)  # ObjectRefs of {name: CPU tensor} buckets: a list, so Ray passes them unresolved
    num_bytes: int = 0

    def fetch(self) -> dict[str, torch.Tensor]:
        """The whole version (every bucket); ``buckets()`` reads one at a time."""
        return {name: t for bucket in self.buckets() for name, t in bucket.items()}

    def buckets(self):
        """The version's buckets in order, fetched one at a time (a generator holds one besides its model)."""
        import ray

        for ref in self.ref:
            yield ray.get(ref)


def cpu_state_dict(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (what crosses the object store), dtype kept."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in params.items()}


def publish(params, version: int, bucket_bytes: float = float("inf")) -> Published:
    """Put ``params`` (clean names -> full tensors, or an iterator of such pairs produced one at a time, e.g.
    ``plait.parallel.parallelize.iter_unsharded_parameters``) into the object store once, as version ``version``,
    in buckets of about ``bucket_bytes``: the caller's process holds one bucket at a time, never the whole model."""
    import ray

    if version < 0:
        raise ValueError(f"weight version {version}: versions count optimizer steps from 0")
    refs, bucket, size, total = [], {}, 0, 0
    for name, t in (params.items() if isinstance(params, dict) else params):
        t = t.detach().to("cpu", copy=True).contiguous()
        bucket[name], size = t, size + t.numel() * t.element_size()
        if size >= bucket_bytes:
            refs.append(ray.put(bucket))
            bucket, total, size = {}, total + size, 0
    if bucket or not refs:
        refs.append(ray.put(bucket))
        total += size
    return Published(version, refs, total)


def synced_parameters(model: nn.Module, synced: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The parameters a weight sync carries: all, or those whose name ``synced`` accepts (a LoRA policy's
    adapters: ``plait.models.lora.synced_names``; its frozen base comes from disk on both sides)."""
    return {n: p for n, p in model.named_parameters() if synced is None or synced(n)}


def load_published(model: nn.Module, published: Published, synced: Callable[[str], bool] | None = None) -> None:
    """Load a published version bucket by bucket (one bucket in memory besides the model); every synced
    parameter (``synced_parameters``) must be covered once, nothing else may come."""
    own, seen = synced_parameters(model, synced), set()
    for bucket in published.buckets():
        load_weights(model, bucket, partial=True, synced=synced)
        seen.update(bucket)
    missing = sorted(set(own) - seen)
    if missing:
        raise ValueError(f"published weights do not match the generator's model: missing {_what(synced)}"
                         f"{missing[:5]}. Build the generators' model with the trainer's [model] and [train.lora] "
                         "settings")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], partial: bool = False,
                 synced: Callable[[str], bool] | None = None) -> None:
    """Copy ``state`` into ``model``'s synced parameters (all, or those ``synced`` accepts); every one must be
    there (unless ``partial``), nothing else may be."""
    own = synced_parameters(model, synced)
    missing = [] if partial else sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"published weights do not match the generator's model: missing {_what(synced)}"
                         f"{missing[:5]}, unexpected {unexpected[:5]}. Build the generators' model with the trainer's "
                         "[model] and [train.lora] settings; names must be the unwrapped model's "
                         "(plait.parallel.parallelize.unsharded_parameters)")
    with torch.no_grad():
        for name, param in own.items():
            if name not in state:
                continue
            src = state[name]
            if src.shape != param.shape:
                raise ValueError(f"published weight {name} has shape {tuple(src.shape)}, the generator's model "
                                 f"{tuple(param.shape)}: the two were built with different [model] settings")
            param.copy_(src)


def _what(synced) -> str:
    from plait.models.lora import is_adapter

    return "" if synced is None else "LoRA adapters " if synced is is_adapter else "synced parameters "


@dataclass
class WeightStore:
    """The driver's view: the newest published version only (older ones are released)."""

    latest: Published | None = None
    published: int = 0  # versions published so far
    bytes_published: int = 0

    def update(self, p: Published) -> None:
        if self.latest is not None and p.version <= self.latest.version:
            raise ValueError(f"weight version {p.version} published after version {self.latest.version}: versions "
                             "only grow (one per optimizer step)")
        self.latest = p
        self.published += 1
        self.bytes_published += p.num_bytes

    @property
    def version(self) -> int:
        if self.latest is None:
            raise RuntimeError("no weights published yet: the trainer publishes version 0 when it starts")
        return self.latest.version
