"""Data-parallel engines over an explicit dp DeviceMesh: DDP, FSDP2, DeepSpeed ZeRO-1/2/3.

    check_engine_combination("zero2", pp=1, tp=1)             # ValueError for combinations that cannot run
    model = apply_ddp(model, mesh["dp"], device)               # or:
    model = apply_fsdp2(model, mesh["dp"], mixed_precision="bf16")
    engine = build_deepspeed_engine(model, mesh["dp"], stage=3, lr=3e-3, weight_decay=0.1,
                                    betas=(0.9, 0.95), grad_clip=1.0, micro_batch_size=8)
    loss = deepspeed_train_step(engine, inputs, targets, loss_fn, lr=lr)   # forward, backward, step
    params = full_parameters(model_or_engine)                 # {name: full tensor}; a collective

Every function takes the dp mesh (1-D: ``mesh["dp"]`` of a (dp, pp, cp, tp) mesh, or ``mesh["dp_cp"]`` under
context parallelism, whose ranks hold the same parameters and see other tokens) and uses
only its group: no default-group assumptions, except DeepSpeed's, which shards over the whole world
and so requires dp == world size (checked, with a message that says what to use instead).

DDP and FSDP2 keep the caller's optimizer and train loop. DeepSpeed owns the optimizer step: the
engine returned is DeepSpeed's own, driven as ``engine(x)`` -> ``engine.backward(loss)`` ->
``engine.step()`` (``deepspeed_train_step`` does exactly that). With ``grad_accum > 1`` call it
once per micro-batch; DeepSpeed scales the loss and steps only on the accumulation boundary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
PRECISIONS = ("fp32", "bf16")
# DeepSpeed's PipelineEngine.__init__ (deepspeed 0.19.8, runtime/pipe/engine.py), quoted in errors.
DS_PIPE_ASSERT = "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"


def check_engine_combination(engine: str, pp: int, tp: int, dp: int | None = None, cp: int = 1) -> str:
    """Raise ValueError when ``engine`` cannot run with this pp/tp/cp; otherwise return a one-line note.
    Gradients are reduced over dp x cp (the ranks holding the same parameters); with ``dp * cp == 1``
    DDP is never applied (nothing to replicate over), so it combines with anything."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if pp < 1 or tp < 1 or cp < 1:
        raise ValueError(f"pp={pp}, tp={tp}, cp={cp}: all must be >= 1")
    if engine in ZERO_STAGES and cp > 1:
        raise ValueError(
            f"engine={engine!r} with cp={cp}: DeepSpeed ZeRO shards over the whole world as if every rank saw "
            "other sequences, while context-parallel ranks share each sequence (gradients reduce over dp x cp). "
            "Use engine='fsdp2' (shards over dp x cp, as torchtitan does) or engine='ddp'"
        )
    if dp is not None:
        dp = dp * cp  # the ranks gradients are reduced over
    if engine in ZERO_STAGES:
        if pp > 1:
            raise ValueError(
                f"engine={engine!r} with pp={pp}: DeepSpeed ZeRO owns forward/backward/step and cannot drive "
                "Plait's torch.distributed.pipelining schedules; DeepSpeed's own PipelineEngine asserts "
                f"{DS_PIPE_ASSERT!r} (and only ZeRO-1 with its PipelineModule). Plait composes pipeline "
                "parallelism with FSDP2 instead: use engine='fsdp2' (ZeRO-3-like sharding)"
            )
        if tp > 1:
            raise ValueError(
                f"engine={engine!r} with tp={tp}: DeepSpeed ZeRO flattens plain tensors and shards them over "
                "the whole world; it does not understand Plait's DTensor tensor-parallel parameters (nor a "
                "dp group smaller than the world). Use engine='fsdp2', which shards DTensors over mesh['dp']"
            )
        return f"DeepSpeed ZeRO-{ZERO_STAGES[engine]} over the whole world (dp == world size, pp = tp = 1)"
    if engine == "ddp" and dp == 1:
        return "one data-parallel rank: no DDP wrapper is applied"
    if engine == "ddp" and tp > 1:
        raise ValueError(
            f"engine='ddp' with tp={tp}: DDP all-reduces local tensors and does not handle DTensor "
            "tensor-parallel parameters (torchtitan refuses DDP with >1-D parallelism too). "
            "Use engine='fsdp2' for dp x tp"
        )
    if engine == "ddp" and pp > 1:
        raise ValueError(
            f"engine='ddp' with pp={pp}: under torch 2.13's pipelining schedules DDP's reducer fails its "
            "first-iteration bucket rebuild (INTERNAL ASSERT 'rebuilt parameter indices size is not same as "
            "original model parameters size', seen with 1F1B, Interleaved1F1B and ZBVZeroBubble). "
            "Use engine='fsdp2' for dp x pp"
        )
    if engine == "ddp":
        return "DDP replicates each model part and all-reduces gradients over mesh['dp'] (mesh['dp_cp'] with cp > 1)"
    return ("FSDP2 shards each block's parameters over mesh['dp'] (mesh['dp_cp'] with cp > 1; composes with "
            "DTensor TP and pipeline stages)")


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Wrap ``model`` (already on ``device``) in DDP over the dp mesh's process group."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _check_1d(dp_mesh)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, process_group=dp_mesh.get_group())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: ``model.layers`` and/or HF-style ``model.model.layers``."""
    blocks: list[nn.Module] = []
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None) if isinstance(owner, nn.Module) else None
        if isinstance(layers, nn.ModuleDict):
            blocks.extend(layers.values())
        elif isinstance(layers, (nn.ModuleList, nn.Sequential)):
            blocks.extend(layers)
    return blocks


