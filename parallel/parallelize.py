"""Apply a ParallelPlan to an unmodified model, from outside, as a short recipe of steps.

    parts = parallelize(build_model, plan, mesh, device, optim_cfg, global_batch=16, loss_fn=None, spec=spec)
    loss = parts.train_step(inputs, targets, lr)    # the global mean loss, on every rank

The recipe, in torchtitan's order, each step on its named sub-mesh:
  1. build the model (same seed on every rank) and, with pp > 1, cut this rank's pipeline stages;
  2. tensor (+ sequence, loss) parallelism on ``mesh["tp"]``;
  3. expert parallelism on ``mesh["ep"]`` (expert_parallel.py: the spec's experts modules sharded, tokens
     dispatched with all-to-all), context parallelism on ``mesh["cp"]`` (ring attention, context_parallel.py);
  4. activation checkpointing (off / full / selective), then ``plan.compile`` (each block, or the whole part,
     and the default loss: compile.py);
  5. mixed precision and data parallelism on ``data_mesh(mesh)``: ``mesh["dp"]``, or ``mesh["dp_cp"]``
     with cp > 1 (parameters are replicated over cp): DDP or FSDP2 per part (a DeepSpeed ZeRO engine
     instead of steps 1-5 when the plan says zero1/2/3: DeepSpeed then owns the optimizer step); with ep > 1 each
     experts module first over ``mesh["dp_mod_ep"]`` (mesh.py; expert_parallel.py says how its gradients
     become the mean over dp);
  6. one AdamW per part, and a train step that a pipeline schedule or a plain forward/backward drives;
     gradient clipping uses the global norm across tp, dp, cp and pp (one all-reduce per mesh dimension).

``train_step(inputs, targets, lr)`` takes this dp rank's batch (every cp rank of a dp group passes the
same one): with cp > 1 it keeps this cp rank's zigzag piece of each sequence (``shard_batch``), and the
loss it returns is the mean over dp and cp, the full batch's mean loss.

The batch and the loss are the caller's: ``inputs`` go to the model (a tensor, or a tuple of
positional / a dict of keyword arguments), ``targets`` (any shape, e.g. class labels) go with the
model's output to ``loss_fn(output, targets) -> scalar``. The default is next-token cross-entropy
(``tp_loss``, vocab-parallel under ``plan.loss_parallel``, where the output is a vocab-sharded DTensor).
The loss must be the MEAN over this rank's batch: DDP, FSDP2 and ZeRO average gradients over dp (x cp), and
pipeline schedules call it once per microbatch and divide the summed gradient by the microbatch count,
so a sum-reducing loss would train with a gradient scaled by the batch size.

Any ``nn.Module`` trains with data parallelism (DDP, FSDP2: ``fully_shard`` on the root when it has no
``layers`` blocks, ZeRO). Tensor, pipeline and context parallelism split a model through its family's spec
(``plait.models``: ``spec.tensor_parallel``, ``spec.cut_stage``, ``spec.attention``), which the caller hands in
(``spec=model_spec("gpt")``, ``spec_for_config(hf_config)``); this module imports no family. Without a spec, or
with a family that lacks the piece, tp, pp or cp > 1 is refused (PlanError naming what is missing).

Pretrained weights (``weights=`` a local HF folder): ``build_model`` then runs under ``torch.device("meta")``,
tensor parallelism, activation checkpointing and FSDP2 are applied to the meta model, and only then does each
rank allocate its own shards on ``device`` (``to_empty``, then ``spec.reset_buffers``) and read its slices of the
checkpoint (``spec.load_weights``): no rank ever holds the full model (DDP and ZeRO hold a full replica by
design; they load before wrapping). When tp exceeds a model's kv heads the heads are replicated
(parallel/kv_replication.py) and ``train_step`` sums the copies' gradients (``sync_replicated_kv_grads``)
before clipping and the optimizer step. ``init_seed=S`` without ``weights`` takes the same meta path for a
model trained from scratch: each rank draws only its shards (``meta_init``, per-parameter seeds, the family's
``spec.init_value`` rule), so the initial model is identical under every plan and no rank allocates the whole.

Mixed precision (``plan.mixed_precision="bf16"``): FSDP2's MixedPrecisionPolicy where FSDP2 is
applied (engine fsdp2, dp * cp > 1), DeepSpeed's bf16 under ZeRO, and everywhere else (DDP, tp without
FSDP, pipeline stages, one rank) each model part's forward and the loss run under
``torch.autocast(device_type, torch.bfloat16)``: float32 parameters (what the optimizer steps), bf16
activations, float32 gradients, reduced in float32. It needs a float32 model (refused otherwise).

Float8 (``plan.float8="tensorwise"|"rowwise"``, float8.py): step 1 swaps the blocks' linears for torchao's
Float8Linear (emulated on CPU); TP then uses torchao's float8 styles for them (tensorwise), FSDP2 all-gathers
them in float8 (tensorwise) and ``train_step`` precomputes their scales after the optimizer step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.compile import apply_compile, compile_loss, compile_violations
from plait.parallel.context_parallel import apply_context_parallel, shard_batch
from plait.parallel.data_parallel import (
    ZERO_STAGES,
    apply_ddp,
    apply_fsdp2,
    build_deepspeed_engine,
    call_model,
    deepspeed_train_step,
    full_parameters,
    to_device,
)
from plait.parallel.expert_parallel import apply_expert_parallel, expert_modules, sharded_experts
from plait.parallel.float8 import after_optimizer_step, convert_model, float8_violations
from plait.parallel.grad_clip import clip_grad_norm, comm_device
from plait.parallel.kv_replication import replicated, sync_replicated_kv_grads
from plait.parallel.loss import tp_loss
from plait.parallel.low_bit_optim import STATES, LowBitAdamW
from plait.parallel.mesh import data_mesh
from plait.parallel.meta_init import init_shards
from plait.parallel.names import clean_fqn
from plait.parallel.pipeline import build_pipeline
from plait.parallel.plan import ParallelPlan, PlanError, engine_violations
from plait.parallel.tensor_parallel import apply_tensor_parallel, keep_grads_sharded
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

LossFn = Callable[[Any, Any], torch.Tensor]  # (model output, targets) -> mean loss over the batch


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    states: str = "fp32"  # AdamW's moments: fp32 | bf16 | 8bit (block-wise quantized; parallel/low_bit_optim.py)

    def check(self) -> None:  # runtime/config.py calls it when the spec is read
        if self.states not in STATES:
            raise ValueError(f"train.optim.states = {self.states!r}: choose one of {', '.join(STATES)} (8bit: "
                             f"block-wise quantized moments, about 2 bytes per parameter instead of 8)")


def optim_states_refusal(engine: str, states: str) -> str:
    return (f"train.optim.states = {states!r} with plan.engine = {engine!r}: a DeepSpeed ZeRO engine owns its "
            f"optimizer (fp32 AdamW over its partitions); use engine = \"fsdp2\" or \"ddp\" for {states} states, "
            f"or states = \"fp32\"")


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr. Stateless, so checkpoints need no scheduler."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class Parallelized:
    modules: list[nn.Module]  # the model parts this rank holds (one, or one per pipeline stage)
    optimizers: list[Any]  # one per part (what checkpoints pair with each part); empty under DeepSpeed
    train_step: Callable[[Any, Any, float], float]  # (inputs, targets, lr) -> the global mean loss
    mesh: DeviceMesh
    engine: Any = None  # the DeepSpeed engine under zero1/2/3
    grad_norm: torch.Tensor | None = None  # the last step's global gradient norm before clipping (on device)


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``params``: multi-tensor (foreach) kernels unless the parameters are DTensors on different meshes
    or DTensors and plain tensors mixed (expert parallelism: experts on (dp_mod_ep, ep), the rest on dp; tp with
    replicated experts), which one foreach call cannot take."""
    cfg.check()
    params = list(params)
    foreach = len({p.device_mesh if isinstance(p, DTensor) else None for p in params}) <= 1
    if cfg.states != "fp32":
        return LowBitAdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                           states=cfg.states)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=foreach)


