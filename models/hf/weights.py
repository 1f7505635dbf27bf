"""Hugging Face weights into a sharded model, and the naming both directions share: local folders only.

    model = apply_tensor_parallel(build_on_meta(), mesh["tp"], spec); apply_fsdp2(model, mesh["dp"])
    materialize(model, device, spec)                        # each rank allocates only its shards
    load_hf_folder(model, "/models/llama-1b", spec)         # each rank reads only its slices
    ... train ...
    export_hf_folder(model, "/out/llama-1b-tuned", config)  # models/hf/export.py

A HF folder is ``config.json`` + ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
listed by ``model.safetensors.index.json``. Which checkpoint tensor a parameter is comes from its family
(``spec.weight_names(module)``: parameter name -> ``WeightRef(checkpoint name, row map)``; a HF family's names
are the checkpoint's; Plait's GPT maps to Llama's names and permutes q/k rows to HF's RoPE layout; a family
whose fused tensors are split into parts (Phi-3) maps each part to its rows of the fused tensor). Wrapper
segments (parallel/names.py) are stripped. Pipeline stages keep the unsplit model's names, so a rank's stages
(pass the list of modules) load and export just their own names.

Load: a DTensor parameter (tp, FSDP2, both) reads the box of the checkpoint tensor its local shard
covers (``safe_open(...).get_slice``), a plain one reads the whole tensor. Replicated kv heads
(parallel/kv_replication.py) read the head their copy stands for.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from plait.parallel.kv_replication import HEAD_DIM, REPLICAS, replica_rows
from plait.parallel.names import clean_fqn
from torch import nn
from torch.distributed.tensor import DTensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
RowMap = Callable[[torch.Tensor], torch.Tensor]  # model rows -> checkpoint rows


@dataclass(frozen=True)
class WeightRef:
    name: str  # the checkpoint tensor's name
    rows: RowMap | None = None  # model rows -> its rows in the checkpoint tensor (None: the same rows)
    # Stacked experts (models/moe.py): the parameter is (E, rows, cols) and expert e's (rows, cols) is these
    # checkpoint tensors ("...experts.{e}.w1.weight", ...) concatenated along rows, in equal parts; ``name`` is
    # then the first part of expert 0
    experts: tuple[str, ...] = ()


def expert_ref(*parts: str) -> WeightRef:
    """The WeightRef of a stacked experts parameter whose expert e is ``parts`` (templates with ``{e}``)."""
    return WeightRef(parts[0].format(e=0), experts=tuple(parts))


def expert_names(ref: WeightRef, num_experts: int) -> list[str]:
    return [part.format(e=e) for e in range(num_experts) for part in ref.experts]


@dataclass(frozen=True)
class Target:
    param: torch.Tensor
    ckpt: str
    rows: RowMap | None  # model rows (replicated copies included) -> checkpoint rows
    copies: int  # copies of each row in the model (replicated kv heads), 1 otherwise
    experts: tuple[str, ...] = ()  # stacked experts: WeightRef.experts


def same_names(module: nn.Module) -> dict[str, WeightRef]:
    """A HF family's parameter names are its checkpoint's names."""
    return {clean_fqn(n): WeightRef(clean_fqn(n)) for n, _ in module.named_parameters()}


def offset_rows(offset: int) -> RowMap:
    """The row map of a part that starts ``offset`` rows into a fused checkpoint tensor."""
    return lambda rows: rows + offset


def _compose(first: RowMap | None, then: RowMap | None) -> RowMap | None:
    if first is None or then is None:
        return first or then
    return lambda rows: then(first(rows))


def _modules(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def targets(model: nn.Module | list[nn.Module], names: Callable[[nn.Module], dict[str, WeightRef]] | None = None
            ) -> dict[str, Target]:
    """Model parameter name -> Target, for a model or this rank's pipeline stages."""
    names = names or same_names
    out = {}
    for module in _modules(model):
        refs = names(module)
        copies: dict[str, tuple[RowMap, int]] = {}
        for name, sub in module.named_modules():
            replicas = getattr(sub, REPLICAS, 0)
            for key, _ in sub.named_parameters(recurse=False) if replicas > 1 else ():
                rows = functools.partial(replica_rows, replicas=replicas, head_dim=getattr(sub, HEAD_DIM))
                copies[clean_fqn(f"{name}.{key}")] = (rows, replicas)
        for name, p in module.named_parameters():
            name = clean_fqn(name)
            if name not in refs:
                raise KeyError(f"{name}: the model's family names no checkpoint tensor for it")
            dedup, n = copies.get(name, (None, 1))
            out[name] = Target(p, refs[name].name, _compose(dedup, refs[name].rows), n, refs[name].experts)
    return out


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Checkpoint name -> safetensors file of a local HF folder (single file or index + shards)."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE).is_file():
        with safe_open(folder / SINGLE, framework="pt") as f:
            return {name: folder / SINGLE for name in f.keys()}
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
    raise FileNotFoundError(f"{folder} holds no {SINGLE} or {INDEX} (found: {found}): point at a local Hugging "
                            "Face model folder saved with safetensors "
                            "(save_pretrained(..., safe_serialization=True)); .bin checkpoints are not read")