def apply_fsdp2(model: nn.Module, dp_mesh: DeviceMesh, *, mixed_precision: str = "fp32",
                reshard_after_forward: bool = True,
                inner: list[tuple[nn.Module, DeviceMesh]] | tuple = ()) -> nn.Module:
    """``fully_shard`` every transformer block, then the root (embeddings, norm, output) over the dp mesh.
    A model without blocks (``transformer_blocks`` finds none: an MLP, a CNN) is one unit: the root.

    bf16 computes in bfloat16 parameters and reduces gradients in float32; the sharded parameters the
    optimizer sees stay float32. Parameters that are already DTensors on a tp mesh (TP applied first)
    become 2-D (dp, tp) DTensors: FSDP2 needs dp_mesh and the tp mesh cut from the same root mesh.
    The last block keeps its parameters after forward, since backward starts with it (torchtitan's rule).
    ``inner``: ``(module, mesh)`` sharded first over their own 1-D mesh (expert parallelism: an experts module over
    ``mesh["dp_mod_ep"]``); the blocks then leave its parameters to it.
    Returns the same module, now an FSDPModule.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _check_1d(dp_mesh)
    _check_precision(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for module, mesh in inner:
        _check_1d(mesh)
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    # The root is left at FSDP2's default (None): backward starts there, so it keeps its parameters
    # after forward instead of all-gathering them again (True would force a second gather).
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=None if reshard_after_forward else False)
    return model


def torch_extensions_dir() -> Path:
    """Where DeepSpeed's JIT-built ops are cached: $TORCH_EXTENSIONS_DIR, else ~/.cache/plait/torch_extensions
    (outside the checkout, so a fresh clone does not pay the 30-90 s compile of the CPU comm op again)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "plait" / "torch_extensions")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def deepspeed_config(*, stage: int, dp: int, grad_clip: float, mixed_precision: str, micro_batch_size: int,
                     grad_accum: int = 1) -> dict:
    """The DeepSpeed config dict build_deepspeed_engine uses (the optimizer is passed as an object)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage={stage}: DeepSpeed ZeRO stage must be 1, 2 or 3")
    _check_precision(mixed_precision)
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}, grad_accum={grad_accum}: both must be >= 1")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp,
        "gradient_clipping": float(grad_clip),  # 0.0 = off (DeepSpeed's default)
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": mixed_precision == "bf16"},  # fp16 (loss scaling) is not offered on CPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_engine(model: nn.Module, dp_mesh: DeviceMesh, *, stage: int, lr: float, weight_decay: float,
                           betas: tuple[float, float], grad_clip: float, mixed_precision: str = "fp32",
                           micro_batch_size: int, grad_accum: int = 1):
    """A DeepSpeed ZeRO-``stage`` engine over the dp mesh (which must span the world) with torch AdamW.

    torch.distributed must already be initialised (Plait's worker group does it); DeepSpeed wraps that
    group instead of starting its own. torch.optim.AdamW is passed in as an object: DeepSpeed's
    FusedAdam needs CUDA and its CPUAdam needs another JIT compile. Returns the DeepSpeedEngine.
    """
    _check_1d(dp_mesh)
    if not dist.is_initialized():
        raise RuntimeError("build_deepspeed_engine needs torch.distributed initialised (run it inside a rank)")
    world = dist.get_world_size()
    if dp_mesh.size() != world:
        raise ValueError(
            f"DeepSpeed ZeRO shards over the whole world, but the dp mesh holds {dp_mesh.size()} of {world} "
            "ranks: ZeRO in Plait needs dp == world size (pp = tp = 1). Use engine='fsdp2' to combine data "
            "parallelism with pipeline or tensor parallelism"
        )
    config = deepspeed_config(stage=stage, dp=dp_mesh.size(), grad_clip=grad_clip, mixed_precision=mixed_precision,
                              micro_batch_size=micro_batch_size, grad_accum=grad_accum)
    torch_extensions_dir()  # before deepspeed builds its comm op
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def set_deepspeed_lr(engine, lr: float) -> None:
    """Set the learning rate for the next ``engine.step()`` (Plait's schedules are stateless)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def deepspeed_train_step(engine, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                         lr: float | None = None) -> torch.Tensor:
    """One micro-batch: forward, backward, step (a no-op until the accumulation boundary). Returns this
    rank's (unscaled) loss, detached. ``inputs`` is a tensor, a tuple of positional or a dict of keyword
    arguments for the model; ``loss_fn(output, targets)`` returns the mean loss over the micro-batch.
    Under bf16 the engine's module is bf16, so floating-point inputs are cast to bf16 first."""
    if lr is not None:
        set_deepspeed_lr(engine, lr)
    inputs = to_device(inputs, engine.device)
    if engine.bfloat16_enabled():
        inputs = to_device(inputs, engine.device, floating=torch.bfloat16)
    loss = loss_fn(call_model(engine, inputs), to_device(targets, engine.device))
    engine.backward(loss)
    engine.step()
    return loss.detach()


def to_device(batch: Any, device: torch.device | str, floating: torch.dtype | None = None) -> Any:
    """``batch`` (a tensor, or tuples / lists / dicts of them) on ``device``; floating-point tensors also
    cast to ``floating`` when given. Anything else passes through."""
    if isinstance(batch, torch.Tensor):
        if floating is not None and batch.is_floating_point():
            return batch.to(device, floating)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device, floating) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, floating) for v in batch)
    return batch


