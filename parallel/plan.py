"""ParallelPlan: how a model is split, declared in Python and checked before any process starts.

    plan = ParallelPlan(dp=2, tp=2, pp=2, engine="fsdp2", schedule="Interleaved1F1B",
                        microbatches=4, virtual_stages=2, sequence_parallel=True)
    plan.validate(world_size=8, model=gpt_cfg, batch_per_dp_rank=8)   # raises PlanError
    ParallelPlan(dp=2, cp=2, engine="fsdp2").validate(4, gpt_cfg, seq_len=4096)   # context parallelism

Each violation names the constraint, the values, and a plan that would work. ``model`` is the model's sizes,
a ``DecoderShape`` (parallel/shape.py) that its family's spec gives (``plait.models``: ``spec.shape(config)``;
a Plait ``GPTConfig`` is accepted as it is). kv heads need not divide tp when the family replicates them and tp
is a multiple of them. Pass None for a model of your own, which can then use data parallelism only (tp and pp
split a model's heads and blocks). Field types are checked when the plan is made: ``ParallelPlan(dp="2")``
raises PlanError("plan.dp must be int, got str '2'").

``mixed_precision="bf16"`` is honoured by every plan: FSDP2 (engine fsdp2 with dp > 1) through its
MixedPrecisionPolicy, ZeRO through DeepSpeed's bf16 mode, everything else (DDP, tensor parallelism
without FSDP, pipelines, one rank) by running each model part's forward under ``torch.autocast``
(bf16): float32 master parameters, bf16 activations, float32 gradients and gradient reduction. It
needs a float32 model (``model_dtype``): autocast leaves float64 operations in float64.

``float8="tensorwise"|"rowwise"`` trains the blocks' linears through torchao's float8 (float8.py): on a GPU of
compute capability >= 8.9, or on the CPU in torchao's emulation mode; not with DeepSpeed ZeRO, nor a float64 model.

``ep`` (expert parallelism, expert_parallel.py): a mixture-of-experts model's experts sharded over ep ranks, tokens
sent to their experts' ranks and back with all-to-all. ep sits inside dp (``mesh.Layout``: dp = dp/ep x ep, not a
factor of the world size): ep must divide dp and the number of experts, needs engine fsdp2 (expert parameters
FSDP2-sharded over the dp/ep ranks holding the same experts, the rest over dp), pp == 1 and cp == 1, and a family
whose spec names its experts modules (``ModelSpec.experts``). It composes with tp (attention split, experts
replicated over tp) and activation checkpointing.

``cp`` (context parallelism, context_parallel.py): each of cp ranks holds a zigzag piece of every
sequence and attention runs as ring attention. The ranks are laid out by ``mesh.Layout`` as
``arange(world).view(dp, pp, cp, tp)``; gradients are reduced, FSDP2 shards and the loss is averaged
over dp x cp. It needs a family with a ring-attention hook (its spec), ``seq_len % (2*cp) == 0``, pp == 1 and engine ddp
or fsdp2.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from plait.parallel.activation_checkpoint import MODES as CHECKPOINTING
from plait.parallel.compile import MODES as COMPILE_MODES
from plait.parallel.compile import compile_violations
from plait.parallel.data_parallel import ENGINES, PRECISIONS, check_engine_combination
from plait.parallel.expert_parallel import expert_violations
from plait.parallel.float8 import RECIPES as FLOAT8_RECIPES
from plait.parallel.float8 import float8_violations
from plait.parallel.mesh import Layout
from plait.parallel.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from plait.parallel.pipeline import check_schedule, schedule_name
from plait.parallel.shape import decoder_shape

SCHEDULES = tuple(PIPELINE_SCHEDULES)  # every schedule torch's pipelining ships (pipeline.py: placement rules)


class PlanError(ValueError):
    """The plan cannot run; the message says which constraint failed and a plan that works."""

    user_error = True  # the CLI prints the message and exits 2 (runtime/cli.py)


@dataclass
class ParallelPlan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: ranks sharing each sequence (ring attention; pp == 1)
    ep: int = 1  # expert parallelism: dp ranks the experts are split over (divides dp; expert_parallel.py)
    sequence_parallel: bool = False  # shard norms/residual activations along the sequence (needs tp > 1)
    loss_parallel: bool = False  # keep logits vocab-sharded into the cross-entropy (needs tp > 1)
    engine: str = "ddp"  # data-parallel engine: ddp | fsdp2 | zero1 | zero2 | zero3 (DeepSpeed)
    schedule: str = "1F1B"  # pipeline schedule, by torch.distributed.pipelining's name
    microbatches: int = 1
    virtual_stages: int = 1  # pipeline stages per pp rank (2+ for interleaved / V schedules)
    activation_checkpointing: str = "off"  # off | full | selective (every other block)
    mixed_precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master parameters and gradient reduction)
    float8: str = "off"  # off | tensorwise | rowwise: the blocks' linears through torchao's float8 (float8.py)
    compile: str = "off"  # off | blocks | model: torch.compile each transformer block, or the whole part (compile.py)

    def __post_init__(self) -> None:
        _check_types(self)

    @property
    def layout(self) -> Layout:
        """The rank layout of the degrees (mesh.Layout): world size, coordinates, the mesh."""
        return Layout.of(self)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def check(self) -> None:
        """Checks that need no world size or model (also run when a spec is parsed)."""
        _check_types(self)
        for name in ("dp", "tp", "pp", "cp", "ep", "microbatches", "virtual_stages"):
            if getattr(self, name) < 1:
                raise PlanError(f"plan.{name}={getattr(self, name)}: must be >= 1")
        _one_of("engine", self.engine, ENGINES)
        try:  # the one spelling rule (pipeline.schedule_name: case-insensitive, like torch)
            self.schedule = schedule_name(self.schedule)
        except ValueError as e:
            raise PlanError(f"plan.schedule={self.schedule!r}: {e}") from None
        _one_of("activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        _one_of("mixed_precision", self.mixed_precision, PRECISIONS)
        _one_of("float8", self.float8, FLOAT8_RECIPES)
        _one_of("compile", self.compile, COMPILE_MODES)
        for msg in float8_violations(self.float8, self.engine):
            raise PlanError(msg)
        for msg in compile_violations(self):
            raise PlanError(msg)
        for msg in expert_violations(self):
            raise PlanError(msg)

    def validate(self, world_size: int, model: Any = None, batch_per_dp_rank: int | None = None, *,
                 world_name: str = "world_size", model_dtype: Any = None, seq_len: int | None = None) -> None:
        """Raise PlanError unless the plan runs on ``world_size`` ranks with this model. ``world_name`` is
        what the world size is called in the message (a job spec passes "workers.num"); ``model_dtype``
        (a torch dtype or its name) is the parameters' dtype, checked against mixed_precision; ``seq_len``
        (tokens per training sequence) is checked against cp."""
        self.check()
        good = suggest_plan(world_size, model, self)
        fix = f"; a plan that works: {good}" if good else ""
        if self.world_size != world_size:
            raise PlanError(f"{self.layout.product()} but the job has {world_size} ranks: make the product equal "
                            f"{world_name}{fix}")
        if model_dtype is not None:
            for msg in precision_violations(self, model_dtype) + float8_violations(self.float8, self.engine,
                                                                                   model_dtype):
                raise PlanError(msg)
        for msg in model_violations(self, model):
            raise PlanError(msg + fix)
        for msg in context_violations(self, model, seq_len):
            raise PlanError(msg)
        for msg in expert_violations(self, model):
            raise PlanError(msg)
        shape = decoder_shape(model)
        for msg in compile_violations(self, shape.n_experts if shape is not None else 0):
            raise PlanError(msg)
        for msg in schedule_violations(self):
            raise PlanError(msg)
        for msg in engine_violations(self):
            raise PlanError(msg)
        if batch_per_dp_rank is not None and self.pp > 1 and batch_per_dp_rank % self.microbatches:
            raise PlanError(
                f"the batch per data-parallel rank ({batch_per_dp_rank}) must split into plan.microbatches="
                f"{self.microbatches} equal microbatches: pick microbatches dividing {batch_per_dp_rank}"
            )

    def describe(self) -> str:
        parts = [f"dp{self.dp}({self.engine})", *([f"ep{self.ep}"] if self.ep > 1 else []),
                 *([f"cp{self.cp}"] if self.cp > 1 else []),
                 f"tp{self.tp}" + ("+sp" if self.sequence_parallel else ""), f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(f"{self.schedule}x{self.microbatches}mb" + (f"/v{self.virtual_stages}"
                                                                   if self.virtual_stages > 1 else ""))
        if self.float8 != "off":
            parts.append(f"float8({self.float8})")
        if self.compile != "off":
            parts.append(f"compile({self.compile})")
        return " ".join(parts)


def _check_types(plan: ParallelPlan) -> None:
    """Each field holds its declared type (bools are not ints here, ints are not bools)."""
    kinds = {"int": int, "bool": bool, "str": str}
    for f in fields(plan):
        want, value = kinds[f.type], getattr(plan, f.name)
        if type(value) is not want:
            raise PlanError(f"plan.{f.name} must be {f.type}, got {type(value).__name__} {value!r}")


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise PlanError(f"plan.{name}={value!r} is not one of: {', '.join(valid)}")


def model_violations(plan: ParallelPlan, model: Any) -> list[str]:
    """What the model's sizes forbid; ``model`` is a DecoderShape (or a GPTConfig), None for a model Plait cannot
    split (dp only)."""
    shape = decoder_shape(model)
    if shape is None:
        if plan.tp > 1 or plan.pp > 1:
            return [f"plan.tp={plan.tp}, plan.pp={plan.pp}: tensor and pipeline parallelism split a model by its heads "
                    "and blocks, and no model shape was given (a model of your own): use data parallelism only (tp=1, "
                    "pp=1, engine ddp, fsdp2 or zero*), or pass the family's shape (plait.models)"]
        return []
    out = []
    who = f" ({shape.family})" if shape.family else ""
    for dim in ("tp", "pp"):
        if getattr(plan, dim) > 1 and dim not in shape.supports:
            out.append(f"plan.{dim}={getattr(plan, dim)}: the model family{who} has no {dim} plan: use {dim}=1")
    sizes = shape.tp_sizes()
    if plan.loss_parallel:
        sizes["model.vocab_size"] = shape.vocab_size
    replicated_kv = shape.kv_replication and plan.tp % shape.n_kv_heads == 0
    for name, size in sizes.items():
        if size % plan.tp and not (name == "model.n_kv_heads" and replicated_kv):
            also = " nor a multiple of it (kv heads are replicated when tp is)" if name == "model.n_kv_heads" and \
                shape.kv_replication else ""
            out.append(f"{name}={size} is not divisible by plan.tp={plan.tp}{also} (tensor parallelism splits it)")
    stages = plan.num_stages
    if plan.pp > 1 and shape.n_layers % stages:
        out.append(
            f"model.n_layers={shape.n_layers} does not divide into pp*virtual_stages = {plan.pp}*"
            f"{plan.virtual_stages} = {stages} equal pipeline stages"
        )
    if plan.tp == 1 and (plan.sequence_parallel or plan.loss_parallel):
        out.append("plan.sequence_parallel / plan.loss_parallel need plan.tp > 1: turn them off or raise tp")
    return out


def context_violations(plan: ParallelPlan, model: Any = None, seq_len: int | None = None) -> list[str]:
    """What context parallelism (cp > 1) cannot run with: see context_parallel.py."""
    if plan.cp == 1:
        return []
    out = []
    shape = decoder_shape(model)
    if shape is None:
        out.append(f"plan.cp={plan.cp}: context parallelism replaces a decoder's attention with ring attention, and "
                   "no model shape was given (a model of your own): use cp=1, or pass the family's shape")
    elif "cp" not in shape.supports:
        out.append(f"plan.cp={plan.cp}: the model family ({shape.family}) has no ring-attention hook: use cp=1")
    if plan.pp > 1:
        out.append(f"plan.cp={plan.cp} with plan.pp={plan.pp}: context parallelism does not combine with pipeline "
                   f"stages in Plait (stages would need the zigzag positions of hidden states): use pp=1, e.g. "
                   f"dp={plan.dp * plan.pp},cp={plan.cp},tp={plan.tp}")
    return out + sequence_violations(plan, seq_len)


def sequence_violations(plan: ParallelPlan, seq_len: int | None) -> list[str]:
    """Context parallelism cuts each sequence into 2*cp equal chunks (the one statement of the rule)."""
    if plan.cp == 1 or seq_len is None or seq_len % (2 * plan.cp) == 0:
        return []
    fit = seq_len - seq_len % (2 * plan.cp)
    return [f"seq_len={seq_len} is not divisible by 2*plan.cp = {2 * plan.cp}: context parallelism cuts each "
            f"sequence into 2*cp equal chunks (rank r holds chunks r and 2*cp-1-r); use seq_len={fit} or "
            f"{fit + 2 * plan.cp}, or another cp"]


def schedule_violations(plan: ParallelPlan) -> list[str]:
    """What torch's schedule constructors would refuse (see pipeline.check_schedule), before launch."""
    if plan.pp == 1:
        if plan.virtual_stages != 1:
            return [f"plan.virtual_stages={plan.virtual_stages} needs plan.pp > 1 (no pipeline to interleave)"]
        return []
    try:
        check_schedule(plan.schedule, plan.pp, plan.virtual_stages, plan.microbatches)
    except ValueError as e:
        return [str(e)]
    return []


