"""Per-rank activation memory and step time of context parallelism (ring attention) at cp=2 and cp=4
against cp=1, on the same sequence length.

    python bench/context_parallel.py --quick        # ~1 minute on 2 cores
    python bench/context_parallel.py                # a longer sequence, more steps

One process: it starts an embedded Ray cluster and, through Plait's ``run_ranks``, runs the same
training step under ``ParallelPlan(cp=c)`` for c = 1, 2, 4 (c ranks each; gloo, CPU, float32, one
torch thread per rank). Plait's GPT (default d_model 128, 4 layers, 4 heads, vocab 256, one sequence
of 4096 tokens, 2048 with --quick) is built from the same seed in every run, and every run sees the same
batch; ``parallelize`` applies the plan (cp > 1: ring attention over mesh["cp"], each rank's zigzag
piece of the sequence, DDP over the cp ranks; engine ddp keeps the parameters replicated, so the
parameter memory is the same in every run and only activations differ).

Measured on every rank, after warm-up steps (kernels, DDP buckets, AdamW state all allocated):
  saved      bytes autograd saves for backward during one train step (``saved_tensors_hooks``; unique
             storages, parameters and buffers excluded): the activation memory of the step.
  rss        peak RSS above the RSS right before one train step (``/proc/self/clear_refs`` 5 resets the
             peak, VmHWM read after the step): activations plus the step's transients (activation
             gradients, ring buffers in flight, logits). Allocator fixed per rank (glibc mallopt: fixed
             mmap threshold 128 KiB so large blocks go back to the OS on free, trim threshold 128 KiB),
             and the same settings exported to the Ray workers' environment; printed.
  step_ms    median over the measured steps of the slowest rank's train_step (a barrier before each).
  estimate   ``estimate.estimate_memory``'s activation bytes for the rank (printed next to ``saved``).
The first step's loss is checked against cp=1's (1e-4): the runs compute the same thing.

A rank's number is the largest over its cp ranks (the zigzag layout balances them). Ratios are cp=c
over cp=1. Goals (issue 7): memory per rank <= 0.55x at cp=2 and <= 0.3x at cp=4. Step time on a
2-core machine is not a speed-up measurement: cp ranks share the two cores (cp=4 runs 4 ranks on 2),
and ring attention adds cp-1 K/V exchanges per layer forward and 2(cp-1) in backward.

Last line: ``RESULT mem_ratio_cp2=<saved cp2/cp1> mem_ratio_cp4=... time_ratio_cp2=... time_ratio_cp4=...
rss_ratio_cp2=... rss_ratio_cp4=...``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from benchlib import proc_status

ALLOCATOR = {"M_TRIM_THRESHOLD": (-1, 131072), "M_MMAP_THRESHOLD": (-3, 131072)}  # mallopt parameter, value
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
LOSS_TOL = 1e-4



def _fix_allocator() -> None:
    libc = ctypes.CDLL("libc.so.6")
    for param, value in ALLOCATOR.values():
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) failed")


def bench_rank(ctx, args: dict) -> dict:
    from plait.models import estimate_for, model_spec
    from plait.models.gpt import GPT, GPTConfig
    from plait.parallel.mesh import build_mesh
    from plait.parallel.parallelize import OptimConfig, parallelize
    from plait.parallel.plan import ParallelPlan
    from plait.parallel.saved_bytes import SavedBytes

    torch.set_num_threads(1)
    _fix_allocator()
    cfg = GPTConfig(vocab_size=args["vocab"], d_model=args["d_model"], n_layers=args["layers"],
                    n_heads=args["heads"], max_seq_len=args["seq"])
    plan = ParallelPlan(cp=ctx.world_size)
    plan.validate(ctx.world_size, cfg, args["batch"], seq_len=args["seq"])
    torch.manual_seed(0)
    mesh = build_mesh(plan, "cpu")
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    parts = parallelize(lambda: GPT(cfg), plan, mesh, ctx.device, optim, global_batch=args["batch"],
                        spec=model_spec("gpt"))
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (args["batch"], args["seq"] + 1), generator=gen)
    inputs, targets = data[:, :-1], data[:, 1:]
    losses = [parts.train_step(inputs, targets, optim.lr) for _ in range(args["warmup"])]

    with SavedBytes(parts.modules) as saved:  # one step: what its forward saves for backward
        parts.train_step(inputs, targets, optim.lr)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS becomes the current RSS
    before = proc_status("VmRSS:")
    parts.train_step(inputs, targets, optim.lr)
    rss = proc_status("VmHWM:") - before

    times = []
    for _ in range(args["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        parts.train_step(inputs, targets, optim.lr)
        slowest = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(slowest.item())
    estimate = estimate_for(cfg, plan, global_batch=args["batch"], seq_len=args["seq"])[ctx.rank].activations
    return {"saved": saved.total, "rss": rss, "ms": 1e3 * statistics.median(times), "loss0": losses[0],
            "estimate": estimate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~1 min on 2 cores)")
    ap.add_argument("--seq", type=int, default=0, help="tokens per sequence (default 2048 quick, 4096)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per cp (default 3 quick, 7)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--cps", default="1,2,4", help="cp degrees; the first is the baseline")
    a = ap.parse_args()
    cps = [int(c) for c in a.cps.split(",")]
    args = {"seq": a.seq or (2048 if a.quick else 4096), "batch": a.batch, "steps": a.steps or (3 if a.quick else 7),
            "warmup": max(1, a.warmup), "d_model": a.d_model, "layers": a.layers, "heads": a.heads, "vocab": a.vocab}
    if args["seq"] % (2 * max(cps)):
        sys.exit(f"--seq {args['seq']} must be a multiple of 2*cp = {2 * max(cps)}")

    from plait.runtime import ClusterConfig, connect, run_ranks, shutdown

    os.environ.update(ALLOCATOR_ENV)  # inherited by the Ray workers this process starts
    connect(ClusterConfig(num_cpus=max(cps), num_gpus=0))
    t0 = time.perf_counter()
    res = {}
    with tempfile.TemporaryDirectory(prefix="plait-cp-") as run_dir:
        for cp in cps:
            per_rank = run_ranks(bench_rank, cp, args, run_dir=run_dir)
            res[cp] = {k: max(r[k] for r in per_rank) for k in ("saved", "rss", "ms", "estimate")}
            res[cp]["loss0"] = per_rank[0]["loss0"]
    shutdown()  # no Ray log lines after this: RESULT stays the last line

    base = res[cps[0]]
    print(f"GPT d_model={a.d_model} layers={a.layers} heads={a.heads} vocab={a.vocab}, {a.batch} x {args['seq']} "
          f"tokens per step, float32, gloo/CPU, 1 torch thread per rank, engine ddp over cp; "
          f"{args['steps']} measured steps (+{args['warmup'] + 2} unmeasured), {time.perf_counter() - t0:.0f}s; "
          f"allocator: mallopt {', '.join(f'{k}={v[1]}' for k, v in ALLOCATOR.items())}, env {ALLOCATOR_ENV}; "
          f"{os.cpu_count()} cores")
    print(f"{'cp':>3}{'tokens/rank':>12}{'saved_MiB':>11}{'estimate_MiB':>13}{'rss_MiB':>9}{'step_ms':>9}"
          f"{'saved/cp1':>10}{'rss/cp1':>9}{'time/cp1':>9}{'loss@1':>10}")
    for cp, r in res.items():
        print(f"{cp:>3}{args['seq'] * a.batch // cp:>12}{r['saved'] / 2**20:>11.2f}{r['estimate'] / 2**20:>13.2f}"
              f"{r['rss'] / 2**20:>9.2f}{r['ms']:>9.1f}{r['saved'] / base['saved']:>10.3f}"
              f"{r['rss'] / base['rss']:>9.3f}{r['ms'] / base['ms']:>9.3f}{r['loss0']:>10.5f}")
    bad = [cp for cp, r in res.items() if abs(r["loss0"] - base["loss0"]) > LOSS_TOL]
    if bad:
        print(f"FAIL: first-step losses at cp={bad} differ from cp={cps[0]}'s by more than {LOSS_TOL}")
        sys.exit(1)
    others = cps[1:]
    fields = [f"mem_ratio_cp{cp}={res[cp]['saved'] / base['saved']:.3f}" for cp in others]
    fields += [f"time_ratio_cp{cp}={res[cp]['ms'] / base['ms']:.3f}" for cp in others]
    fields += [f"rss_ratio_cp{cp}={res[cp]['rss'] / base['rss']:.3f}" for cp in others]
    print("RESULT " + " ".join(fields), flush=True)


if __name__ == "__main__":
    main()
