"""Measure the pipeline bubble of every torch.distributed.pipelining schedule on Plait's GPT.

    python bench/pipeline_bubble.py --quick          # ~1 minute on 2 cores
    python bench/pipeline_bubble.py                  # longer sequences, more repetitions

Method. pp ranks (one thread each) run one GPT cut into stages by plait.parallel.pipeline. Every
stage's compute is timed at its source: each PipelineStage's ``forward_one_chunk``,
``backward_one_chunk`` and ``backward_weight_one_chunk`` (the zero-bubble W pass) and the loss
function are wrapped with a wall clock. On CPU these calls are synchronous and receive no data
(the schedules wait for their p2p receives before calling them), so their time is compute. A step
is bracketed by two barriers on the pp group, so every rank measures the same makespan:

    bubble(rank) = 1 - compute(rank) / makespan      (reported: mean over ranks, median over steps;
                                                       spread = max - min over the measured steps)

It is compared with the textbook (p-1)/(m+p-1) of GPipe/1F1B with uniform stages (and
(p-1)/(v*m+p-1) for the interleaved schedules). Fairness: every schedule gets the same model, batch,
microbatch count, warm-up and number of measured steps, and the schedules are run round-robin (one
step of each per repetition) so drift on the machine hits all of them alike. The compute model is
deterministic and balanced (equal layers per stage; embedding/head are small next to the blocks).

Caveat: each rank needs its own core. On a 2-core machine only pp=2 is meaningful, and other
processes on the machine inflate the numbers: the cpu/wall column (CPU time / wall time inside
compute) shows it, and a warning is printed below 0.9.

Last line: ``RESULT bubble_ratio_1f1b=<measured/theory> zb_vs_1f1b=<ZBV bubble / 1F1B bubble> ...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.pipeline import SCHEDULES, build_pipeline
from torch.distributed.device_mesh import init_device_mesh

# Short keys for the RESULT line, compared against 1F1B.
SHORT = {"GPipe": "gpipe", "Interleaved1F1B": "interleaved", "LoopedBFS": "loopedbfs",
         "InterleavedZeroBubble": "izb", "ZBVZeroBubble": "zb", "DualPipeV": "dualpipev"}


def _virtual(name: str) -> int:
    return 1 if SCHEDULES[name][1] == 1 else 2


def _timed(fn, acc: list[float]):
    """Wrap ``fn`` to add its wall time to acc[0] and its CPU time (this thread) to acc[1]."""
    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t
            acc[1] += time.thread_time() - c
    return wrapper


def bench_rank(ctx, args: dict) -> dict:
    """Rank function: build every schedule's pipeline, then time steps round-robin."""
    torch.set_num_threads(1)
    pp = ctx.world_size
    mesh = init_device_mesh("cpu", (pp,), mesh_dim_names=("pp",))
    group = mesh.get_group()
    cfg = GPTConfig(vocab_size=256, d_model=args["d_model"], n_heads=args["d_model"] // 64,
                    n_layers=args["layers"], max_seq_len=args["seq"])
    m = args["microbatches"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (m * args["mb_size"], args["seq"]), generator=gen)
    y = torch.randint(0, cfg.vocab_size, x.shape, generator=gen)

    pipes, busy = {}, {}
    for name in args["schedules"]:
        acc = [0.0, 0.0]
        torch.manual_seed(0)
        pipes[name] = build_pipeline(lambda: GPT(cfg), mesh, model_spec("gpt"), schedule=name, microbatches=m,
                                     virtual_stages=_virtual(name), loss_fn=_timed(lm_loss, acc), device="cpu")
        for stage in pipes[name].stages:
            for method in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(stage, method, _timed(getattr(stage, method), acc))
        busy[name] = acc

    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in pipes}
    for rep in range(args["warmup"] + args["steps"]):
        for name, pipe in pipes.items():
            busy[name][:] = [0.0, 0.0]
            dist.barrier(group=group)
            t0 = time.perf_counter()
            pipe.step(x, y)
            dist.barrier(group=group)
            wall = time.perf_counter() - t0
            if rep >= args["warmup"]:
                samples[name].append((busy[name][0], wall, busy[name][1]))
    return samples