def call_model(model: Callable, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of every parameter, by the unwrapped model's names, for comparison or export.

    A collective on the dp group for FSDP2 (DTensor.full_tensor) and ZeRO-3 (GatheredParameters): call
    it on every rank. DeepSpeed with bf16 gives the bf16 working copies; use
    deepspeed.utils.safe_get_full_fp32_param for the fp32 masters.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if _is_deepspeed_engine(model):
        module = model.module
        if model.zero_optimization_stage() == 3:
            import deepspeed

            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {name: p.detach().clone() for name, p in module.named_parameters()}
        return {name: p.detach().clone() for name, p in module.named_parameters()}
    if isinstance(model, DDP):
        model = model.module
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = t.full_tensor() if isinstance(t, DTensor) else t.clone()
    return out


def _is_deepspeed_engine(model) -> bool:
    return type(model).__module__.startswith("deepspeed.") and hasattr(model, "zero_optimization_stage")


def _check_1d(dp_mesh: DeviceMesh) -> None:
    if not isinstance(dp_mesh, DeviceMesh) or dp_mesh.ndim != 1:
        raise ValueError(f"expected a 1-D dp DeviceMesh (e.g. mesh['dp']), got {dp_mesh!r}")


def _check_precision(mixed_precision: str) -> None:
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r}: choose one of {', '.join(PRECISIONS)}")
