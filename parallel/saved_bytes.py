"""Measure the activation memory of a forward: the bytes autograd saves for backward.

``SavedBytes(modules)`` is a context manager over ``torch.autograd.graph.saved_tensors_hooks``: it records
each unique storage a forward saves (parameters and buffers of ``modules`` excluded, DTensors counted by
their local shard), plus the inputs of checkpointed blocks, which checkpoint's recompute closure keeps
alive although the hooks see nothing inside those blocks. ``total`` is the sum in bytes. It is the
measured counterpart of ``estimate.estimate_memory``'s activation figure (tests and benches use it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class SavedBytes:
    """Unique storages autograd saves under this context (see the module docstring)."""

    def __init__(self, modules: nn.Module | list[nn.Module]):
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.skip = {_local(t).untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
        self.seen: dict[int, int] = {}
        self.handles = [sub.register_forward_pre_hook(lambda _m, args: self.add(args[0]))
                        for m in modules for sub in m.modules() if isinstance(sub, CheckpointWrapper)]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def add(self, t: torch.Tensor) -> None:
        t = _local(t)
        if isinstance(t, AsyncCollectiveTensor):  # a DTensor's local result of a pending collective
            t = t.trigger_wait()
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in self.skip:
            self.seen[st.data_ptr()] = st.nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def __enter__(self) -> SavedBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(self.seen.values())
