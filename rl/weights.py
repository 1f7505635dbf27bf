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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Published:
    version: int
    ref: list = field(repr=False)  # [ObjectRef] of {name: CPU tensor}: a list, so Ray passes it unresolved
    num_bytes: int = 0

    def fetch(self) -> dict[str, torch.Tensor]:
        import ray

        return ray.get(self.ref[0])


def cpu_state_dict(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (what crosses the object store), dtype kept."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in params.items()}


def publish(params: dict[str, torch.Tensor], version: int) -> Published:
    """Put ``params`` (clean names -> full tensors) into the object store once, as version ``version``."""
    import ray

    if version < 0:
        raise ValueError(f"weight version {version}: versions count optimizer steps from 0")
    state = cpu_state_dict(params)
    return Published(version, [ray.put(state)], sum(t.numel() * t.element_size() for t in state.values()))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``'s parameters; every parameter must be there, nothing else may be."""
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"published weights do not match the generator's model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}. Build the generators' GPT with the trainer's [model] settings; names must "
                         "be the unwrapped model's (plait.parallel.parallelize.unsharded_parameters)")
    with torch.no_grad():
        for name, param in own.items():
            src = state[name]
            if src.shape != param.shape:
                raise ValueError(f"published weight {name} has shape {tuple(src.shape)}, the generator's model "
                                 f"{tuple(param.shape)}: the two were built with different [model] settings")
            param.copy_(src)


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
