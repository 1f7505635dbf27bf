"""Per-rank memory of a decoder under a ParallelPlan, before launch (``plait plan estimate``).

    params = model_params(spec, config)  # plait.models: every parameter's shape, block, end and tp dim
    rows = estimate_memory(params, spec.shape(config), plan, global_batch=16, seq_len=128, dtype="float32")
    print(format_table(rows))            # one row per group of ranks with identical numbers

No process group and no real tensors: parameter shapes come from the family's model built on the meta device
(``ModelParams``: each parameter's shape, the block it belongs to or the end of the model it sits at, and the dim
its family's tensor-parallel plan shards), the rest is arithmetic. One RankMemory per global rank, its
coordinates from ``mesh.Layout`` (dp, pp, cp, tp). The activation terms below are those of a Llama-shaped
decoder (Plait's GPT: measured exact); for other families they are that shape's estimate from their sizes.

Exact (what the rank holds in ``p.to_local()`` / ``p.grad`` / ``optimizer.state``):
  * stages: stage s of S = pp*virtual_stages owns layers [s*L/S, (s+1)*L/S); stage s sits on rank
    s % pp ("loop" schedules) or ranks r hold stages r and 2*pp-1-r (ZBVZeroBubble, DualPipeV).
    Stage 0 holds tok_embeddings, stage S-1 norm + output.
  * TP: what the family's plan shards (``ParamInfo.tp_dim``: column-parallel projections, the head and the
    embedding dim 0 (heads, hidden, vocab), row-parallel projections dim 1; norms replicated). kv projections
    whose heads are replicated (tp a multiple of the kv heads) hold one head per rank. DTensor/torch.chunk
    semantics: ceil-size chunks, last smaller.
  * fsdp2: dim 0 of every (tp-local) parameter chunked over dp with torch.chunk semantics; grads and
    AdamW state follow. FSDP2 stores each shard padded to the first chunk's size: the padding is
    reported apart (``param_padding``), as is TP's (without FSDP2, an uneven tp shard is a view of a
    storage padded likewise). bf16 mixed precision keeps the sharded parameters, gradients and
    optimizer state in the model dtype; bf16 exists only in transient all-gathered copies.
    Like parallelize.py, FSDP2 shards over dp x cp (shard index dp_rank * cp + cp_rank: the flattened
    ``dp_cp`` mesh) and is applied (and so bf16) only when dp * cp > 1. (Torch 2.13 leaves a vocab-sharded
    embedding's gradient a full Replicate (V, d) tensor on every tp rank; parallelize reshards it to the
    parameter's placement as it is accumulated, tensor_parallel.keep_grads_sharded, so it is counted sharded.)
  * ddp: everything replicated. AdamW (torch 2.13, foreach/fused off): exp_avg and exp_avg_sq like the
    parameter (its dtype and local shape) plus a 0-d float32 ``step`` tensor per parameter.
  * expert parallelism (ep > 1, ``ParamInfo.expert``): an experts module's parameter holds E/ep experts (dim 0),
    replicated over tp, and FSDP2 chunks that over the dp/ep ranks holding the same experts (shard index = the
    rank's ``dp_mod_ep`` coordinate, mesh.Layout); grads and AdamW state follow.
Approximate: ZeRO-1/2/3 use DeepSpeed's flat partition, ceil(N/dp) elements per rank (alignment
padding aside): ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3 also parameters. The
optimizer column holds AdamW's fp32 exp_avg/exp_avg_sq of the partition, one step tensor (one flat
parameter per group) and DeepSpeed's fp32 master copy of the partition (always kept by ZeRO-1/2,
only under bf16 by ZeRO-3). bf16 ZeRO keeps bf16 model parameters/gradients.

Activations (saved-for-backward storages at peak, found with saved_tensors_hooks on CPU, deduplicated
by storage, parameters and buffers excluded). Per token of a microbatch, c = activation dtype bytes
(bf16: 2), a = SDPA logsumexp bytes (float32, float64 for float64), t = tp, s = tp if
sequence_parallel else 1, d = d_model, h = n_heads, k = kv heads, e = head_dim, H = ffn hidden:
  block  = 2 * [ (2d + 1)/s * c   rms_norm: input, rstd, x*rstd (sequence-sharded under SP)
                 + d * c ]        norm output / all-gathered input saved by wq,wk,wv and w1,w3
         + (2he + 2ke)/t * c      SDPA: q, k (after RoPE), v, output (= wo's input: the CPU kernel
                                  returns (b, s, h, e) memory, so transpose+reshape is a view)
         + h/t * a                SDPA logsumexp
         + 4H/t * c               w1 out, silu out, w3 out, their product (w2's input)
  RoPE saves only cos/sin (buffers); residual adds save nothing.
  mixture of experts (shape.n_experts > 0, top_k = K, H = one expert's hidden size, experts replicated over tp):
  the 4H/t term is 4HK + E (each token's K expert rows; router logits, c each) and, under ep > 1, the dispatch
  buffers: 3 * K * d * c (the rows sent, the rows received, the rows returned), assuming balanced routing (a
  rank receiving more than its share holds more). (CPU kernels, torch 2.13: rms_norm
  decomposes; CUDA's fused rms_norm and SDPA backends save slightly different extras.)
  context parallelism (cp > 1): every per-token term counts the rank's seq/cp tokens; ring attention
  saves what SDPA saves (q, k, v, output, lse); RoPE's tables are gathered at the local positions,
  (n, e/2) cos and sin saved once per rank: + 2 * e/2 * 4 bytes per token (float64 models also save
  float64 copies per layer, not counted). Ring buffers in flight are transient.
  first stage: 8 (int64 token ids saved by the embedding)
  last stage: (2d + 1)/s * c + d * c (final norm, output's input) + 4V + 8 (float32 log_softmax
              output and int64 targets of lm_loss; + a 4-byte scalar), or with loss_parallel
              V/t * c (the vocab-sharded logits gradient tp_loss saves), plus, once per rank, the
              V/t * 4 + 8 bytes its inner cross-entropy graph holds while computing that gradient
  pipeline (pp > 1): the stage output kept per in-flight microbatch: d/s * c, or the logits (V, or
              V/t under loss_parallel) * c on the last stage
  checkpointed block: only its input, d/s * c; plus, once per rank, one block's activations (minus
              its input) while backward recomputes it (an upper bound: the head's tensors are counted
              as still alive then).
In-flight microbatches per local stage (forwards issued before the rank's first backward, from
torch 2.13's schedule code): GPipe m; 1F1B min(m, pp - r); LoopedBFS m per stage; Interleaved1F1B
and InterleavedZeroBubble the warm-up forwards + 1 ((v-1)*round + f*(pp-1-r), f = 2 resp. 1),
assigned to local stages round by round (zero-bubble's deferred weight grads are ignored);
ZBVZeroBubble and DualPipeV 2*pp-1-r forwards of the first local stage and r+1 of the second.
Not counted: transient tensors (FSDP2's all-gathered parameters, DDP's gradient buckets, DeepSpeed's
buckets, allocator caches, communication buffers) and the tensors of the backward pass itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from plait.parallel import pipeline
from plait.parallel.activation_checkpoint import wrapped_indices
from plait.parallel.low_bit_optim import block_len, quantized_shape
from plait.parallel.plan import ParallelPlan, batch_violations, sequence_violations
from plait.parallel.shape import DecoderShape

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    layer: int | None = None  # the block it belongs to; None for the top level
    end: str = ""  # a top-level parameter's stage: "first" (embeddings) or "last" (final norm, head)
    tp_dim: int | None = None  # the dim the family's tensor-parallel plan shards (None: replicated)
    kv_heads: int = 0  # > 0: a projection of this many kv heads (replicated one per rank when tp exceeds them)
    expert: bool = False  # a parameter of an experts module (dim 0 = the expert index): ep shards dim 0


@dataclass(frozen=True)
class ModelParams:
    params: dict[str, ParamInfo]
    buffer_elems: int = 0  # non-persistent buffers (RoPE tables) of one model copy, float32
    n_layers: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class RankMemory:
    rank: int
    dp: int  # this rank's coordinates on the mesh (and cp, below)
    pp: int
    tp: int
    stages: tuple[int, ...]
    layers: tuple[int, ...]
    params: int  # bytes of every kind below
    grads: int
    optim: int
    activations: int
    buffers: int = 0  # RoPE tables, one copy per stage module
    param_padding: int = 0  # FSDP2: the shard storage's padding beyond p.to_local()
    cp: int = 0  # this rank's context-parallel coordinate

    @property
    def total(self) -> int:
        return self.params + self.param_padding + self.grads + self.optim + self.activations + self.buffers


def chunk_size(n: int, k: int, i: int) -> int:
    """Length of chunk i of ``torch.chunk(range(n), k)`` (0 where torch makes fewer than k chunks)."""
    c = -(-n // k) if n else 0
    return max(0, min(c, n - i * c))


def stage_ids(pp_rank: int, plan: ParallelPlan) -> list[int]:
    """The stages a pipeline rank holds: the placement pipeline.build_pipeline uses."""
    if plan.pp == 1:
        return [0]
    return pipeline.stage_ids(pp_rank, plan.pp, plan.virtual_stages, pipeline.schedule_style(plan.schedule))


def stage_layers(n_layers: int, num_stages: int, stage: int) -> range:
    return range(*pipeline.layer_ranges(n_layers, num_stages)[stage])


def inflight(plan: ParallelPlan, pp_rank: int) -> list[int]:
    """Microbatches whose forward activations a rank holds at its peak, per local stage (see docstring)."""
    m, pp, v, r, name = plan.microbatches, plan.pp, plan.virtual_stages, pp_rank, plan.schedule
    if pp == 1:
        return [1]
    if name == "GPipe":
        return [m]
    if name == "1F1B":
        return [min(m, pp - r)]
    if name == "LoopedBFS":
        return [m] * v
    if pipeline.schedule_style(name) == "v":
        return [min(m, 2 * pp - 1 - r), min(m, r + 1)]
    per_round = m // max(1, m // pp)
    factor = 2 if name == "Interleaved1F1B" else 1
    forwards = min((v - 1) * per_round + factor * (pp - 1 - r) + 1, m * v)
    counts = [0] * v
    for k in range(forwards):
        counts[(k // per_round) % v] += 1
    return [min(m, n) for n in counts]


def _stage_params(model: ModelParams, layers: range, first: bool, last: bool) -> list[str]:
    def kept(info: ParamInfo) -> bool:
        if info.layer is not None:
            return info.layer in layers
        return (info.end == "first" and first) or (info.end == "last" and last)

    return [name for name, info in model.params.items() if kept(info)]


def _tp_local(info: ParamInfo, tp: int, tp_rank: int) -> tuple[list[int], int]:
    """The tp-local shape, and the elements of its storage: distribute_tensor pads uneven shards to the
    first chunk's size and keeps the narrowed view."""
    shape = info.shape
    local, stored = list(shape), math.prod(shape)
    if tp == 1 or info.tp_dim is None:
        return local, stored
    dim = info.tp_dim
    if info.kv_heads and tp > info.kv_heads and tp % info.kv_heads == 0:  # one replicated head per rank
        local[dim] = shape[dim] // info.kv_heads
        return local, math.prod(local)
    local[dim] = chunk_size(shape[dim], tp, tp_rank)
    stored = stored // shape[dim] * chunk_size(shape[dim], tp, 0) if shape[dim] else 0
    return local, stored


