"""Overhead of Plait's TP and FSDP2 train step over the same collectives written by hand.

    python bench/parallel_overhead.py --quick        # ~2 minutes on 2 cores (compiling included)
    python bench/parallel_overhead.py                # more repetitions, steadier medians

Two cases, each on 2 ranks (gloo, CPU, float32, one torch thread per rank), on Plait's GPT
(default d_model 256, 4 layers, 8 heads, seq 128, vocab 256, 8 sequences per step):

1. tp2: ``parallelize`` with ``ParallelPlan(tp=2, engine="fsdp2")`` (dp=1, so no FSDP) against a
   Megatron-style tensor-parallel GPT written here with plain torch.distributed. The collectives are
   the ones Plait's DTensor plan (parallel/tensor_parallel.py) issues, one for one:

       Plait (DTensor plan)                          hand-written here
       tok_embeddings RowwiseParallel (vocab shard)  mask ids outside this rank's rows, lookup, zero,
         -> Partial -> Replicate: all-reduce fwd       all_reduce fwd / identity bwd
       norm -> Replicate DTensor -> Colwise q/k/v,   norm -> f (identity fwd, all_reduce bwd) -> q/k/v,
         w1/w3, output: the Partial input grad is      w1/w3, output: one all-reduce per norm in bwd
         all-reduced once per norm in bwd
       wo, w2 RowwiseParallel -> Replicate           g: all_reduce fwd / identity bwd
       output Colwise -> Replicate logits            all_gather of logits along vocab fwd, local slice bwd

   Forward: 1 + 2 * layers all-reduces and one all-gather; backward: 2 * layers + 1 all-reduces;
   gradient clipping: one all-reduce (below).
   Loss: mean cross-entropy of the full logits (loss_parallel off). Norm weights are replicated; on
   both sides their gradients are complete after backward, because the all-reduce sits before the
   norm's backward (Plait's ``Replicated`` style re-wraps the norm output for exactly this; before it
   did, the Partial gradients were all-reduced again in every AdamW op: 45 all-reduces a step, not 18).

2. fsdp2: ``ParallelPlan(dp=2, engine="fsdp2")`` (``apply_fsdp2``: ``fully_shard`` per block, then the
   root) against a ZeRO-3 wrapper written here around the same, unmodified GPT module: each block's
   parameters live as views of one flat buffer that is sharded over the ranks, plus one more unit for
   the root's own parameters (embeddings, final norm, output) like ``fully_shard(root)``. Per unit:

       forward pre-hook       all_gather_single of the flat shard (FSDP2: one all-gather per group)
       forward post-hook      free the gathered storage, except for the last block and the root
                              (FSDP2 keeps the last block: apply_fsdp2 passes reshard_after_forward=False
                              for it, and leaves the root at FSDP2's default (None), which keeps it too,
                              since backward starts there)
       backward pre-hook      all-gather again (registered only on units freed after forward)
       all grads of the unit  reduce_scatter_single(AVG) of the flat gradient into the shard's grad,
                              then free the gathered storage (FSDP2 reshards every unit after backward)

   gloo in torch 2.13 accepts reduce_scatter_single / reduce_scatter_tensor (with AVG), the call FSDP2
   makes, so both sides use it; gloo runs it as an all-reduce of the whole buffer that keeps this
   rank's slice (its trace shows gloo:all_reduce), so it moves all-reduce bytes on both sides alike.
   Differences that remain by design: FSDP2 keeps one DTensor shard per parameter (Shard(0), padded
   per parameter) while the hand-written unit keeps one flat shard per unit, so its AdamW steps 5 plain
   tensors instead of ~40 DTensors (the ``opt_ms`` column shows that share); and FSDP2 may prefetch
   the next all-gather in backward where the hand-written code gathers synchronously.

3. tp2+compile, fsdp2+compile: the same two cases with Plait's plan at ``compile="blocks"`` (each block
   compiled by inductor, parallel/compile.py; Plait then compiles its default loss too), against the same
   hand-written sides, whose blocks stay eager (the hand-written TP issues in-place c10d calls from
   autograd.Functions; a compiled version of it would be a rewrite with functional collectives, not done here)
   and whose loss is compiled as Plait's is (``torch.compile(lm_loss)``, one line a hand-written loop would
   write too). The headline is tp2+compile against the eager-block hand-written TP: whether compiled regions
   remove DTensor's per-op dispatch cost. The compile itself
   happens in the first warm-up step and is never timed. The collectives check holds for compiled cases too:
   gloo runs the same all-reduces and all-gathers (19 all-reduces and 1 all-gather for tp2, 8 all-gathers and 7
   all-reduces for fsdp2).

Gradient clipping is ON on both sides (``OptimConfig(grad_clip=1.0)``, Plait's default), so its cost is
in the figures. Plait's ``clip_grad_norm`` sums squares of the local shards per placement and issues one
all-reduce per mesh dimension that shards parameters (tp2: one over tp; fsdp2: one over dp). The hand-written
sides clip with the least a hand-written clip needs: ``torch._foreach_norm`` of the local gradients, the
squared sum all-reduced once over the group (replicated norm weights under tp counted on tp rank 0 only),
then ``torch._foreach_mul_`` by min(1, max_norm / (norm + 1e-6)). Neither side copies to the host.

Both cases: the same AdamW (``foreach=True`` like Plait's make_optimizer, same hyperparameters) on each
side's local shards, a fixed learning rate, the same seeded full weights (the hand-written models slice or
shard them), the same batches, and the loss averaged over dp and returned as a float on both sides. The
bench checks that the first-step losses agree within 1e-4 (and prints the largest loss gap over all
steps), so the two sides compute the same thing, and it counts the collectives of one extra (unmeasured)
step per side with torch.profiler - forward, backward, clipping and optimizer step - so "the same
collectives" is checked, not assumed: the clip's all-reduce is among them.

Method. Each rank times ``train_step`` (forward + backward + optimizer step) with perf_counter after a
barrier; a step's time is the slower rank's. Plait and hand-written steps alternate (A B B A A B ...,
so neither side always runs first) after a warm-up, and the table gives medians, the median optimizer
share (``opt_ms``) and ``cpu/wall`` (process CPU time over wall time inside the steps: well below the
other side's, or far below 1, means other processes took the cores). Both sides run in the same rank
processes with the same thread count.

Last line: ``RESULT overhead_tp_compiled=<plait compiled/hand> overhead=<max eager ratio> overhead_tp=<plait/hand>
overhead_fsdp2=<plait/hand> overhead_fsdp2_compiled=... plait_tp_ms=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, apply_rope, lm_loss
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, parallelize
from plait.parallel.plan import ParallelPlan
from torch import nn

LOSS_TOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# Hand-written Megatron-style tensor parallelism (plain torch.distributed)
# ----------------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce of the input gradient backward (before column-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward (after row-parallel layers and the vocab-parallel lookup), identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None


def _shard(weight: torch.Tensor, dim: int, rank: int, world: int) -> nn.Parameter:
    return nn.Parameter(weight.detach().chunk(world, dim=dim)[rank].clone())


class HandTPGPT(nn.Module):
    """Plait's GPT, sliced over a tp group: heads and ffn columns/rows, vocab rows of both tables."""

    def __init__(self, full: GPT, group):
        super().__init__()
        self.group, rank, tp = group, dist.get_rank(group), dist.get_world_size(group)
        cfg, sd = full.cfg, full.state_dict()
        self.eps, self.head_dim, self.n_layers = cfg.norm_eps, cfg.head_dim, cfg.n_layers
        self.vocab_lo, self.vocab_hi = rank * cfg.vocab_size // tp, (rank + 1) * cfg.vocab_size // tp
        self.emb = _shard(sd["tok_embeddings.weight"], 0, rank, tp)
        self.out = _shard(sd["output.weight"], 0, rank, tp)
        self.norm = nn.Parameter(sd["norm.weight"].clone())
        col = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
        row = ("attention.wo", "feed_forward.w2")
        self.layers = nn.ModuleList()
        for i in range(cfg.n_layers):
            layer = nn.ParameterDict()
            for name in col + row:
                layer[name.split(".")[1]] = _shard(sd[f"layers.{i}.{name}.weight"], 0 if name in col else 1, rank, tp)
            for name in ("attention_norm", "ffn_norm"):
                layer[name] = nn.Parameter(sd[f"layers.{i}.{name}.weight"].clone())
            self.layers.append(layer)
        self.register_buffer("cos", full.rope_cos.clone(), persistent=False)
        self.register_buffer("sin", full.rope_sin.clone(), persistent=False)

    def _norm(self, x, weight):  # replicated norm, then f: one all-reduce per norm in backward
        return _CopyToTP.apply(F.rms_norm(x, (x.shape[-1],), weight, self.eps), self.group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_lo) | (tokens >= self.vocab_hi)
        h = F.embedding((tokens - self.vocab_lo).masked_fill(outside, 0), self.emb)
        x = _ReduceFromTP.apply(h.masked_fill(outside[..., None], 0.0), self.group)
        bsz, seq, _ = x.shape
        cos, sin = self.cos[:seq], self.sin[:seq]
        for p in self.layers:
            a = self._norm(x, p["attention_norm"])
            q, k, v = (F.linear(a, p[w]).view(bsz, seq, -1, self.head_dim) for w in ("wq", "wk", "wv"))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            x = x + _ReduceFromTP.apply(F.linear(o.transpose(1, 2).reshape(bsz, seq, -1), p["wo"]), self.group)
            m = self._norm(x, p["ffn_norm"])
            ff = F.linear(F.silu(F.linear(m, p["w1"])) * F.linear(m, p["w3"]), p["w2"])
            x = x + _ReduceFromTP.apply(ff, self.group)
        logits = F.linear(self._norm(x, self.norm), self.out)  # column-parallel over the vocab
        return _GatherFromTP.apply(logits, self.group)


