"""Random initialisation of a model built on the meta device, shard by shard.

``parallelize(..., init_seed=S)`` builds the model under ``torch.device("meta")``, applies the plan, then
each rank allocates only its shards (``hf_weights.materialize``) and fills them here: every parameter's
full value is a pure function of (S, its name) — drawn from a generator seeded by both, by its family's
``spec.init_value(module, name, shape, generator)`` rule (plait.models; handed in, never imported) — and each
rank copies the box its
local shard covers. So the initial model is the same under every plan (tp, FSDP2, pipeline stages, one
process), and no rank holds more than one full parameter at a time, never the whole model. (A model's
ordinary eager init, by contrast, draws from the global RNG in construction order and allocates it all.)
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from plait.parallel.names import clean_fqn
from torch import nn
from torch.distributed.tensor import DTensor


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter: independent of the plan, the rank and the construction order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


InitRule = Callable[[nn.Module, str, tuple, torch.Generator], torch.Tensor]  # (module, name, shape, gen) -> value


@torch.no_grad()
def init_shards(model: nn.Module | list[nn.Module], seed: int, init_value: InitRule | None,
                only: Callable[[str], bool] | None = None) -> list[str]:
    """Fill every parameter of ``model`` (a materialised, possibly sharded model, or this rank's pipeline
    stages) as described in the module docstring, or those whose name ``only`` accepts (LoRA adapters over
    loaded weights); returns the names filled."""
    if init_value is None:
        raise ValueError(f"{type(model).__name__}'s family has no init_value rule, so it cannot be initialised shard "
                         "by shard: build it normally (init_seed=None), or load pretrained weights (weights=a "
                         "local HF folder)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    done = []
    for module in model if isinstance(model, (list, tuple)) else [model]:
        for name, p in module.named_parameters():
            name = clean_fqn(name)
            if only is not None and not only(name):
                continue
            gen = torch.Generator().manual_seed(param_seed(seed, name))
            value = init_value(module, name, tuple(p.shape), gen)
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                local = p.to_local()
                if local.numel():
                    local.copy_(value[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))])
            else:
                p.copy_(value)
            done.append(name)
    return done