def _set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def _mean_over(value: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The mean of ``value`` over a 1-D mesh (in place; a no-op on one rank)."""
    if mesh.size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG, group=mesh.get_group())
    return value


def _fsdp_applied(plan: ParallelPlan) -> bool:
    return plan.engine == "fsdp2" and plan.dp * plan.cp > 1  # one rank per parameter copy: nothing to shard over


def _autocast_bf16(plan: ParallelPlan) -> bool:
    """bf16 through torch.autocast: every plan that neither FSDP2 nor DeepSpeed casts itself."""
    return plan.mixed_precision == "bf16" and not _fsdp_applied(plan) and plan.engine not in ZERO_STAGES


class under_autocast:  # noqa: N801 - used like a function decorator
    """``fn`` run under ``torch.autocast(device_type, torch.bfloat16)``. An object, not a closure, so a
    deep-copied module whose ``forward`` is one calls the copy's own forward (deepcopy rebinds methods)."""

    def __init__(self, fn: Callable, device_type: str):
        self.fn, self.device_type = fn, device_type

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.fn(*args, **kwargs)


def check_model(model: nn.Module, plan: ParallelPlan, spec: Any = None) -> nn.Module:
    """Refuse, on the rank, what this model cannot do under the plan (see the module docstring)."""
    name = getattr(spec, "name", None)
    family = f"family {name!r}" if name else f"{type(model).__name__} (no model spec given)"
    needs = (("tp", "tensor_parallel", "a tensor-parallel plan"), ("pp", "cut_stage", "a pipeline stage cut"),
             ("cp", "attention", "an attention hook for ring attention"), ("ep", "experts", "its experts modules"))
    for dim, attr, what in needs:
        if getattr(plan, dim) > 1 and not getattr(spec, attr, None):
            raise PlanError(f"plan.{dim}={getattr(plan, dim)}: splitting a model over {dim} needs {what} from its "
                            f"family's spec (plait.models), and {family} has none: pass spec=model_spec(...) / "
                            f"spec_for_config(config), or use {dim}=1 (data parallelism only)")
    found = expert_modules(model, getattr(spec, "experts", ())) if plan.compile != "off" else []
    for msg in compile_violations(plan, experts=getattr(found[0][1], "num_experts", 1)) if found else []:
        raise PlanError(msg)
    if plan.mixed_precision == "bf16":
        other = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32}
        if other:
            raise PlanError(f"mixed_precision='bf16' computes in bf16 from float32 master parameters, but the model "
                            f"has {', '.join(sorted(other))} parameters (autocast leaves float64 as it is): build it "
                            "in float32 or use mixed_precision='fp32'")
    return model


