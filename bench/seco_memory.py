"""The longest sequence whose training step fits a fixed memory budget: full back-propagation, per-layer
activation checkpointing, and SeCO (parallel/chunkwise.py), with each method's bytes per token.

    python bench/seco_memory.py --quick        # 32 MiB budget: ~2 minutes on 2 cores
    python bench/seco_memory.py                # 96 MiB, up to 8 search trials: far longer (SeCO's lengths
                                               # grow with the budget, its attention with their square)

Two shapes of Plait's GPT, float32, batch 1:
  llama   Llama-shaped, small enough for a CPU: vocab 32000, d_model 128, 8 layers, 4 query heads over 1 kv
          head (GQA 4:1), SwiGLU. Logits dominate full back-propagation's memory, K/V SeCO's.
  mha     a small multi-head config: vocab 256, d_model 128, 4 layers, 4 heads (no GQA).

Method. Every trial is a fresh process (``--trial``) with the allocator settings below fixed and printed
(glibc: one arena, a fixed mmap threshold so large blocks are returned to the OS on free, trimming at
128 KiB; one torch thread). The trial builds the model, allocates every parameter's .grad, runs one
warm-up step at a short length, frees, resets the peak RSS (``/proc/self/clear_refs`` 5), then runs one
step at the trial length T: forward and backward (the optimizer step is the same for every method and
length and is not counted). Its cost is the peak RSS (VmHWM) minus the RSS before the step: what the step
adds above the model's baseline, including parameter-sized transients (the embedding's and output's
dense gradients) that every method pays once. A length fits when that cost is <= the budget.

  full   ``lm_loss(model(x), y).backward()``: SDPA with is_causal, no T x T mask is built
  ckpt   the same with every block wrapped by ``apply_activation_checkpointing(model, "full")``
  seco   ``seco_step(model, x, y, chunk_len)``

Search: two probe lengths give a linear fit (cost = a + b*T); each next trial is the refitted line's
prediction for the budget, kept strictly between the longest length that fit and the shortest that did
not (multiples of 8 tokens, of the chunk for SeCO), until they are one step apart or the steps run out.
Bytes per token are the slope b of a least-squares fit over every trial of a method. SeCO's floor is the
K/V cache plus its gradient: 2 * layers * 2 * kv_heads * head_dim * 4 bytes per token. SeCO adds, per
token, one (chunk x seq) additive attention mask shared by the layers and one layer's transient K/V
gradient.

Goals (issue 7): on the llama shape SeCO's length >= 16x full's and >= 4x checkpointing's; on both
shapes SeCO's bytes per token <= 1.5x the K/V cache plus its gradient.
Last line: ``RESULT llama_seco_vs_full=<ratio> llama_seco_vs_ckpt=... mha_seco_vs_full=... ...``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

from benchlib import proc_status

ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
                 "MALLOC_TOP_PAD_": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SHAPES = {
    "llama": dict(vocab_size=32000, d_model=128, n_layers=8, n_heads=4, n_kv_heads=1, max_seq_len=1 << 16),
    "mha": dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=1 << 16),
}
METHODS = ("full", "ckpt", "seco")
CHUNK = {"llama": 16, "mha": 32}


def kv_bytes_per_token(shape: str) -> int:
    c = SHAPES[shape]
    kv_heads = c.get("n_kv_heads") or c["n_heads"]
    return c["n_layers"] * 2 * kv_heads * (c["d_model"] // c["n_heads"]) * 4



def trial(shape: str, method: str, length: int, chunk: int) -> int:
    """One training step at ``length`` tokens in this (fresh) process: the bytes it adds at its peak."""
    import ctypes
    import gc

    import torch
    from plait.lm.chunkwise import seco_step
    from plait.models.gpt import GPT, GPTConfig, lm_loss
    from plait.parallel.activation_checkpoint import apply_activation_checkpointing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPTConfig(**SHAPES[shape])
    model = GPT(cfg)
    if method == "ckpt":
        apply_activation_checkpointing(model, "full")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    data = torch.randint(0, cfg.vocab_size, (1, length + 1))

    def step(n: int) -> None:
        x, y = data[:, :n], data[:, 1:n + 1]
        if method == "seco":
            seco_step(model, x, y, chunk)
        else:
            lm_loss(model(x), y).backward()

    step(min(length, 2 * chunk))  # warm-up: kernels, allocator pools
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = proc_status("VmRSS:")
    step(length)
    return proc_status("VmHWM:") - before


def run_trial(shape: str, method: str, length: int, chunk: int, timeout: float) -> int:
    env = {**os.environ, **ALLOCATOR_ENV}
    cmd = [sys.executable, os.path.abspath(__file__), "--trial", shape, method, str(length), str(chunk)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"trial {shape} {method} T={length} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def linear_fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of bytes against tokens."""
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(b for _, b in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    slope = sum((t - mx) * (b - my) for t, b in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def search(shape: str, method: str, budget: int, steps: int, timeout: float) -> dict:
    unit = CHUNK[shape] if method == "seco" else 8
    points: list[tuple[int, int]] = []

    def measure(length: int) -> bool:
        points.append((length, run_trial(shape, method, length, CHUNK[shape], timeout)))
        return points[-1][1] <= budget

    probes = (4 * unit, 16 * unit) if method == "seco" else (2 * unit, 6 * unit)
    lo, hi = 0, None
    for length in [*probes, None] + [None] * steps:
        if length is None:  # next length: the linear fit's prediction, kept strictly inside (lo, hi)
            if hi is not None and hi - lo <= unit:
                break
            a, b = linear_fit(points)
            length = int((budget - a) / b) // unit * unit if b > 0 else 2 * max(lo, unit)
            length = max(length, lo + unit)
            if hi is not None:
                length = min(length, hi - unit)
        if measure(length):
            lo = max(lo, length)
        else:
            hi = length if hi is None else min(hi, length)
    return {"max_len": lo, "bytes_per_token": linear_fit(points)[1], "trials": sorted(points)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB budget, <= 3 search trials")
    parser.add_argument("--budget-mib", type=float, default=None, help="memory budget per step (MiB)")
    parser.add_argument("--trial", nargs=4, metavar=("SHAPE", "METHOD", "LEN", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        shape, method, length, chunk = args.trial
        print(json.dumps({"bytes": trial(shape, method, int(length), int(chunk))}))
        return
    budget = int((args.budget_mib or (32 if args.quick else 96)) * 2**20)
    steps, timeout = (2, 600) if args.quick else (8, 1800)
    print("allocator/threads: " + " ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV.items()), flush=True)
    print(f"budget {budget / 2**20:.0f} MiB per training step above the model's baseline; chunk_len {CHUNK}",
          flush=True)
    jobs = [(shape, method) for shape in SHAPES for method in METHODS]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        found = dict(zip(jobs, pool.map(lambda j: search(*j, budget, steps, timeout), jobs), strict=True))
    print(f"{'shape':6} {'method':6} {'max_len':>8} {'bytes/token':>12}  trials (T: MiB)")
    for (shape, method), r in found.items():
        trials = ", ".join(f"{t}: {b / 2**20:.1f}" for t, b in r["trials"])
        print(f"{shape:6} {method:6} {r['max_len']:8d} {r['bytes_per_token']:12.0f}  {trials}")
    fields = []
    for shape in SHAPES:
        full, ckpt, seco = (found[(shape, m)] for m in METHODS)
        floor = 2 * kv_bytes_per_token(shape)
        fields += [f"{shape}_seco_vs_full={seco['max_len'] / max(full['max_len'], 1):.1f}",
                   f"{shape}_seco_vs_ckpt={seco['max_len'] / max(ckpt['max_len'], 1):.1f}",
                   f"{shape}_seco_bytes_vs_kv_floor={seco['bytes_per_token'] / floor:.2f}"]
        print(f"{shape}: K/V cache + gradient = {floor} B/token; SeCO {seco['bytes_per_token']:.0f} B/token; "
              f"lengths full {full['max_len']}, ckpt {ckpt['max_len']}, seco {seco['max_len']}")
    ok = [float(fields[0].split("=")[1]) >= 16, float(fields[1].split("=")[1]) >= 4,
          float(fields[2].split("=")[1]) <= 1.5, float(fields[5].split("=")[1]) <= 1.5]
    print("goals (llama seco>=16x full, >=4x ckpt; bytes/token <=1.5x floor on both): "
          + ("met" if all(ok) else f"NOT met {ok}"))
    print("RESULT " + " ".join(fields), flush=True)


if __name__ == "__main__":
    main()