def summarize(per_rank: list[dict], pp: int, m: int) -> dict[str, dict]:
    out = {}
    for name in per_rank[0]:
        steps = len(per_rank[0][name])
        # bubble of a step = mean over ranks of idle share; the makespan is the same on every rank.
        bubbles = [statistics.mean(1 - r[name][i][0] / r[name][i][1] for r in per_rank) for i in range(steps)]
        walls = [max(r[name][i][1] for r in per_rank) for i in range(steps)]
        # CPU time / wall time inside compute: well below 1 means another process took the core.
        cpu_share = min(sum(s[2] for s in r[name]) / sum(s[0] for s in r[name]) for r in per_rank)
        v = _virtual(name)
        interleaved = name in ("Interleaved1F1B", "InterleavedZeroBubble")
        out[name] = {
            "bubble": statistics.median(bubbles),
            "spread": max(bubbles) - min(bubbles),
            "step_ms": 1e3 * statistics.median(walls),
            "cpu_share": cpu_share,
            "theory": (pp - 1) / (m + pp - 1),
            "sched_theory": (pp - 1) / (v * m + pp - 1) if interleaved else
                            ((pp - 1) / (m + pp - 1) if name in ("GPipe", "1F1B") else None),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~1 min on 2 cores)")
    ap.add_argument("--pp", type=int, default=2, help="pipeline ranks (each needs its own core)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--mb-size", type=int, default=2, help="sequences per microbatch")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (default 64 quick, 128 full)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8, help="must fill pp*2 stages for the V/interleaved schedules")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per schedule (default 5 quick, 10 full)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    a = ap.parse_args()
    args = {
        "microbatches": a.microbatches, "mb_size": a.mb_size, "seq": a.seq or (64 if a.quick else 128),
        "d_model": a.d_model, "layers": a.layers, "steps": a.steps or (5 if a.quick else 10),
        "warmup": a.warmup, "schedules": [s for s in a.schedules.split(",") if s],
    }
    if "1F1B" not in args["schedules"]:
        args["schedules"].insert(0, "1F1B")  # the baseline every ratio refers to
    if a.pp > (os.cpu_count() or 1):
        print(f"warning: pp={a.pp} ranks on {os.cpu_count()} cores share cores; bubbles will be meaningless")

    from plait.runtime import ClusterConfig, connect, run_ranks, shutdown

    connect(ClusterConfig(num_cpus=8, num_gpus=0))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plait-bubble-") as run_dir:
        per_rank = run_ranks(bench_rank, a.pp, args, run_dir=run_dir)
    shutdown()  # no Ray log lines after this: RESULT stays the last line
    res = summarize(per_rank, a.pp, a.microbatches)

    p, m = a.pp, a.microbatches
    print(f"pp={p} microbatches={m} mb_size={a.mb_size} seq={args['seq']} d_model={a.d_model} "
          f"layers={a.layers} steps={args['steps']} (+{a.warmup} warm-up), {time.perf_counter() - t0:.0f}s")
    print(f"{'schedule':<22}{'v':>2}{'step_ms':>9}{'bubble':>8}{'theory':>8}{'sched_th':>9}{'meas/th':>8}"
          f"{'spread':>8}{'cpu/wall':>9}")
    for name, r in res.items():
        st = "-" if r["sched_theory"] is None else f"{r['sched_theory']:.3f}"
        print(f"{name:<22}{_virtual(name):>2}{r['step_ms']:>9.1f}{r['bubble']:>8.3f}{r['theory']:>8.3f}{st:>9}"
              f"{r['bubble'] / r['theory']:>8.2f}{r['spread']:>8.3f}{r['cpu_share']:>9.2f}")
    if min(r["cpu_share"] for r in res.values()) < 0.9:
        print("warning: compute got < 90% of a core (cpu/wall): other processes share these cores, so the "
              "numbers are inflated and noisy; rerun on an idle machine")
    base = res["1F1B"]
    fields = [f"bubble_ratio_1f1b={base['bubble'] / base['theory']:.3f}"]
    fields += [f"{SHORT[n]}_vs_1f1b={res[n]['bubble'] / base['bubble']:.3f}" for n in res if n in SHORT]
    fields += [f"{SHORT[n]}_step_vs_1f1b={res[n]['step_ms'] / base['step_ms']:.3f}" for n in res if n in SHORT]
    print("RESULT " + " ".join(fields), flush=True)


if __name__ == "__main__":
    main()
