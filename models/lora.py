"""LoRA adapters (peft) on any registered family: what the LM job and the RL job share.

    [train.lora]
    rank = 8           # 0 = no LoRA: every parameter trains
    alpha = 16.0       # peft's lora_alpha (the adapters' output is scaled by alpha / rank)
    targets = []       # module names (peft's target_modules); [] = the family's attention projections

``add_lora(model, settings, spec)`` is peft's ``get_peft_model``: adapters on the target modules, only they
train. ``check_lora`` refuses, on the driver, settings that cannot work for a family (a target that matches
no module, or a module that is not a Linear layer).

``lora_spec(spec, settings, seed)`` is the family's spec for a model with adapters, for ``parallelize``:
its ``build`` injects them into the family's own model class (peft's layers in place of the target modules,
no PeftModel around it, so everything that reaches into the family's model keeps working; parameter names
gain ``.base_layer`` and ``.lora_A.default`` / ``.lora_B.default``), and its ``load_weights`` reads the base
weights from a Hugging Face folder under their own names (``base_view``) and initialises the adapters shard by
shard, as peft does (A: kaiming-uniform from (seed, name), B: zeros; so the adapted model starts as the base
model under every plan). Tensor and pipeline parallelism are not offered (peft's layers are not in the
families' tp plans); data parallelism (DDP, FSDP2) is.

``base_view(model)``: the model seen without its adapters (each peft layer swapped for its base layer while
inside). ``merged_view(model)``: the same with the adapters merged into the base weights (W + scaling * B @ A;
a collective under FSDP2: every rank enters it), restored bit for bit on leaving: a complete model that the
family's export writes as an ordinary HF folder (``models/hf/export.py``).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

ADAPTER_SEGMENTS = (".lora_A.", ".lora_B.")


@dataclass
class LoraSettings:
    rank: int = 0  # 0 = no LoRA: every parameter trains
    alpha: float = 16.0
    targets: list[str] = field(default_factory=list)  # module names; [] = the family's attention projections

    def check(self) -> None:
        if self.rank < 0:
            raise ValueError(f"train.lora.rank={self.rank}: 0 (off) or a positive adapter rank")
        if self.rank and self.alpha <= 0:
            raise ValueError(f"train.lora.alpha={self.alpha}: a positive scale (peft's lora_alpha; 16 is usual)")
        if any(not isinstance(t, str) or not t for t in self.targets):
            raise ValueError(f"train.lora.targets={self.targets!r}: module names (e.g. ['q_proj', 'v_proj']), or [] "
                             "for the family's attention projections")


def lora_targets(settings: LoraSettings, spec: Any) -> list[str]:
    """The modules adapters go on: the settings' targets, or the family's default (its attention projections)."""
    return list(settings.targets) or list(spec.lora_targets)


def is_adapter(name: str) -> bool:
    """A LoRA adapter's parameter (lora_A / lora_B), by its name."""
    return any(segment in name for segment in ADAPTER_SEGMENTS)


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a target_modules entry: the module's name, or its last dotted segments."""
    return module_name == target or module_name.endswith(f".{target}")


def check_lora(settings: LoraSettings, spec: Any, config: Any) -> None:
    """On the driver: every target names Linear modules of this family's model (built on the meta device)."""
    settings.check()
    if not settings.rank:
        return
    with torch.device("meta"):
        model = spec.build(config)
    modules = dict(model.named_modules())
    linear = sorted({name.rpartition(".")[2] for name, m in modules.items() if isinstance(m, nn.Linear)})
    for target in lora_targets(settings, spec):
        found = [m for name, m in modules.items() if _matches(name, target)]
        if not found:
            raise ValueError(f"train.lora.targets: {target!r} matches no module of the {spec.name} model; its Linear "
                             f"layers are named {linear} (the default, [], is {list(spec.lora_targets)})")
        other = sorted({type(m).__name__ for m in found if not isinstance(m, nn.Linear)})
        if other:
            raise ValueError(f"train.lora.targets: {target!r} names {', '.join(other)} modules; LoRA here adapts "
                             f"Linear layers only ({linear})")


