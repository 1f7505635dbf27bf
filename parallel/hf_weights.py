"""Hugging Face weights in and out of a sharded model: local folders only, no download.

    model = apply_tensor_parallel(build_on_meta(), mesh["tp"]); apply_fsdp2(model, mesh["dp"])
    materialize(model, device)                       # each rank allocates only its shards
    load_hf_folder(model, "/models/llama-1b")        # each rank reads only its slices
    ... train ...
    export_hf_folder(model, "/out/llama-1b-tuned", config)   # on every rank (a collective); rank 0 commits

A HF folder is ``config.json`` + ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
listed by ``model.safetensors.index.json``. Names: a HF model's parameter FQNs are the checkpoint's
names; wrapper segments (activation checkpointing's ``_checkpoint_wrapped_module.``, torch.compile's
``_orig_mod.``, DDP's ``module.``) are stripped. Pipeline stages keep the unsplit model's names, so a
rank's stages (pass the list of modules) load and export just their own names.

Load: a DTensor parameter (tp, FSDP2, both) reads the box of the checkpoint tensor its local shard
covers (``safe_open(...).get_slice``), a plain one reads the whole tensor. Replicated kv heads
(``hf_plans``, tp > kv heads) read the head their copy stands for.

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

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from plait.storage.folders import ForeignFolderError, fsync_path
from torch import nn
from torch.distributed.tensor import DTensor

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MARKER = "plait_export.json"  # an export folder Plait may replace (any other folder is refused)
KV_SUFFIXES = ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")


def hf_name(fqn: str) -> str:
    """A parameter's checkpoint name: wrapper segments and DDP's leading ``module.`` removed."""
    for segment in WRAPPER_SEGMENTS:
        fqn = fqn.replace(segment, "")
    return fqn.removeprefix("module.")


def _modules(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _is_gpt(module: nn.Module) -> bool:
    from plait.parallel.models.gpt import GPT

    return isinstance(module, GPT)


# Plait GPT -> HF Llama names (``layers.<i>.`` becomes ``model.layers.<i>.``).
GPT_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
GPT_BLOCK = {"attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
             "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
             "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight"}
ROPE_PERMUTED = ("attention.wq.weight", "attention.wk.weight")


def gpt_to_llama_name(name: str) -> str:
    """The HF Llama checkpoint name of a Plait GPT parameter."""
    if name in GPT_TOP:
        return GPT_TOP[name]
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    if head != "layers" or rest not in GPT_BLOCK:
        raise KeyError(f"{name!r} is not a Plait GPT parameter name (expected e.g. layers.0.attention.wq.weight)")
    return f"model.layers.{index}.{GPT_BLOCK[rest]}"


def rope_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF rows of GPT q/k rows: the GPT rotates interleaved pairs (2j, 2j+1), HF halves (j, j + head_dim/2)."""
    i = rows % head_dim
    return rows - i + i // 2 + (i % 2) * (head_dim // 2)


def replica_rows(rows: torch.Tensor, replicas: int, head_dim: int) -> torch.Tensor:
    """Checkpoint rows of model rows of a k/v projection whose heads are replicated ``replicas`` times."""
    return (rows // head_dim) // replicas * head_dim + rows % head_dim


def llama_config(cfg: Any) -> dict:
    """A HF ``LlamaConfig`` dict for a Plait ``GPTConfig`` (the same model once q/k rows are permuted)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False}


def _targets(model: nn.Module | list[nn.Module]) -> dict[str, tuple[torch.Tensor, str, Any, int]]:
    """Model name -> (parameter, checkpoint name, row map model rows -> checkpoint rows or None, copies per row)."""
    from plait.parallel.hf_plans import KV_REPLICAS

    out = {}
    for module in _modules(model):
        gpt = _is_gpt(module)
        kv = {}
        for name, sub in module.named_modules():
            replicas = getattr(sub, KV_REPLICAS, 0)
            for key in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias") if replicas > 1 else ():
                rows = functools.partial(replica_rows, replicas=replicas, head_dim=sub.head_dim)
                kv[hf_name(f"{name}.{key}")] = (rows, replicas)
        for name, p in module.named_parameters():
            name = hf_name(name)
            if gpt:
                permuted = name.endswith(ROPE_PERMUTED)
                rows = functools.partial(rope_rows, head_dim=module.cfg.head_dim) if permuted else None
                out[name] = (p, gpt_to_llama_name(name), rows, 1)
            else:
                out[name] = (p, name, *kv.get(name, (None, 1)))
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


def load_hf_folder(model: nn.Module | list[nn.Module], folder: str | Path) -> list[str]:
    """Fill ``model``'s parameters (a model or this rank's pipeline stages; sharded or not) from a local HF
    folder, each rank reading only the slices it holds. A Plait GPT reads a HF Llama folder (names mapped,
    q/k rows permuted to its interleaved RoPE). Returns the model names loaded. Raises KeyError for a
    parameter the folder lacks and ValueError for a shape that differs from the checkpoint's."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = weight_files(folder)
    targets = _targets(model)
    missing = sorted(ckpt for _, ckpt, _, _ in targets.values() if ckpt not in files)
    if missing:
        raise KeyError(f"{folder} has no tensors for {len(missing)} parameters, e.g. {missing[:4]} (it has e.g. "
                       f"{sorted(files)[:4]}): the model must be the checkpoint's architecture with HF parameter names")
    handles: dict[Path, Any] = {}
    try:
        with torch.no_grad():
            for name, (p, ckpt, row_map, copies) in targets.items():
                path = files[ckpt]
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt").__enter__()
                f = handles[path]
                ckpt_shape = tuple(f.get_slice(ckpt).get_shape())
                want = (p.shape[0] // copies, *p.shape[1:])
                if ckpt_shape != want:
                    raise ValueError(f"{name}: the checkpoint in {folder} has shape {ckpt_shape} for {ckpt}, the "
                                     f"model {want}: build the model from the folder's config.json")
                if isinstance(p, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                    local = p.to_local()
                    if local.numel():
                        local.copy_(_read_box(f, ckpt, tuple(offset), tuple(shape), row_map))
                else:
                    p.copy_(_read_box(f, ckpt, (0,) * p.ndim, tuple(p.shape), row_map))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return sorted(targets)


def materialize(model: nn.Module | list[nn.Module], device: torch.device | str) -> nn.Module | list[nn.Module]:
    """Allocate a meta-built (and possibly sharded) model on ``device``: each rank gets only its shards
    (``to_empty``); the non-persistent RoPE tables (HF rotary ``inv_freq``, the GPT's ``rope_cos/sin``)
    are recomputed. The weights are garbage until loaded (``load_hf_folder``) or initialised."""
    from plait.parallel.models.gpt import rope_tables
    from plait.parallel.pipeline import reset_rotary_buffers

    for module in _modules(model):
        module.to_empty(device=device)
        reset_rotary_buffers(module)
        for sub in module.modules():
            if _is_gpt(sub):
                cos, sin = rope_tables(sub.cfg.head_dim, sub.cfg.max_seq_len, sub.cfg.rope_theta)
                sub.rope_cos.copy_(cos)
                sub.rope_sin.copy_(sin)
    return model


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
        (tmp / MARKER).write_text(json.dumps({"written_by": "plait.parallel.hf_weights.export_hf_folder"}))

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