def _loader(weights: str | Path | None, device: torch.device, init_seed: int | None = None,
            spec: Any = None) -> Callable[[nn.Module], None] | None:
    """Allocate a meta-built (sharded) part on ``device`` and read its slices of ``weights`` (or, with
    ``init_seed``, draw them: meta_init.py); None for an ordinary eager build."""
    if weights is None and init_seed is None:
        return None
    if weights is not None and getattr(spec, "load_weights", None) is None:
        raise ValueError(f"parallelize(weights={weights!r}) needs the model's family spec to name the checkpoint's "
                         "tensors: pass spec=spec_for_config(config) (plait.models)")

    def fill(part: nn.Module) -> None:
        part.to_empty(device=device)
        if spec is not None:
            spec.reset_buffers(part)
        if weights is not None:
            spec.load_weights(part, weights)
        else:
            init_shards(part, init_seed, getattr(spec, "init_value", None))

    return fill


def _build(build_model: Callable[[], nn.Module], plan: ParallelPlan, on_meta: bool, spec: Any,
           device: torch.device | None = None) -> nn.Module:
    """Step 1: the model (on meta for a sharded load), checked, its blocks' linears converted to float8."""
    if not on_meta:
        model = check_model(build_model(), plan, spec)
    else:
        with torch.device("meta"):
            model = check_model(build_model(), plan, spec)
    if plan.float8 != "off":  # torchtitan's order: right after building, before pipeline cuts, TP and FSDP2
        try:
            convert_model(model, plan.float8, device, fsdp=_fsdp_applied(plan))
        except ValueError as e:
            raise PlanError(str(e)) from None
    return model


def _shard_part(part: nn.Module, plan: ParallelPlan, mesh: DeviceMesh, device: torch.device,
                fill: Callable[[nn.Module], None] | None = None, spec: Any = None) -> nn.Module:
    """Steps 2-5 on one model part (a whole model or one pipeline stage). ``fill`` (a meta-built part)
    allocates and loads it once sharded: after FSDP2 (each rank its shards), before DDP (a replica)."""
    if plan.tp > 1:
        apply_tensor_parallel(part, mesh["tp"], spec, sequence_parallel=plan.sequence_parallel,
                              loss_parallel=plan.loss_parallel)
    if plan.ep > 1:
        try:
            apply_expert_parallel(part, mesh["ep"], spec.experts, grad_scale=1 / plan.ep)
        except ValueError as e:
            raise PlanError(str(e)) from None
    if plan.cp > 1:
        apply_context_parallel(part, mesh["cp"], spec.attention)
    apply_activation_checkpointing(part, plan.activation_checkpointing)
    apply_compile(part, plan.compile)
    if _autocast_bf16(plan):  # an instance attribute: DDP and PipelineStage call part(...), which finds it
        part.forward = under_autocast(part.forward, device.type)
    if _fsdp_applied(plan):
        # With tp > 1 the parameters are DTensors on mesh["tp"]; FSDP2 makes them 2-D (dp or dp_cp, tp).
        inner = [(m, mesh["dp_mod_ep"]) for m in sharded_experts(part)]
        apply_fsdp2(part, data_mesh(mesh), mixed_precision=plan.mixed_precision, inner=inner)
        if fill is not None:
            fill(part)
        return part
    if fill is not None:
        fill(part)
    if plan.tp > 1:  # after fill: to_empty may swap the parameter objects
        keep_grads_sharded(part)
    if plan.engine == "ddp" and plan.dp * plan.cp > 1:
        part = apply_ddp(part, data_mesh(mesh), device)
    return part


