"""A GPT train step eager against torch.compile (``plan.compile`` blocks and model), one process, CPU.

    python bench/compile_step.py --quick     # ~2-3 minutes on 2 cores (compiling is most of it)
    python bench/compile_step.py             # more steps

Two model sizes (small: d_model 256, 4 layers; large: d_model 512, 8 layers; 8 heads, seq 128, vocab 256,
8 sequences per step), float32, AdamW, clipping at 1.0 as ``parallelize`` does. Per size and mode the same seeded
model and batches; ``apply_compile`` (parallel/compile.py) as the plan applies it. The first step is reported on
its own (``first_s``: for a compiled mode it includes compiling forward and backward, for eager it is the cold
step) and the steady step is the median of the following ones (``step_ms``); compile time reported is
``first_s`` minus a steady step. Eager and compiled steps are not interleaved (a compiled model is compiled once),
so a change of load during the run shows: ``cpu/wall`` (process CPU time over wall time in the timed steps) says
whether other processes took the core, and ``cpu_ms`` (the median step's process CPU time, one thread) with its
``eager/this (cpu)`` ratio is the figure that load does not move much: on a shared machine read that one.
The first losses of each mode must agree with eager's within 1e-4 (the
bench fails otherwise): the three compute the same thing. Inductor's on-disk cache is an empty temporary dir, so
the compile time is a cold one (``--warm-cache``: inductor's default dir, where a second run mostly loads code).

Last line: ``RESULT speedup_blocks_small=<eager/blocks> speedup_blocks_large=... speedup_model_small=...
speedup_model_large=... compile_s_blocks_small=... ...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

SIZES = {"small": dict(d_model=256, n_layers=4), "large": dict(d_model=512, n_layers=8)}


def run_mode(size: str, mode: str, steps: int, threads: int) -> dict:
    import torch
    from plait.models.gpt import GPT, GPTConfig, lm_loss
    from plait.parallel.compile import apply_compile, graphs_compiled

    torch.set_num_threads(threads)
    cfg = GPTConfig(vocab_size=256, n_heads=8, max_seq_len=128, **SIZES[size])
    torch.manual_seed(0)
    model = GPT(cfg)
    apply_compile(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (8, cfg.max_seq_len + 1), generator=gen) for _ in range(4)]
    walls, cpus, losses = [], [], []
    for step in range(steps + 1):
        x = data[step % len(data)]
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        if step == 0:
            graphs = graphs_compiled()
    steady = statistics.median(walls[1:])
    return {"first_s": walls[0], "step_ms": 1e3 * steady, "compile_s": walls[0] - steady,
            "cpu_ms": 1e3 * statistics.median(cpus[1:]),
            "cpu_wall": sum(cpus[1:]) / sum(walls[1:]), "losses": losses, "params": cfg.num_params(),
            "recompiles": graphs_compiled() - graphs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 timed steps per mode (default 20)")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="use inductor's default cache dir (a second run then mostly loads compiled code)")
    a = ap.parse_args()
    steps = a.steps or (6 if a.quick else 20)
    res = {}
    with tempfile.TemporaryDirectory(prefix="plait-inductor-") as cache:
        if not a.warm_cache:  # a cold compile, what a first job on a machine pays
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for size in [s for s in a.sizes.split(",") if s]:
            for mode in ("off", "blocks", "model"):
                res[size, mode] = run_mode(size, mode, steps, a.threads)
    print(f"GPT train step, 1 process, CPU float32, {a.threads} thread(s), 8 x 128 tokens, {steps} timed steps "
          f"after the first")
    print(f"{'size':<7}{'params':>9}{'mode':>8}{'first_s':>9}{'compile_s':>10}{'step_ms':>9}{'cpu_ms':>8}"
          f"{'cpu/wall':>9}{'eager/this':>11}{'(cpu)':>7}{'|dloss@1|':>11}{'recompiles':>11}")
    fields, bad = {}, []
    for (size, mode), r in res.items():
        eager = res[size, "off"]
        speed, speed_cpu = eager["step_ms"] / r["step_ms"], eager["cpu_ms"] / r["cpu_ms"]
        d = abs(r["losses"][0] - eager["losses"][0])
        bad += [f"{size}/{mode}"] if d > 1e-4 or r["recompiles"] else []
        print(f"{size:<7}{r['params'] / 1e6:>8.1f}M{mode:>8}{r['first_s']:>9.2f}"
              f"{(r['compile_s'] if mode != 'off' else 0):>10.1f}{r['step_ms']:>9.1f}{r['cpu_ms']:>8.1f}"
              f"{r['cpu_wall']:>9.2f}{speed:>11.3f}{speed_cpu:>7.2f}{d:>11.1e}{r['recompiles']:>11}")
        if mode != "off":
            fields[f"speedup_{mode}_{size}"] = f"{speed:.3f}"
            fields[f"speedup_cpu_{mode}_{size}"] = f"{speed_cpu:.3f}"
            fields[f"compile_s_{mode}_{size}"] = f"{r['compile_s']:.1f}"
        fields[f"step_ms_{mode}_{size}"] = f"{r['step_ms']:.1f}"
    if bad:
        print(f"FAIL: first loss differs from eager by more than 1e-4, or a later step recompiled: {bad}")
        sys.exit(1)
    order = sorted(fields, key=lambda k: (not k.startswith("speedup"), not k.startswith("compile"), k))
    print("RESULT " + " ".join(f"{k}={fields[k]}" for k in order), flush=True)


if __name__ == "__main__":
    main()