# ----------------------------------------------------------------------------------------------------
# Hand-written ZeRO-3 / FSDP-style sharding (plain torch.distributed) around the unmodified GPT
# ----------------------------------------------------------------------------------------------------


class FlatUnit:
    """One sharded unit: ``params`` become views of one flat buffer whose storage exists only while
    gathered; this rank owns ``shard`` (1/world of it, padded), which is what the optimizer steps."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], group, reshard_after_forward: bool):
        self.params, self.group, self.reshard_after_forward = params, group, reshard_after_forward
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        numel = sum(p.numel() for p in params)
        self.full = torch.zeros(-(-numel // world) * world)
        self.pad = self.full.numel() - numel
        offset = 0
        with torch.no_grad():
            for p in params:  # p.data becomes a view: freeing/gathering the buffer frees/refills p
                self.full[offset:offset + p.numel()].copy_(p.reshape(-1))
                p.data = self.full[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        self.shard = nn.Parameter(self.full.chunk(world)[rank].clone())
        self.nbytes, self.gathered, self.ready = self.full.untyped_storage().nbytes(), True, 0
        self.reshard()
        module.register_forward_pre_hook(lambda m, args: self.unshard())
        module.register_forward_hook(lambda m, args, out: self.reshard() if self.reshard_after_forward else None)
        if reshard_after_forward:  # else still gathered when backward reaches it
            module.register_full_backward_pre_hook(lambda m, grad_out: self.unshard())
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def unshard(self) -> None:
        if not self.gathered:
            self.full.untyped_storage().resize_(self.nbytes)
            dist.all_gather_single(self.full, self.shard.detach(), group=self.group)
            self.gathered = True

    def reshard(self) -> None:
        if self.gathered:
            self.full.untyped_storage().resize_(0)
            self.gathered = False

    def _grad_ready(self, _param) -> None:
        self.ready += 1
        if self.ready < len(self.params):
            return
        self.ready = 0
        flat = torch.cat([p.grad.reshape(-1) for p in self.params] + [self.full.new_zeros(self.pad)])
        grad = torch.empty_like(self.shard)
        dist.reduce_scatter_single(grad, flat, op=dist.ReduceOp.AVG, group=self.group)
        self.shard.grad = grad if self.shard.grad is None else self.shard.grad + grad
        for p in self.params:
            p.grad = None
        self.reshard()


def hand_zero3(model: GPT, group) -> list[nn.Parameter]:
    """Shard each block, then the root's remaining parameters, like apply_fsdp2; returns the shards."""
    blocks = list(model.layers.values())
    units = [FlatUnit(b, list(b.parameters()), group, reshard_after_forward=i < len(blocks) - 1)
             for i, b in enumerate(blocks)]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    units.append(FlatUnit(model, root, group, reshard_after_forward=False))
    return [u.shard for u in units]