def parallelize(build_model: Callable[[], nn.Module], plan: ParallelPlan, mesh: DeviceMesh,
                device: torch.device, optim: OptimConfig, global_batch: int | None = None,
                loss_fn: LossFn | None = None, weights: str | Path | None = None,
                init_seed: int | None = None, spec: Any = None) -> Parallelized:
    """This rank's parts of ``build_model()`` under ``plan`` and a ``train_step(inputs, targets, lr)``.

    ``loss_fn(output, targets)`` must return the mean loss over the batch it is given (see the module
    docstring); None is next-token cross-entropy. ``global_batch`` (sequences or samples per optimizer
    step over all dp ranks) is needed by the DeepSpeed engines only. ``spec``: the model's family
    (plait.models), needed for tp, pp, cp, ``weights`` and ``init_seed``. ``weights``: a local Hugging Face
    folder; the model is then built on the meta device and each rank loads only its shards from it
    (``build_model`` must make the folder's architecture, e.g. ``spec.build(config)``).
    ``init_seed`` (no ``weights``): built on meta too, each rank's shards drawn per parameter from
    (seed, name) by the family's ``init_value`` rule (meta_init.py): the same model under every plan."""
    plan.check()  # (float8 with a ZeRO engine, ep with another engine, pp or cp are refused here)
    if plan.cp > 1:  # the rest is checked by plan.validate; these would fail deep inside an engine
        for msg in engine_violations(plan):
            raise PlanError(msg)
        if plan.pp > 1:
            raise PlanError(f"plan.cp={plan.cp} with plan.pp={plan.pp}: context parallelism does not combine with "
                            "pipeline stages: use pp=1")
    if loss_fn is None:
        loss_fn = functools.partial(tp_loss, loss_parallel=plan.loss_parallel)
        if not plan.loss_parallel and plan.engine not in ZERO_STAGES:
            loss_fn = compile_loss(loss_fn, plan.compile)
    if plan.engine in ZERO_STAGES:
        return _parallelize_deepspeed(build_model, plan, mesh, device, optim, global_batch, loss_fn, weights,
                                      init_seed, spec)
    if _autocast_bf16(plan):
        loss_fn = under_autocast(loss_fn, device.type)
    fill = _loader(weights, device, init_seed, spec)
    if plan.pp > 1:
        pipe = build_pipeline(lambda: _build(build_model, plan, fill is not None, spec, device), mesh["pp"], spec,
                              schedule=plan.schedule, microbatches=plan.microbatches,
                              virtual_stages=plan.virtual_stages, loss_fn=loss_fn, device=device,
                              parallelize_stage=lambda part: _shard_part(part, plan, mesh, device, fill, spec),
                              materialize=fill is None)
        modules = pipe.modules
    else:
        pipe = None
        model = _build(build_model, plan, fill is not None, spec, device)
        modules = [_shard_part(model if fill is not None else model.to(device), plan, mesh, device, fill, spec)]
    # frozen parameters (LoRA's base weights) are no optimizer's: no state, no weight decay, no step
    optimizers = [make_optimizer([p for p in m.parameters() if p.requires_grad], optim) for m in modules]
    cp_rank = mesh.get_local_rank("cp") if plan.cp > 1 else 0
    replicated_kv = plan.tp > 1 and any(replicated(m) for m in modules)

    def train_step(inputs: Any, targets: Any, lr: float) -> float:
        _set_lr(optimizers, lr)
        inputs, targets = shard_batch(inputs, targets, cp_rank, plan.cp)
        if pipe is not None:
            loss = pipe.step(to_device(inputs, device), to_device(targets, device))  # clears grads itself
            loss = _broadcast_from_last_stage(loss, mesh, pipe.has_last)
        else:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(call_model(modules[0], to_device(inputs, device)), to_device(targets, device))
            loss.backward()
        if replicated_kv:  # copies of one kv head: each gets the head's whole gradient
            sync_replicated_kv_grads(modules)
        if optim.grad_clip > 0:
            result.grad_norm = clip_grad_norm(modules, optim.grad_clip, mesh)
        for opt in optimizers:
            opt.step()
        if plan.float8 != "off":  # FSDP2's float8 all-gather: next step's weight scales, from the new weights
            after_optimizer_step(modules)
        return float(_mean_over(loss.detach().double().reshape(()).clone(), data_mesh(mesh)))

    result = Parallelized(modules=modules, optimizers=optimizers, train_step=train_step, mesh=mesh)
    return result