def _activations(cfg: DecoderShape, plan: ParallelPlan, b_mb: int, seq: int, tp_rank: int, c: int, acc: int,
                 layers: range, first: bool, last: bool, wrapped: set[int]) -> tuple[int, int]:
    """(bytes saved by one microbatch through this stage, bytes alive once at a time on top of them:
    a recomputed block, or tp_loss's inner cross-entropy graph)."""
    t, d = plan.tp, cfg.d_model
    tok = b_mb * seq
    tok_sp = b_mb * chunk_size(seq, t, tp_rank) if plan.sequence_parallel else tok
    vocab_local = chunk_size(cfg.vocab_size, t, tp_rank) if plan.loss_parallel else cfg.vocab_size
    kv = cfg.n_kv_heads if cfg.n_kv_heads % t == 0 else t  # replicated kv heads: one per rank
    qkvo = (2 * cfg.n_heads * cfg.head_dim + 2 * kv * cfg.head_dim) // t
    block = (2 * (tok_sp * (2 * d + 1) * c + tok * d * c) + tok * qkvo * c
             + tok * (cfg.n_heads // t) * acc + tok * _ffn_per_token(cfg, plan) * c)
    block_input = tok_sp * d * c
    total = sum(block_input if i in wrapped else block for i in layers)
    if first:
        total += tok * 8
    if last:
        total += tok_sp * (2 * d + 1) * c + tok * d * c
        total += tok * vocab_local * c if plan.loss_parallel else tok * cfg.vocab_size * 4 + tok * 8 + 4
    if plan.pp > 1:
        total += tok * vocab_local * c if last else block_input
    transient = block - block_input if any(i in wrapped for i in layers) else 0
    if last and plan.loss_parallel:  # tp_loss's inner graph, alive while it computes the saved gradient
        transient = max(transient, tok * vocab_local * 4 + tok * 8 + 4)
    if plan.cp > 1 and first:  # RoPE tables gathered at the zigzag positions, float32 (n, e/2) cos and sin
        total += tok * cfg.head_dim * 4
    return total, transient


def _ffn_per_token(cfg: DecoderShape, plan: ParallelPlan) -> int:
    """Elements the feed-forward saves per token: a dense FFN's 4H/t, or a mixture of experts' K expert rows,
    router logits and (ep > 1) its dispatch buffers (see the module docstring)."""
    if not cfg.n_experts:
        return 4 * (cfg.ffn_hidden // plan.tp)
    k = max(1, cfg.top_k)
    return 4 * cfg.ffn_hidden * k + cfg.n_experts + (dispatch_elems(cfg, plan) if plan.ep > 1 else 0)


def dispatch_elems(cfg: DecoderShape, plan: ParallelPlan) -> int:
    """Per token and MoE layer, the elements of expert parallelism's dispatch buffers (balanced routing)."""
    return 3 * max(1, cfg.top_k) * cfg.d_model if plan.ep > 1 and cfg.n_experts else 0


def moment_bytes(global_shape: tuple[int, ...], local: list[int], states: str, param_bytes: int) -> int:
    """Bytes of AdamW's two moments for a parameter's local shard: in the parameter's dtype (torch's AdamW),
    bf16, or 8-bit codes plus an fp32 absmax per block of each row (parallel/low_bit_optim.py)."""
    numel = math.prod(local)
    if states == "fp32":
        return 2 * numel * param_bytes
    if states == "bf16":
        return 2 * numel * 2
    if quantized_shape(global_shape, states):
        blen = block_len(global_shape[-1])
        return 2 * numel + 2 * 4 * math.prod(local[:-1]) * -(-global_shape[-1] // blen)
    return 2 * numel * 4


def estimate_memory(model: ModelParams, shape: DecoderShape, plan: ParallelPlan, *, global_batch: int,
                    seq_len: int, dtype: str = "float32", optim_states: str = "fp32") -> list[RankMemory]:
    """One RankMemory per global rank (see the module docstring for what is exact and what is not)."""
    plan.check()
    layout = plan.layout
    for msg in batch_violations(plan, global_batch, "global_batch") + sequence_violations(plan, seq_len):
        raise ValueError(msg)
    if plan.cp > 1 and plan.engine.startswith("zero"):
        raise ValueError(f"engine={plan.engine!r} does not run with cp={plan.cp}: use fsdp2 or ddp")
    m = plan.microbatches if plan.pp > 1 else 1
    if (global_batch // plan.dp) % m:
        raise ValueError(f"the batch per dp rank ({global_batch // plan.dp}) does not split into {m} microbatches")
    b_mb = global_batch // plan.dp // m
    pb = DTYPE_BYTES[dtype]
    zero = plan.engine.startswith("zero")
    shards = layout.dp_cp  # FSDP2 shards over dp x cp (parallelize._shard_part: nothing to shard at 1)
    fsdp = plan.engine == "fsdp2" and shards > 1
    seq_local = seq_len // plan.cp
    bf16 = plan.mixed_precision == "bf16" and (fsdp or zero)
    if zero and bf16:
        pb = 2  # DeepSpeed's bf16 mode converts the module itself
    c = 2 if bf16 else DTYPE_BYTES[dtype]
    acc = 8 if c == 8 else 4
    buffer_elems = model.buffer_elems
    n_stages, n_layers = plan.num_stages, shape.n_layers
    wrapped = {int(k) for k in wrapped_indices([str(i) for i in range(n_layers)], plan.activation_checkpointing)}
    rows = []
    for rank in range(plan.world_size):
        at = layout.coordinates(rank)
        dp_rank, pp_rank, cp_rank, tp_rank = at["dp"], at["pp"], at["cp"], at["tp"]
        shard = dp_rank * plan.cp + cp_rank
        sids = stage_ids(pp_rank, plan)
        params = padding = grads = optim = acts = transient = moments = 0
        numel = grad_numel = count = 0
        held: list[int] = []
        for sid, mbs in zip(sids, inflight(plan, pp_rank), strict=True):
            layers = stage_layers(n_layers, n_stages, sid)
            held.extend(layers)
            first, last = sid == 0, sid == n_stages - 1
            for name in _stage_params(model, layers, first, last):
                info = model.params[name]
                local, stored = _tp_local(info, plan.tp, tp_rank)
                n_shards, index = shards, shard
                if info.expert and plan.ep > 1:  # E/ep experts, FSDP2 over the dp/ep ranks holding them
                    local[0] //= plan.ep
                    stored = math.prod(local)
                    n_shards, index = layout.dp_mod_ep, layout.coordinate(rank, "dp_mod_ep")
                rest_elems = math.prod(local[1:])
                if not fsdp:  # FSDP2 copies each shard into its own (padded) storage
                    padding += (stored - math.prod(local)) * pb
                else:
                    padding += (chunk_size(local[0], n_shards, 0) - chunk_size(local[0], n_shards, index)) \
                        * rest_elems * pb
                    local[0] = chunk_size(local[0], n_shards, index)
                numel += math.prod(local)
                moments += moment_bytes(info.shape, local, optim_states, pb)
                grad_numel += math.prod(local)
                count += 1
            per_mb, extra = _activations(shape, plan, b_mb, seq_local, tp_rank, c, acc, layers, first, last,
                                         wrapped)
            acts += mbs * per_mb
            transient = max(transient, extra)
        if zero:
            share = -(-numel // plan.dp)
            master = share * 4 if plan.engine != "zero3" or bf16 else 0
            params = (share if plan.engine == "zero3" else numel) * pb
            grads = (numel if plan.engine == "zero1" else share) * pb
            optim = 2 * share * 4 + 4 + master
        else:
            params, grads = numel * pb, grad_numel * pb
            optim = moments + 4 * count
        rows.append(RankMemory(rank=rank, dp=dp_rank, pp=pp_rank, tp=tp_rank, stages=tuple(sids),
                               layers=tuple(held), params=params, grads=grads, optim=optim,
                               activations=acts + transient, buffers=len(sids) * buffer_elems * 4,  # RoPE tables: fp32
                               param_padding=padding, cp=cp_rank))
    return rows


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def format_table(rows: list[RankMemory]) -> str:
    """Ranks with identical numbers (and stages) share one row; the first column lists them."""
    groups: dict[tuple, list[RankMemory]] = {}
    for r in rows:
        key = (r.pp, r.stages, r.params, r.param_padding, r.grads, r.optim, r.activations, r.buffers)
        groups.setdefault(key, []).append(r)
    head = ("ranks", "pp", "stages", "layers", "params", "grads", "optim", "activations", "other", "total")
    lines = [head]
    for members in groups.values():
        r = members[0]
        span = _ranges(sorted(r.layers)) if r.layers else "-"
        lines.append((_ranges([x.rank for x in members]), str(r.pp), ",".join(map(str, r.stages)), span,
                      human(r.params), human(r.grads), human(r.optim), human(r.activations),
                      human(r.buffers + r.param_padding), human(r.total)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.rjust(widths[i]) if i > 3 else cell.ljust(widths[i]) for i, cell in enumerate(line))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    text.append("other = RoPE buffers + shard padding (FSDP2, uneven TP); transient buffers (all-gathers, "
                "DDP/ZeRO buckets) not counted")
    return "\n".join(text)


def _experts_line(model: ModelParams, shape: DecoderShape, plan: ParallelPlan, b_mb: int, seq_len: int,
                  dtype: str) -> str:
    """A header line for a mixture of experts: its expert parameters, and how ep splits them and their tokens."""
    experts = sum(math.prod(p.shape) for p in model.params.values() if p.expert)
    if not experts:
        return ""
    held = experts // plan.ep
    line = (f"experts: {experts:,} of the params ({shape.n_experts} per MoE layer, top-{shape.top_k}); each rank "
            f"holds {held:,} (ep{plan.ep}" + (f", then FSDP2 over dp/ep={plan.layout.dp_mod_ep}" if plan.ep > 1 and
                                            plan.engine == "fsdp2" and plan.layout.dp_mod_ep > 1 else "") + ")")
    if plan.ep > 1:
        per_layer = dispatch_elems(shape, plan) * b_mb * (seq_len // plan.cp) * DTYPE_BYTES[dtype]
        line += f"; dispatch buffers {human(per_layer)} per MoE layer per microbatch (in activations)"
    return line + "\n"


def estimate_report(model: ModelParams, shape: DecoderShape, plan: ParallelPlan, world_size: int, *,
                    global_batch: int, seq_len: int, dtype: str, title: str, optim_states: str = "fp32") -> str:
    """The ``plait plan estimate`` text: a header, the per-rank table, the peak rank."""
    rows = estimate_memory(model, shape, plan, global_batch=global_batch, seq_len=seq_len, dtype=dtype,
                           optim_states=optim_states)
    b_mb = global_batch // plan.dp // (plan.microbatches if plan.pp > 1 else 1)
    n_params = sum(math.prod(p.shape) for p in model.params.values())
    header = (f"plan {plan.describe()}, {world_size} ranks, {title} {n_params:,} params, "
              f"{dtype} ({plan.mixed_precision}), activation checkpointing {plan.activation_checkpointing}, "
              f"optimizer states {optim_states}\n"
              f"global batch {global_batch} x seq {seq_len}: {b_mb} sequences per microbatch per rank"
              + (f", {seq_len // plan.cp} tokens of each per cp rank" if plan.cp > 1 else "") + "\n"
              + _experts_line(model, shape, plan, b_mb, seq_len, dtype)
              + (f"float8 ({plan.float8}): the blocks' matmuls take float8 inputs; parameters, gradients and "
                 "optimizer states keep the bytes above (float8 changes no stored tensor), activations are counted "
                 "as without it\n" if plan.float8 != "off" else ""))
    peak = max(rows, key=lambda r: r.total)
    return header + format_table(rows) + f"\npeak: rank {peak.rank}, {human(peak.total)}"
