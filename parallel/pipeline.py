"""Pipeline parallelism for any model family with a stage cut, through ``torch.distributed.pipelining``.

    pipe = build_pipeline(lambda: GPT(cfg), mesh["pp"], spec, schedule="Interleaved1F1B", microbatches=8,
                          virtual_stages=2, loss_fn=lm_loss, device=ctx.device)
    opt = torch.optim.AdamW(pipe.parameters())
    loss = pipe.step(inputs, targets)      # mean loss on the rank holding the last stage, else None
    opt.step()

Design:

* Stages are cut by layer ranges from one full model built (same seed) on every rank, by its family's
  ``spec.cut_stage(model, (start, stop), is_first, is_last)`` (plait.models): a stage keeps the blocks it owns,
  the first one the embeddings, the last one the final norm and head, and parameter FQNs are the same as in the
  unsplit model (Plait's GPT keeps ``layers.5...`` in a ModuleDict keyed by global index; a HF decoder stage
  keeps ``model.layers.5...``, its other layers pass hidden states through): checkpoints, optimizers and tests
  line up across plans without any renaming. ``spec.num_layers(model)`` is what the stages divide.
* Which stages a rank holds follows the schedule: "loop" placement (stage s on rank s % pp) for GPipe,
  1F1B, Interleaved1F1B, LoopedBFS and InterleavedZeroBubble; "v" placement (rank r holds stages r and
  2*pp-1-r) for ZBVZeroBubble and DualPipeV. Torch computes the same mappings internally; we have to
  agree with them when deciding which layers to keep.
* The pp process group comes from the 1-D ``pp_mesh`` that is passed in (possibly ``mesh["pp"]`` of a
  (dp, pp, tp) mesh). Nothing global.
* Loss scaling. The schedule calls ``loss_fn`` on each microbatch (a mean over that microbatch's
  tokens) and backpropagates each microbatch loss separately, so the accumulated gradient is the SUM
  of m per-microbatch mean gradients. Torch's schedules are built with ``scale_grads=True`` (default,
  kept here), which divides every stage's ``.grad`` by ``n_microbatches`` once after the last backward
  (``stage.scale_grads`` from ``perform_reduce_grad`` / the REDUCE_GRAD action). Sum of m means / m =
  the mean loss's gradient over the full batch, exactly, provided every microbatch holds the same
  number of tokens - so ``step`` refuses a batch that does not split into equal microbatches. Two
  consequences: ``loss_fn`` must reduce with a mean (a sum-reducing loss would need
  ``scale_grads=False``), and the division hits the whole ``.grad`` - gradients left over from before
  the step would be divided too - so ``step`` clears gradients first (no accumulation across steps).
* Mixed precision. A stage may compute in bf16 (its forward under torch.autocast, or FSDP2's bf16
  policy, as ``parallelize`` sets up): torch's metadata inference runs each stage's real forward on
  ``device`` before the first step, so the p2p buffers take the dtypes the stages really send (fp32 for
  the GPT's residual stream under autocast, bf16 under FSDP2's policy); nothing here assumes a dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

# Every schedule torch 2.13 ships, by name -> (placement style, stages per rank: 1, 2 or None = any >= 1).
SCHEDULES: dict[str, tuple[str, int | None]] = {
    "GPipe": ("loop", 1),
    "1F1B": ("loop", 1),
    "Interleaved1F1B": ("loop", None),
    "LoopedBFS": ("loop", None),
    "InterleavedZeroBubble": ("loop", None),
    "ZBVZeroBubble": ("v", 2),
    "DualPipeV": ("v", 2),
}


def schedule_name(name: str) -> str:
    """The canonical spelling of a schedule name (matched case-insensitively, like torch)."""
    by_lower = {k.lower(): k for k in SCHEDULES}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    return by_lower[name.lower()]


def schedule_style(name: str) -> str:
    """"loop" or "v": how the schedule places stages on ranks."""
    return SCHEDULES[schedule_name(name)][0]


def stage_ids(pp_rank: int, pp_size: int, virtual_stages: int, style: str) -> list[int]:
    """The global stage indices rank ``pp_rank`` holds, ascending. ``style`` is "loop" or "v"
    (or a schedule name, whose style is used)."""
    if style not in ("loop", "v"):
        style = schedule_style(style)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is outside a pipeline of pp_size={pp_size}")
    if style == "v":
        if virtual_stages != 2:
            raise ValueError(f"V-style placement holds exactly 2 stages per rank, not virtual_stages={virtual_stages}")
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + i * pp_size for i in range(virtual_stages)]


def layer_ranges(n_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) layer ranges, one per stage; sizes differ by at most one (the first
    stages take the extra layers, the last one already carries the output projection)."""
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}: need at least one stage")
    if n_layers < num_stages:
        raise ValueError(
            f"n_layers={n_layers} cannot fill {num_stages} pipeline stages (every stage needs at least one "
            f"layer): use at most {n_layers} stages (pp * virtual_stages) or a deeper model"
        )
    base, extra = divmod(n_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        stop = start + base + (1 if s < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def check_schedule(schedule: str, pp_size: int, virtual_stages: int, microbatches: int) -> str:
    """Validate a schedule configuration before building anything; return the canonical name.

    Mirrors (and explains) what torch 2.13's constructors require, found by running every schedule on
    pp=2 and pp=4 against a single-process reference: 1F1B needs microbatches >= pp; DualPipeV needs
    microbatches >= 2*pp; Interleaved1F1B / InterleavedZeroBubble need microbatches % max(1,
    microbatches // pp) == 0 (not microbatches % pp == 0: pp=4, m=6 runs; pp=2, m=5 does not);
    GPipe, LoopedBFS and ZBVZeroBubble take any count (ZBV pads its plan to 2*pp-1 and drops the
    extra). The loop-style multi-stage schedules also run with one stage per rank."""
    name = schedule_name(schedule)
    style, per_rank = SCHEDULES[name]
    stages = pp_size * virtual_stages
    if virtual_stages < 1 or pp_size < 1 or microbatches < 1:
        raise ValueError(f"pp_size={pp_size}, virtual_stages={virtual_stages}, microbatches={microbatches}: "
                         "all must be >= 1")
    if per_rank == 1 and virtual_stages != 1:
        raise ValueError(f"schedule {name} runs exactly one stage per rank, not virtual_stages={virtual_stages}: "
                         "set virtual_stages=1 or use Interleaved1F1B / LoopedBFS / InterleavedZeroBubble")
    if per_rank == 2 and virtual_stages != 2:
        raise ValueError(f"schedule {name} places exactly 2 stages per rank in a V: set virtual_stages=2, "
                         f"not {virtual_stages}")
    if name == "1F1B" and microbatches < stages:
        raise ValueError(f"schedule 1F1B needs microbatches >= stages ({stages}) to fill its warm-up; got "
                         f"microbatches={microbatches}")
    if name == "DualPipeV" and microbatches < stages:
        raise ValueError(f"schedule DualPipeV needs microbatches >= stages (2*pp = {stages}); got "
                         f"microbatches={microbatches}")
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, microbatches // pp_size)
        if microbatches % rounds:
            raise ValueError(
                f"schedule {name} runs microbatches in rounds of pp={pp_size}: microbatches={microbatches} must "
                f"be below pp or a multiple of the {rounds} rounds it makes; try {rounds * pp_size}"
            )
    return name


@dataclass
class Pipeline:
    """This rank's part of a pipeline: its stages (ascending stage index), their modules, the schedule."""

    schedule: object  # a torch.distributed.pipelining schedule instance
    stages: list[PipelineStage]
    modules: list[nn.Module]  # the stage modules, same order as ``stages``
    name: str  # canonical schedule name
    microbatches: int
    tied: list[tuple[str, ...]] = field(default_factory=list)  # parameter names that are one tensor unsplit
    tied_meta: list[tuple] = field(default_factory=list)  # (local shape, dtype) of each tied group's copies
    group: object = None  # the pp process group (tied gradients are summed over it)
    device: torch.device | None = None

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by their unsplit-model FQN (stages never share a name)."""
        return {n: p for m in self.modules for n, p in m.named_parameters()}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.named_parameters().values())

    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
        """One forward/backward of the whole batch over ``microbatches`` microbatches; gradients end in
        ``.grad`` equal to those of the full-batch mean loss (see the module docstring).

        ``inputs`` is used only where this rank holds the first stage and ``targets`` only where it holds
        the last (other ranks may pass None; with V schedules rank 0 holds both). Returns the mean of the
        microbatch losses - the full-batch mean loss - detached, on the rank holding the last stage;
        None on every other rank. Gradients are cleared at the start (see the module docstring)."""
        for m in self.modules:
            m.zero_grad(set_to_none=True)
        args: tuple = ()
        if self.has_first:
            if inputs is None:
                raise ValueError("this rank holds the first stage: step() needs the inputs")
            self._check_batch(inputs, "inputs")
            args = (inputs,)
        kwargs: dict = {}
        losses: list[torch.Tensor] | None = None
        if self.has_last:
            if targets is None:
                raise ValueError("this rank holds the last stage: step() needs the targets")
            self._check_batch(targets, "targets")
            kwargs["target"], losses = targets, []
        self.schedule.step(*args, losses=losses, return_outputs=False, **kwargs)
        self.sync_tied_grads()
        if losses is None:
            return None
        return torch.stack([loss.detach() for loss in losses]).mean()

    def sync_tied_grads(self) -> None:
        """Weights tied in the unsplit model (an embedding and the head: ``spec.tied_weights``) live on different
        stages as copies: each copy gets the sum of their gradients (one all-reduce over the pp group per tied
        group, Megatron's embedding all-reduce), so the copies stay equal, as the one tensor would. A rank holding
        no copy joins with zeros of the local shape the holders reported when the pipeline was built."""
        params = self.named_parameters()
        for names, (shape, dtype) in zip(self.tied, self.tied_meta, strict=True):
            held = [params[n] for n in names if n in params]
            if held:
                grad = torch.zeros_like(held[0].detach())
                for p in held:
                    if p.grad is not None:
                        grad += p.grad
                local = grad.to_local() if hasattr(grad, "to_local") else grad
            else:
                local = torch.zeros(shape, dtype=dtype, device=self.device)
            torch.distributed.all_reduce(local, group=self.group)
            for p in held:
                p.grad = grad.clone()

    def _check_batch(self, t: torch.Tensor, what: str) -> None:
        if t.shape[0] % self.microbatches:
            raise ValueError(
                f"{what} batch of {t.shape[0]} does not split into {self.microbatches} equal microbatches; "
                "unequal microbatches would weight the mean loss wrongly"
            )


def build_pipeline(model: nn.Module | Callable[[], nn.Module], pp_mesh: DeviceMesh, spec: Any, *, schedule: str,
                   microbatches: int, virtual_stages: int = 1, loss_fn: Callable, device: torch.device | str,
                   parallelize_stage: Callable[[nn.Module], nn.Module] | None = None,
                   materialize: bool = True) -> Pipeline:
    """Cut this rank's stages out of a model (its family's ``spec.cut_stage``) and wire them to a torch pipeline
    schedule.

    ``model`` is a full model (left whole: stages are cut from deep copies) or a zero-argument factory,
    called once - calling it per stage would draw each stage's init from a different RNG state. Every
    rank must produce identical weights (same seed before the call, or seed inside the factory). A
    factory may build on the meta device: each cut stage is then materialised on ``device`` and filled
    by its ``init_weights()``; those values differ from an unsplit model's init, so load a checkpoint
    if they must match. ``pp_mesh`` is a 1-D DeviceMesh (e.g. ``mesh["pp"]``); its group carries the
    p2p traffic. ``parallelize_stage(part) -> part`` runs on each cut stage before it is wrapped in a
    PipelineStage: that is where tensor parallelism, checkpointing and FSDP2/DDP go (torchtitan's order).
    ``materialize=False`` hands meta-built stages to ``parallelize_stage`` still on the meta device: it must
    allocate them after sharding (``hf_weights.materialize`` + ``load_hf_folder``), so each rank allocates
    only its shards of its stages.
    Raises ValueError for an invalid schedule configuration (see ``check_schedule``).
    """
    if pp_mesh.ndim != 1:
        raise ValueError(f"pp_mesh must be 1-D (pass mesh['pp']), got a {pp_mesh.ndim}-D mesh")
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    name = check_schedule(schedule, pp_size, virtual_stages, microbatches)
    num_stages = pp_size * virtual_stages
    device = torch.device(device)
    stages, modules = [], []
    owned = not isinstance(model, nn.Module)
    full = model() if owned else model
    if getattr(spec, "cut_stage", None) is None:
        raise TypeError(f"pipeline stages need a model family with a stage cut (plait.models); "
                        f"{type(full).__name__} ({getattr(spec, 'name', 'no spec')}) has none: use pp=1")
    ranges = layer_ranges(spec.num_layers(full), num_stages)
    ids = stage_ids(pp_rank, pp_size, virtual_stages, schedule_style(name))
    for i, sid in enumerate(ids):
        source = full if owned and i == len(ids) - 1 else copy.deepcopy(full)  # a factory's model is ours to cut
        part = spec.cut_stage(source, ranges[sid], sid == 0, sid == num_stages - 1)
        meta = any(p.is_meta for p in part.parameters())
        if meta and materialize:
            part = part.to_empty(device=device)
            part.init_weights()
        if not meta or materialize:
            part = part.to(device)
        if parallelize_stage is not None:
            part = parallelize_stage(part)
        modules.append(part)
        stages.append(PipelineStage(part, sid, num_stages, device, group=pp_mesh.get_group()))
    cls = get_schedule_class(name)
    # Single-stage schedules take one stage, multi-stage ones a list (even of one).
    held = stages[0] if issubclass(cls, PipelineScheduleSingle) else stages
    sched = cls(held, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=True)
    tied = [tuple(g) for g in (spec.tied_weights(full) if getattr(spec, "tied_weights", None) else [])]
    return Pipeline(schedule=sched, stages=stages, modules=modules, name=name, microbatches=microbatches,
                    tied=tied, tied_meta=_tied_meta(tied, modules, pp_mesh.get_group()), group=pp_mesh.get_group(),
                    device=device)


def _tied_meta(tied: list[tuple[str, ...]], modules: list[nn.Module], group) -> list[tuple]:
    """(local shape, dtype) of each tied group, from the ranks that hold a copy (every pp rank learns it)."""
    if not tied:
        return []
    params = {n: p for m in modules for n, p in m.named_parameters()}
    mine = []
    for names in tied:
        p = next((params[n] for n in names if n in params), None)
        local = p.to_local() if hasattr(p, "to_local") else p
        mine.append(None if p is None else (tuple(local.shape), local.dtype))
    everyone: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, mine, group=group)
    return [next(m[i] for m in everyone if m[i] is not None) for i in range(len(tied))]
