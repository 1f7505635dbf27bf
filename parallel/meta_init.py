"""Random initialisation of a model built on the meta device, shard by shard.

``parallelize(..., init_seed=S)`` builds the model under ``torch.device("meta")``, applies the plan, then
each rank allocates only its shards (``hf_weights.materialize``) and fills them here: every parameter's
full value is a pure function of (S, its name) — drawn from a generator seeded by both, by the model's
``init_value(name, shape, generator)`` rule (Plait's GPT has one) — and each rank copies the box its
local shard covers. So the initial model is the same under every plan (tp, FSDP2, pipeline stages, one
process), and no rank holds more than one full parameter at a time, never the whole model. (A model's
ordinary eager init, by contrast, draws from the global RNG in construction order and allocates it all.)
"""

from __future__ import annotations

import hashlib

import torch
from plait.models.hf.weights import hf_name
from torch import nn
from torch.distributed.tensor import DTensor


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter: independent of the plan, the rank and the construction order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _owner(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if callable(getattr(sub, "init_value", None)):
            return sub
    raise ValueError(f"{type(module).__name__} has no init_value(name, shape, generator) rule, so it cannot be "
                     "initialised shard by shard: build it normally (init_seed=None), or load pretrained weights "
                     "(weights=a local HF folder)")


@torch.no_grad()
def init_shards(model: nn.Module | list[nn.Module], seed: int) -> list[str]:
    """Fill every parameter of ``model`` (a materialised, possibly sharded model, or this rank's pipeline
    stages) as described in the module docstring; returns the names filled."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    done = []
    for module in model if isinstance(model, (list, tuple)) else [model]:
        owner = _owner(module)
        for name, p in owner.named_parameters():
            name = hf_name(name)
            gen = torch.Generator().manual_seed(param_seed(seed, name))
            value = owner.init_value(name, tuple(p.shape), gen)
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                local = p.to_local()
                if local.numel():
                    local.copy_(value[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))])
            else:
                p.copy_(value)
            done.append(name)
    return done