def _broadcast_from_last_stage(loss: torch.Tensor | None, mesh: DeviceMesh, has_last: bool) -> torch.Tensor:
    """Every pp rank learns the loss computed where the last stage lives (sum: only that rank adds)."""
    value = loss.detach().double().reshape(()).clone() if has_last else torch.zeros((), dtype=torch.float64)
    value = value.to(comm_device(mesh))
    dist.all_reduce(value, group=mesh["pp"].get_group())
    return value


def _parallelize_deepspeed(build_model, plan, mesh, device, optim, global_batch, loss_fn, weights,
                           init_seed=None, spec=None) -> Parallelized:
    if global_batch is None:
        raise ValueError("DeepSpeed engines need the global batch size (parallelize(..., global_batch=N))")
    if optim.states != "fp32":
        raise PlanError(optim_states_refusal(plan.engine, optim.states))
    for msg in float8_violations(plan.float8, plan.engine):
        raise PlanError(msg)
    fill = _loader(weights, device, init_seed, spec)
    model = _build(build_model, plan, fill is not None, spec)
    if fill is not None:
        fill(model)  # ZeRO partitions a full replica that the engine receives
    model = model.to(device)
    apply_activation_checkpointing(model, plan.activation_checkpointing)
    engine = build_deepspeed_engine(
        model, mesh["dp"], stage=ZERO_STAGES[plan.engine], lr=optim.lr, weight_decay=optim.weight_decay,
        betas=(optim.beta1, optim.beta2), grad_clip=optim.grad_clip, mixed_precision=plan.mixed_precision,
        micro_batch_size=global_batch // plan.dp,
    )

    def train_step(inputs: Any, targets: Any, lr: float) -> float:
        loss = deepspeed_train_step(engine, inputs, targets, loss_fn, lr=lr)
        return float(_mean_over(loss.double().reshape(()).clone(), data_mesh(mesh)))

    return Parallelized(modules=[engine.module], optimizers=[], train_step=train_step, mesh=mesh, engine=engine)


def iter_unsharded_parameters(parts: Parallelized | list[nn.Module], only: Callable[[str], bool] | None = None):
    """``(name, full tensor)`` of this rank's parameters one at a time (each gathered when it is reached: a
    collective per DTensor parameter, so every rank of its meshes must iterate in step), so a caller that hands
    each on (a bucket to the object store) never holds the whole model. Names as ``unsharded_parameters``;
    ``only``: the names to yield (e.g. LoRA adapters; the others are never gathered)."""
    if isinstance(parts, Parallelized) and parts.engine is not None:  # ZeRO: DeepSpeed gathers a module at once
        yield from ((n, t) for n, t in unsharded_parameters(parts).items() if only is None or only(n))
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    for module in parts.modules if isinstance(parts, Parallelized) else list(parts):
        module = module.module if isinstance(module, DDP) else module
        for name, p in module.named_parameters():
            name = clean_fqn(name)
            if only is not None and not only(name):
                continue
            t = p.detach()
            yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


def unsharded_parameters(parts: Parallelized | list[nn.Module]) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of this rank's parameters, named as in the unwrapped model
    (``model.state_dict()`` of a plain ``build_model()``), e.g. to publish weights to inference actors.
    A collective under FSDP2 and ZeRO-3: call it on every rank of the data-parallel group. Under pipeline
    parallelism a rank returns its own stages' parameters only."""
    if isinstance(parts, Parallelized):
        modules = [parts.engine] if parts.engine is not None else parts.modules
    else:
        modules = list(parts)
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        for name, tensor in full_parameters(module).items():
            out[clean_fqn(name)] = tensor
    return out
