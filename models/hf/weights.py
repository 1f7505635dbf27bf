"""Hugging Face weights into a sharded model (and the naming both directions share): local folders only.

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

Export: ``export_hf_folder`` in ``hf_export.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
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
    from plait.models.gpt import GPT

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
    from plait.models.hf.plans import KV_REPLICAS

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
    from plait.models.gpt import rope_tables
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