def batch_violations(plan: ParallelPlan, global_batch: int, what: str = "train.global_batch") -> list[str]:
    """The global batch splits evenly over the data-parallel ranks (the one statement of the rule)."""
    if global_batch % plan.dp:
        return [f"{what}={global_batch} must divide evenly over plan.dp={plan.dp} data-parallel ranks"]
    return []


def engine_violations(plan: ParallelPlan) -> list[str]:
    """Engine/plan combinations that cannot run (see data_parallel.check_engine_combination)."""
    try:
        check_engine_combination(plan.engine, plan.pp, plan.tp, plan.dp, plan.cp)
    except ValueError as e:
        return [str(e)]
    return []


def precision_violations(plan: ParallelPlan, model_dtype: Any) -> list[str]:
    """bf16 mixed precision trains float32 master parameters; a float64 model would stay float64 under
    autocast (and be silently down-cast by FSDP2 / DeepSpeed), so it is refused for every engine."""
    name = str(model_dtype).removeprefix("torch.")
    if plan.mixed_precision == "bf16" and name not in ("float32", "float"):
        return [f"mixed_precision='bf16' computes in bf16 from float32 master parameters, but the model is {name}: "
                "build it in float32 (train.dtype=float32) or use mixed_precision='fp32'"]
    return []