# ----------------------------------------------------------------------------------------------------
# Train steps and timing
# ----------------------------------------------------------------------------------------------------


def _seeded_gpt(cfg: GPTConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def _adamw(params, o: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, foreach=True)


def hand_clip(sharded: list[nn.Parameter], replicated: list[nn.Parameter], group, max_norm: float) -> None:
    """Clip by the global norm: squares of this rank's shards (plus the replicated parameters, counted on
    rank 0 of the group only) summed by one all-reduce; every gradient scaled on its device."""
    sq = torch.stack(torch._foreach_norm([p.grad for p in sharded])).square().sum()
    if replicated and dist.get_rank(group) == 0:
        sq = sq + torch.stack(torch._foreach_norm([p.grad for p in replicated])).square().sum()
    dist.all_reduce(sq, group=group)
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    torch._foreach_mul_([p.grad for p in sharded + replicated], coef)


def hand_step_fn(model: nn.Module, opt: torch.optim.Optimizer, dp_group, clip: Callable[[], None],
                 loss_fn: Callable = lm_loss):
    """The hand-written side of Plait's train_step: same loss, clipping, same AdamW, loss averaged over dp."""

    def step(inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        clip()
        opt.step()
        value = loss.detach().double().reshape(()).clone()
        if dp_group is not None:
            dist.all_reduce(value, op=dist.ReduceOp.AVG, group=dp_group)
        return float(value)

    return step


def _timed_method(obj, name: str, acc: list[float]) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def build_case(case: str, cfg: GPTConfig, optim: OptimConfig, seed: int):
    """(plait step, its optimizers, hand step, its optimizer) for one case on this rank. A ``+compile`` case is
    the same plan with ``compile="blocks"`` against the same (eager) hand-written side."""
    world = dist.get_world_size()
    case, compiled = case.removesuffix("+compile"), case.endswith("+compile")
    plan = ParallelPlan(tp=world, engine="fsdp2") if case == "tp2" else ParallelPlan(dp=world, engine="fsdp2")
    if compiled:
        torch._dynamo.reset()
        plan = replace(plan, compile="blocks")
    mesh = build_mesh(plan, "cpu")
    parts = parallelize(lambda: _seeded_gpt(cfg, seed), plan, mesh, torch.device("cpu"), optim, spec=model_spec("gpt"))
    group = dist.group.WORLD
    # Plait compiles its default loss with the blocks; a hand-written loop compiles its loss as easily (one line)
    loss_fn = torch.compile(lm_loss, dynamic=False) if compiled else lm_loss
    if case == "tp2":
        model = HandTPGPT(_seeded_gpt(cfg, seed), group)
        opt = _adamw(model.parameters(), optim)
        replicated = [model.norm] + [layer[n] for layer in model.layers for n in ("attention_norm", "ffn_norm")]
        ids = {id(p) for p in replicated}
        sharded = [p for p in model.parameters() if id(p) not in ids]
        hand = hand_step_fn(model, opt, dp_group=None,
                            clip=lambda: hand_clip(sharded, replicated, group, optim.grad_clip), loss_fn=loss_fn)
    else:
        model = _seeded_gpt(cfg, seed)
        shards = hand_zero3(model, group)
        opt = _adamw(shards, optim)
        hand = hand_step_fn(model, opt, dp_group=group, clip=lambda: hand_clip(shards, [], group, optim.grad_clip),
                            loss_fn=loss_fn)
    return parts.train_step, parts.optimizers, hand, [opt]


def bench_rank(ctx, args: dict) -> dict:
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab_size=args["vocab"], d_model=args["d_model"], n_layers=args["layers"],
                    n_heads=args["heads"], max_seq_len=args["seq"])
    optim = OptimConfig(grad_clip=1.0)  # clipping on, on both sides
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):  # the same global batches for both sides; dp ranks take their rows
        x = torch.randint(0, cfg.vocab_size, (args["batch"], args["seq"] + 1), generator=gen)
        batches.append((x[:, :-1], x[:, 1:]))
    out = {}
    for case in args["cases"]:
        plait_step, plait_opts, hand_step, hand_opts = build_case(case, cfg, optim, seed=0)
        if case.startswith("fsdp2"):
            batches_here = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        else:
            batches_here = batches
        rec = {}
        for side, opts in (("plait", plait_opts), ("hand", hand_opts)):
            rec[side] = {"wall": [], "cpu": [], "opt": [], "loss": [], "acc": [0.0]}
            for opt in opts:
                _timed_method(opt, "step", rec[side]["acc"])
        sides = {"plait": plait_step, "hand": hand_step}
        for rep in range(args["warmup"] + args["steps"]):
            x, y = batches_here[rep % len(batches_here)]
            order = ("plait", "hand") if rep % 2 == 0 else ("hand", "plait")  # A B B A A B ...
            for side in order:
                r = rec[side]
                r["acc"][0] = 0.0
                dist.barrier()
                t, c = time.perf_counter(), time.process_time()
                loss = sides[side](x, y, args["lr"])
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                r["loss"].append(loss)
                if rep >= args["warmup"]:
                    r["wall"].append(wall)
                    r["cpu"].append(cpu)
                    r["opt"].append(r["acc"][0])
        x, y = batches_here[0]
        for side in ("plait", "hand"):  # one more, unmeasured step per side: which collectives ran
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                sides[side](x, y, args["lr"])
            names = Counter(e.name for e in prof.events())
            rec[side]["collectives"] = {n.removeprefix("c10d::").strip("_"): k for n, k in names.items()
                                        if n.startswith("c10d::")}
            rec[side]["gloo"] = {n: k for n, k in names.items() if n.startswith("gloo:")}
            del rec[side]["acc"]
        out[case] = rec
        dist.barrier()
    return out


