"""A sharded model (any plan) out to a complete Hugging Face folder that ``from_pretrained`` loads.

    export_hf_folder(model, "/out/llama-1b-tuned", config, source="/models/llama-1b")   # every rank; rank 0 commits

Export: DTensors are gathered to full tensors (a collective on their meshes: call it on every rank), each
parameter is written under its family's checkpoint name (``spec.weight_names``: a Plait GPT as a HF Llama with
q/k rows permuted back; a family whose fused tensors are split into parts writes the fused tensor), replicated
kv heads once (the first copy), a tied ``lm_head`` is left to ``tie_word_embeddings``. Each name is written by the
lowest rank that holds it (pipeline stages write their own), into a temporary folder beside ``folder`` (same
filesystem: shared storage across hosts); rank 0 then names the files ``model-0000i-of-0000n.safetensors`` (one
file: ``model.safetensors``), writes the index, ``config.json``, ``generation_config.json``, the tokenizer files
of ``source`` (the folder the model came from: tokenizer.json, tokenizer_config.json, special tokens, chat
template ...) and a ``plait_export.json`` marker, with ordinary file modes (0644, folders 0755), and commits the
folder with ``storage.folders.write_folder`` (temp folder, fsync, rename, under a lock). Only an earlier export
(the marker) or an empty folder is replaced; any other folder is refused (ForeignFolderError), never deleted.
``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` load the result.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from plait.models.hf.weights import INDEX, SINGLE, expert_names, targets
from plait.storage.folders import ForeignFolderError, fsync_path
from torch.distributed.tensor import DTensor

EXPORTS = ("auto", "always", "never")
EXPORT_DTYPES = ("float32", "float64", "bfloat16")


@dataclass
class ExportSection:
    """A job's ``[export]`` table (the LM and RL jobs): the trained model as a complete HF folder."""

    hf: str = "auto"  # auto (when the model came from a folder) | always | never
    path: str = ""  # "" = <run_dir>/outputs/hf_export
    dtype: str = ""  # "" = the model's dtype

    def check(self) -> None:
        if self.hf not in EXPORTS or (self.dtype and self.dtype not in EXPORT_DTYPES):
            raise ValueError(f"export.hf={self.hf!r} (one of {', '.join(EXPORTS)}), export.dtype={self.dtype!r} "
                             f"(\"\" or one of {', '.join(EXPORT_DTYPES)})")

    def wanted(self, from_folder: bool) -> bool:
        return self.hf == "always" or (self.hf == "auto" and from_folder)

    def folder(self, run_dir: str | Path) -> Path:
        return Path(self.path) if self.path else Path(run_dir) / "outputs" / "hf_export"

MARKER = "plait_export.json"  # an export folder Plait may replace (any other folder is refused)
# What a tokenizer and generation need beside the weights; copied from the source folder when it has them.
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


def full_state(model: Any, spec: Any, config_dict: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """This rank's tensors as the HF checkpoint holds them: full (DTensors gathered: a collective), under the
    family's checkpoint names and rows, kv heads de-replicated, a tied lm_head dropped, on the CPU."""
    rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for _name, t in targets(model, getattr(spec, "weight_names", None)).items():
        value = t.param.detach()
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if t.experts:  # stacked experts: each expert's rows split into its checkpoint tensors
            names = iter(expert_names(t, value.shape[0]))
            for expert in value:
                for part in expert.chunk(len(t.experts)):
                    rows[next(names)] = [(part, None)]
            continue
        at = t.rows(torch.arange(value.shape[0])) if t.rows is not None else None
        rows.setdefault(t.ckpt, []).append((value, at))
    out = {}
    for ckpt, pieces in rows.items():
        if config_dict.get("tie_word_embeddings") and ckpt == "lm_head.weight":
            continue
        if len(pieces) == 1 and pieces[0][1] is None:
            full = pieces[0][0]
        else:  # rows permuted, de-replicated, or parts of a fused tensor: place each model row at its row
            pieces = [(v, at if at is not None else torch.arange(v.shape[0])) for v, at in pieces]
            full = pieces[0][0].new_empty((1 + max(int(at.max()) for _, at in pieces), *pieces[0][0].shape[1:]))
            for value, at in pieces:
                full[at] = value
        out[ckpt] = full.to("cpu", dtype or full.dtype).contiguous().clone()
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


def _finish(parts_dir: Path, folder: Path, cfg: dict, source: Path | None) -> None:
    """Rank 0: final file names, the index, config.json, generation config and tokenizer files, the marker, file
    modes; committed by ``write_folder``."""
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
        copied = _copy_companions(source, tmp)
        if "generation_config.json" not in copied:
            _write_generation_config(cfg, tmp)
        (tmp / MARKER).write_text(json.dumps({"written_by": "plait.models.hf.export.export_hf_folder",
                                              "source": str(source) if source else None, "copied": copied}))
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)

    write_folder(folder, build, _is_ours, "Hugging Face export")


def _copy_companions(source: Path | None, tmp: Path) -> list[str]:
    """The tokenizer and generation files of the folder the model came from (those it has)."""
    if source is None or not Path(source).is_dir():
        return []
    copied = []
    for name in COMPANIONS:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, tmp / name)
            copied.append(name)
    return copied


def _write_generation_config(cfg: dict, tmp: Path) -> None:
    """generation_config.json from the model config (its bos/eos/pad ids), as save_pretrained writes one."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    gen = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    gen["_from_model_config"] = True
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(
        dtype, 4)


def export_hf_folder(model: Any, folder: str | Path, config: Any, *, spec: Any = None,
                     dtype: torch.dtype | None = None, source: str | Path | None = None,
                     max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a complete HF folder that ``from_pretrained`` loads, from a model (or this rank's pipeline stages)
    under any plan. Under torch.distributed call it on EVERY rank (DTensors are gathered and the ranks meet at
    barriers); rank 0 commits the folder atomically. ``config`` is the config the model was built from (a HF
    PretrainedConfig, or a Plait ``GPTConfig``: a GPT is written as a HF Llama); ``spec`` its family
    (default: found from the config); ``source`` the folder whose tokenizer and generation files go with it.
    Returns ``folder``."""
    from plait.models.registry import spec_for_config

    folder = Path(folder)
    spec = spec or spec_for_config(config)
    cfg = spec.export_config(config)
    state = full_state(model, spec, cfg, dtype)
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
            _finish(parts_dir, folder, cfg, Path(source) if source else None)
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
    if world:
        dist.barrier()
    return folder