def suggest_plan(world_size: int, model: Any, like: ParallelPlan) -> str:
    """The closest valid degrees for ``world_size``: keep tp, pp and cp where possible, fill with dp."""
    candidates = []
    for tp, pp, cp in _factorisations(world_size):
        dp = world_size // (tp * pp * cp)
        trial = replace(like, dp=dp, tp=tp, pp=pp, cp=cp,
                        virtual_stages=like.virtual_stages if pp > 1 else 1,
                        sequence_parallel=like.sequence_parallel and tp > 1,
                        loss_parallel=like.loss_parallel and tp > 1,
                        microbatches=max(like.microbatches, pp))
        if trial.engine != "fsdp2" and dp * cp > 1 and (tp > 1 or pp > 1 or like.ep > 1
                                                         or (cp > 1 and trial.engine != "ddp")):
            trial = replace(trial, engine="fsdp2")
        if (model_violations(trial, model) or context_violations(trial, model) or schedule_violations(trial)
                or engine_violations(trial) or expert_violations(trial, model)):
            continue
        distance = abs(tp - like.tp) + abs(pp - like.pp) + abs(cp - like.cp)
        candidates.append((distance, -dp, trial))
    if not candidates:
        return ""
    best = min(candidates, key=lambda c: c[:2])[2]
    extra = f",engine={best.engine}" if best.engine != like.engine else ""
    if best.pp > 1 and best.microbatches != like.microbatches:
        extra += f",microbatches={best.microbatches}"
    cp = f",cp={best.cp}" if best.cp > 1 or like.cp > 1 else ""
    ep = f",ep={best.ep}" if best.ep > 1 else ""
    return f"dp={best.dp}{ep},tp={best.tp},pp={best.pp}{cp}{extra}"


def _factorisations(world_size: int) -> list[tuple[int, int, int]]:
    """Every (tp, pp, cp) whose product divides ``world_size`` (dp takes the rest)."""
    return [(tp, pp, cp) for tp in _divisors(world_size) for pp in _divisors(world_size // tp)
            for cp in _divisors(world_size // (tp * pp))]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
