"""A sharded model (any plan) out to a Hugging Face folder that ``from_pretrained`` loads.

    export_hf_folder(model, "/out/llama-1b-tuned", config)   # on every rank (a collective); rank 0 commits

Export: DTensors are gathered to full tensors (a collective on their meshes: call it on every rank),
replicated kv heads are written once (the first copy), a tied ``lm_head`` is left to
``tie_word_embeddings``. Each name is written by the lowest rank that holds it (pipeline stages write
their own), into a temporary folder beside ``folder`` (same filesystem: shared storage across hosts);
rank 0 then names the files ``model-0000i-of-0000n.safetensors`` (one file: ``model.safetensors``),
writes the index, ``config.json`` and a ``plait_export.json`` marker, and commits the folder with
``storage.folders.write_folder`` (temp folder, fsync, rename, under a lock). Only an earlier export (the
marker) or an empty folder is replaced; any other folder is refused (ForeignFolderError), never deleted.
``transformers``' ``from_pretrained(folder)`` loads the result.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from plait.models.hf.weights import (
    INDEX,
    KV_SUFFIXES,
    MARKER,
    ROPE_PERMUTED,
    SINGLE,
    _targets,
    gpt_to_llama_name,
    hf_name,
    llama_config,
    rope_rows,
)
from plait.storage.folders import ForeignFolderError, fsync_path
from torch.distributed.tensor import DTensor


def _config_dict(config: Any) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"export_hf_folder needs the HF config (a PretrainedConfig or its dict), got "
                    f"{type(config).__name__}")


def _dereplicate(name: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The first copy of each kv head when a k/v projection holds replicated heads."""
    if not name.endswith(KV_SUFFIXES) or "num_key_value_heads" not in cfg:
        return t
    kv = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if t.shape[0] == kv * head_dim:
        return t
    if t.shape[0] % (kv * head_dim):
        raise ValueError(f"{name} has {t.shape[0]} rows, not a multiple of num_key_value_heads*head_dim = "
                         f"{kv}*{head_dim}: pass the config the model was built from")
    return t.unflatten(0, (kv, -1, head_dim))[:, 0].flatten(0, 1)


def _gpt_config(config: Any) -> bool:
    return hasattr(config, "d_model") and hasattr(config, "n_heads")


def full_state(model_or_state: Any, config: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """This rank's tensors as the HF checkpoint holds them: full (DTensors gathered: a collective), named
    without wrappers, kv heads de-replicated, a tied lm_head dropped, on the CPU. With a Plait
    ``GPTConfig``, GPT names become HF Llama names and q/k rows are permuted to HF's RoPE layout."""
    gpt = _gpt_config(config)
    cfg = llama_config(config) if gpt else _config_dict(config)
    if isinstance(model_or_state, dict):
        items = [(hf_name(k), v) for k, v in model_or_state.items()]
    else:
        items = [(name, spec[0]) for name, spec in _targets(model_or_state).items()]
    out = {}
    for name, t in items:
        t = t.detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if gpt:
            if name.endswith(ROPE_PERMUTED):  # HF row rope_rows(r) holds GPT row r
                t = t[torch.argsort(rope_rows(torch.arange(t.shape[0]), config.head_dim))]
            name = gpt_to_llama_name(name)
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        out[name] = _dereplicate(name, t, cfg).to("cpu", dtype or t.dtype).contiguous().clone()
    return out


def _write_parts(state: dict[str, torch.Tensor], tmp: Path, rank: int, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if parts[-1] and size + nbytes > max_shard_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = state[name]
        size += nbytes
    for k, part in enumerate(parts):
        if part:
            path = tmp / f"part-{rank:05d}-{k:05d}.safetensors"
            save_file(part, str(path), metadata={"format": "pt"})
            fsync_path(path)


def _is_ours(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _check_target(folder: Path) -> None:
    """Refuse, before any collective, a target that is a file, a link or a folder Plait did not export."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ForeignFolderError(f"{folder} is {'a symbolic link' if folder.is_symlink() else 'a file'}, not a "
                                 "Hugging Face export folder: it is never replaced; choose another path")
    if folder.is_dir() and os.listdir(folder) and not _is_ours(folder):
        shown = ", ".join(sorted(os.listdir(folder))[:5])
        raise ForeignFolderError(f"{folder} holds files Plait did not export ({shown}, ...; no {MARKER}): it is "
                                 "never replaced or deleted: move it away or choose another path")


def _finish(parts_dir: Path, folder: Path, cfg: dict) -> None:
    """Rank 0: final file names, the index, config.json, the marker; committed by ``write_folder``."""
    from plait.storage.folders import write_folder
    from safetensors import safe_open

    def build(tmp: Path) -> None:
        parts = sorted(parts_dir.glob("part-*.safetensors"))
        if len(parts) == 1:
            os.replace(parts[0], tmp / SINGLE)
        else:
            weight_map, total = {}, 0
            for i, part in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                with safe_open(part, framework="pt") as f:
                    for name in f.keys():
                        weight_map[name] = final
                        sl = f.get_slice(name)
                        total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
                os.replace(part, tmp / final)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        (tmp / MARKER).write_text(json.dumps({"written_by": "plait.models.hf.export.export_hf_folder"}))

    write_folder(folder, build, _is_ours, "Hugging Face export")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(
        dtype, 4)


def export_hf_folder(model_or_state: Any, folder: str | Path, config: Any, *, dtype: torch.dtype | None = None,
                     max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a HF folder that ``from_pretrained`` loads, from a model (or this rank's pipeline stages, or a
    state dict) under any plan. Under torch.distributed call it on EVERY rank (DTensors are gathered and
    the ranks meet at barriers); rank 0 commits the folder atomically. ``config`` is the HF config the
    model was built from (a PretrainedConfig or dict), or a Plait ``GPTConfig``: a GPT is written as a HF
    Llama (``LlamaForCausalLM``). Returns ``folder``."""
    folder = Path(folder)
    cfg = llama_config(config) if _gpt_config(config) else _config_dict(config)
    state = full_state(model_or_state, config, dtype)
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    if floats:  # from_pretrained's default dtype is the config's: say what the files hold
        cfg["dtype"] = str(floats[0]).removeprefix("torch.")
    world = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if world else 0
    _check_target(folder)  # on every rank (a shared path), so a refusal leaves no rank waiting at a barrier
    parts_dir = folder.parent / f".{folder.name}.parts-plait"  # every rank writes its tensors here
    if rank == 0:
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True)
    if world:
        held: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(held, sorted(state))  # names only; also: rank 0 has made parts_dir
        owner: dict[str, int] = {}
        for r, names in enumerate(held):
            for name in names:
                owner.setdefault(name, r)
        state = {n: t for n, t in state.items() if owner[n] == rank}
    _write_parts(state, parts_dir, rank, max_shard_bytes)
    if world:
        dist.barrier()
    if rank == 0:
        try:
            _finish(parts_dir, folder, cfg)
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
    if world:
        dist.barrier()
    return folder