def _read_box(f, name: str, offset: tuple[int, ...], shape: tuple[int, ...], row_map) -> torch.Tensor:
    sl = f.get_slice(name)
    if row_map is None:
        return sl[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
    rows = row_map(torch.arange(offset[0], offset[0] + shape[0]))
    lo, hi = int(rows.min()), int(rows.max()) + 1
    rest = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
    block = sl[(slice(lo, hi), *rest)]
    return block if torch.equal(rows, torch.arange(lo, hi)) else block[rows - lo]


def _ckpt_rows(target: Target, model_rows: int) -> int:
    """How many rows of the checkpoint tensor this parameter covers."""
    if target.rows is None:
        return model_rows // target.copies
    return len(torch.unique(target.rows(torch.arange(model_rows))))


def load_hf_folder(model: nn.Module | list[nn.Module], folder: str | Path, spec: Any = None) -> list[str]:
    """Fill ``model``'s parameters (a model or this rank's pipeline stages; sharded or not) from a local HF
    folder, each rank reading only the slices it holds. ``spec`` (its family's, plait.models) names the
    checkpoint tensor of each parameter; None: the names are the checkpoint's. Returns the model names loaded.
    Raises KeyError for a parameter the folder lacks and ValueError for a shape that differs."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = weight_files(folder)
    found = targets(model, getattr(spec, "weight_names", None))
    wanted = [n for t in found.values() for n in (expert_names(t, t.param.shape[0]) if t.experts else [t.ckpt])]
    missing = sorted(n for n in wanted if n not in files)
    if missing:
        raise KeyError(f"{folder} has no tensors for {len(missing)} parameters, e.g. {missing[:4]} (it has e.g. "
                       f"{sorted(files)[:4]}): the model must be the checkpoint's architecture with HF parameter names")
    handles: dict[Path, Any] = {}
    try:
        with torch.no_grad():
            for name, t in found.items():
                p, path = t.param, files[t.ckpt]
                if t.experts:
                    _load_experts(t, name, files, handles, folder)
                    continue
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt").__enter__()
                f = handles[path]
                ckpt_shape = tuple(f.get_slice(t.ckpt).get_shape())
                covered = _ckpt_rows(t, p.shape[0])
                if covered > ckpt_shape[0] or tuple(p.shape[1:]) != ckpt_shape[1:] or \
                        (t.rows is None and covered != ckpt_shape[0]):
                    raise ValueError(f"{name}: the checkpoint in {folder} has shape {ckpt_shape} for {t.ckpt}, the "
                                     f"model {(covered, *p.shape[1:])}: build the model from the folder's config.json")
                if isinstance(p, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                    local = p.to_local()
                    if local.numel():
                        local.copy_(_read_box(f, t.ckpt, tuple(offset), tuple(shape), t.rows))
                else:
                    p.copy_(_read_box(f, t.ckpt, (0,) * p.ndim, tuple(p.shape), t.rows))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return sorted(found)


def _load_experts(t: Target, name: str, files: dict[str, Path], handles: dict, folder) -> None:
    """A stacked experts parameter: each rank reads, of each expert it holds (dim 0: Shard(0) under expert
    parallelism), the rows and columns its shard covers, from the per-expert checkpoint tensors."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    p = t.param
    if isinstance(p, DTensor):
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        local = p.to_local()
    else:
        shape, offset, local = tuple(p.shape), (0,) * p.ndim, p
    if not local.numel():
        return
    n_parts = len(t.experts)
    part_rows = p.shape[1] // n_parts
    rows = range(offset[1], offset[1] + shape[1])
    cols = slice(offset[2], offset[2] + shape[2])
    for i, e in enumerate(range(offset[0], offset[0] + shape[0])):
        pieces = []
        for k, template in enumerate(t.experts):
            lo, hi = max(rows.start, k * part_rows), min(rows.stop, (k + 1) * part_rows)
            if lo >= hi:
                continue
            ckpt = template.format(e=e)
            path = files[ckpt]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt").__enter__()
            sl = handles[path].get_slice(ckpt)
            if tuple(sl.get_shape()) != (part_rows, p.shape[2]):
                raise ValueError(f"{name}: the checkpoint in {folder} has shape {tuple(sl.get_shape())} for {ckpt}, "
                                 f"the model {(part_rows, p.shape[2])} per expert: build the model from the "
                                 "folder's config.json")
            pieces.append(sl[lo - k * part_rows:hi - k * part_rows, cols])
        local[i].copy_(torch.cat(pieces))


def materialize(model: nn.Module | list[nn.Module], device: torch.device | str, spec: Any = None
                ) -> nn.Module | list[nn.Module]:
    """Allocate a meta-built (and possibly sharded) model on ``device``: each rank gets only its shards
    (``to_empty``); non-persistent buffers (RoPE tables) are recomputed by the family (``spec.reset_buffers``;
    None: HF rotary embeddings). The weights are garbage until loaded (``load_hf_folder``) or initialised."""
    from plait.models.hf.stages import reset_rotary_buffers

    reset = getattr(spec, "reset_buffers", None) or reset_rotary_buffers
    for module in _modules(model):
        module.to_empty(device=device)
        reset(module)
    return model