def add_lora(model: nn.Module, settings: LoraSettings, spec: Any) -> nn.Module:
    """peft's ``get_peft_model``: adapters on the target modules, every other parameter frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                            target_modules=lora_targets(settings, spec)))


def lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, peft LoRA layer) of every adapted module of ``model``."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parent, _, attr = name.rpartition(".")
            out.append((model.get_submodule(parent) if parent else model, attr, module))
    return out


@contextmanager
def base_view(model: nn.Module):
    """``model`` without its adapters while inside: each peft layer's base layer stands in its place (the same
    parameter objects, so loading into the view loads the model)."""
    swaps = lora_layers(model)
    for parent, attr, layer in swaps:
        setattr(parent, attr, layer.base_layer)
    try:
        yield model
    finally:
        for parent, attr, layer in swaps:
            setattr(parent, attr, layer)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_box(value: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's local tensor of ``param``, the box of the full ``value`` it covers)."""
    if not isinstance(param, DTensor):
        return param.data, value
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    box = value[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
    return param.to_local(), box


@contextmanager
def merged_view(model: nn.Module):
    """``base_view`` with the adapters merged into the base weights (a collective under FSDP2: every rank enters
    it; each gathers the small adapters, never a base weight), the base weights restored exactly on leaving."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # FSDP2 may leave the last block unsharded after a forward: its shards again
        if isinstance(m, FSDPModule):
            m.reshard()
    saved = []
    try:
        with torch.no_grad():
            for _, _, layer in lora_layers(model):
                if getattr(layer, "use_dora", {}) and any(layer.use_dora.values()):
                    raise ValueError("merged_view: DoRA adapters are not merged here")
                weight = layer.base_layer.weight
                delta = None
                for name in layer.active_adapters:
                    if name not in layer.lora_A:
                        continue
                    part = (_full(layer.lora_B[name].weight) @ _full(layer.lora_A[name].weight)) * layer.scaling[name]
                    delta = part if delta is None else delta + part
                if delta is None:
                    continue
                if getattr(layer, "fan_in_fan_out", False):
                    delta = delta.T
                local, box = _local_box(delta, weight)
                saved.append((local, local.clone()))
                local.add_(box.to(local.dtype))
        with base_view(model):
            yield model
    finally:
        with torch.no_grad():
            for local, before in saved:
                local.copy_(before)


def adapter_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """peft's default init of one adapter parameter: A kaiming-uniform (a = sqrt 5), B zeros."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def lora_spec(spec: Any, settings: LoraSettings, seed: int = 0) -> Any:
    """The family's ModelSpec for its model with adapters (see the module docstring)."""
    from plait.parallel.meta_init import init_shards

    def build(config: Any) -> nn.Module:
        return add_lora(spec.build(config), settings, spec).get_base_model()  # the family's model, adapters inside

    def load_weights(model: nn.Module | list[nn.Module], folder: Any) -> list[str]:
        if spec.load_weights is None:
            raise ValueError(f"family {spec.name!r} reads no HF folder")
        modules = list(model) if isinstance(model, (list, tuple)) else [model]
        with _views(modules):
            loaded = spec.load_weights(model, folder)
        init_shards(model, seed, lambda _m, name, shape, gen: adapter_init(name, shape, gen), only=is_adapter)
        return loaded

    def init_value(module: nn.Module, name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        if is_adapter(name):
            return adapter_init(name, shape, gen)
        return spec.init_value(module, name.replace(".base_layer.", "."), shape, gen)

    return dataclasses.replace(spec, build=build, load_weights=load_weights, tensor_parallel=None, tp_plan=None,
                               cut_stage=None, init_value=init_value if spec.init_value is not None else None)


@contextmanager
def _views(modules: list[nn.Module]):
    if not modules:
        yield
        return
    with base_view(modules[0]), _views(modules[1:]):
        yield


def synced_names(lora: LoraSettings | None) -> Callable[[str], bool] | None:
    """Which parameters a weight sync carries: the adapters under LoRA (None: every parameter)."""
    return is_adapter if lora is not None and lora.rank else None