def summarize(per_rank: list[dict]) -> dict:
    res = {}
    for case in per_rank[0]:
        res[case] = {}
        for side in ("plait", "hand"):
            runs = [r[case][side] for r in per_rank]
            n = len(runs[0]["wall"])
            walls = [max(r["wall"][i] for r in runs) for i in range(n)]  # a step lasts as long as its slowest rank
            opts = [max(r["opt"][i] for r in runs) for i in range(n)]
            res[case][side] = {
                "ms": 1e3 * statistics.median(walls),
                "min_ms": 1e3 * min(walls),
                "opt_ms": 1e3 * statistics.median(opts),
                "cpu_wall": min(sum(r["cpu"]) / sum(r["wall"]) for r in runs),
                "loss": runs[0]["loss"],
                "collectives": runs[0]["collectives"],
                "gloo": runs[0]["gloo"],
            }
        p, h = res[case]["plait"], res[case]["hand"]
        res[case]["ratio"] = p["ms"] / h["ms"]
        res[case]["loss0_diff"] = abs(p["loss"][0] - h["loss"][0])
        res[case]["loss_max_diff"] = max(abs(a - b) for a, b in zip(p["loss"], h["loss"], strict=True))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~1 min on 2 cores)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per side and case (default 20 quick, 60)")
    ap.add_argument("--warmup", type=int, default=0, help="unmeasured steps per side first (default 3 quick, 5)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--cases", default="tp2,fsdp2,tp2+compile,fsdp2+compile",
                    help="+compile: Plait's side with plan.compile=blocks (the hand-written side stays eager)")
    a = ap.parse_args()
    args = {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "seq": a.seq, "batch": a.batch,
            "vocab": a.vocab, "lr": 1e-3, "cases": [c for c in a.cases.split(",") if c],
            "steps": a.steps or (20 if a.quick else 60), "warmup": a.warmup or (3 if a.quick else 5)}
    if (os.cpu_count() or 1) < 2:
        print("warning: 2 ranks on 1 core share it; the numbers will be meaningless")

    from plait.runtime import ClusterConfig, connect, run_ranks, shutdown

    connect(ClusterConfig(num_cpus=4, num_gpus=0))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plait-overhead-") as run_dir:
        per_rank = run_ranks(bench_rank, 2, args, run_dir=run_dir)
    shutdown()  # no Ray log lines after this: RESULT stays the last line
    res = summarize(per_rank)

    print(f"2 ranks (gloo, CPU, fp32, 1 thread each); GPT d_model={a.d_model} layers={a.layers} heads={a.heads} "
          f"seq={a.seq} vocab={a.vocab}, {a.batch} sequences/step, gradient clipping on (both sides); "
          f"{args['steps']} measured steps per side "
          f"(+{args['warmup']} warm-up), {time.perf_counter() - t0:.0f}s")
    print(f"{'case':<15}{'side':<7}{'step_ms':>9}{'min_ms':>9}{'opt_ms':>8}{'cpu/wall':>9}{'plait/hand':>11}"
          f"{'loss@1':>10}{'|dloss@1|':>11}{'max|dloss|':>11}")
    for case, r in res.items():
        for side in ("plait", "hand"):
            s = r[side]
            extra = f"{r['ratio']:>11.3f}" if side == "plait" else f"{'':>11}"
            diffs = f"{r['loss0_diff']:>11.1e}{r['loss_max_diff']:>11.1e}" if side == "plait" else ""
            print(f"{case:<15}{side:<7}{s['ms']:>9.1f}{s['min_ms']:>9.1f}{s['opt_ms']:>8.1f}{s['cpu_wall']:>9.2f}"
                  f"{extra}{s['loss'][0]:>10.5f}{diffs}")
    for case, r in res.items():
        def fmt(c):
            return " ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"
        print(f"collectives per step ({case}, rank 0): plait {fmt(r['plait']['collectives'])}; "
              f"hand {fmt(r['hand']['collectives'])}  [as gloo runs them: plait {fmt(r['plait']['gloo'])}; "
              f"hand {fmt(r['hand']['gloo'])}]")
    if min(s["cpu_wall"] for r in res.values() for s in (r["plait"], r["hand"])) < 0.8:
        print("note: cpu/wall < 0.8: waiting on the peer rank or other processes on these cores; "
              "medians are interleaved, so load drift hits both sides alike, but expect noise")
    bad = [case for case, r in res.items() if not r["loss0_diff"] <= LOSS_TOL]
    if bad:
        print(f"FAIL: first-step losses differ by more than {LOSS_TOL} in {bad}: not the same computation")
        sys.exit(1)
    unequal = [case for case, r in res.items() if r["plait"]["gloo"] != r["hand"]["gloo"]]
    if unequal:
        print(f"FAIL: the collectives gloo ran differ in {unequal}: the baseline is not the same communication")
        sys.exit(1)
    ratios = {case: r["ratio"] for case, r in res.items()}
    names = {"tp2": "tp", "fsdp2": "fsdp2", "tp2+compile": "tp_compiled", "fsdp2+compile": "fsdp2_compiled"}
    fields = [f"overhead_{names[c]}={ratios[c]:.3f}" for c in ("tp2+compile",) if c in ratios]  # the headline
    eager = [v for c, v in ratios.items() if "+" not in c]
    fields += [f"overhead={max(eager):.3f}"] if eager else []
    fields += [f"overhead_{names[c]}={ratios[c]:.3f}" for c in res if c != "tp2+compile"]
    for c in res:
        fields += [f"plait_{names[c]}_ms={res[c]['plait']['ms']:.1f}", f"hand_{names[c]}_ms={res[c]['hand']['ms']:.1f}"]
    print("RESULT " + " ".join(fields), flush=True)


if __name__ == "__main__":
    main()
