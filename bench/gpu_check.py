"""A GPU check for a short GPU slot: Plait's GPT at ~1B parameters in bf16 on one GPU.

    python bench/gpu_check.py                  # one GPU (e.g. an H200): well under 8 minutes
    python bench/gpu_check.py --dry-run        # the same code path on CPU at a tiny size (CI, no GPU)

Reports, on one GPU, with the plan ``dp=1, engine=ddp`` and the model in bf16 (``train.dtype=bfloat16``):
  * tokens/s and MFU: model FLOPs per token 6*N + 12*L*d*seq (N without the embedding table; PaLM's
    count, attention not halved for the causal mask) against the GPU's dense bf16 peak (a table by
    name, or --peak-tflops);
  * that SDPA ran its flash kernel: every step runs under ``sdpa_kernel(FLASH_ATTENTION)``, which
    raises instead of falling back to another kernel;
  * peak memory (``torch.cuda.max_memory_allocated``) against ``plait plan estimate``'s figure for
    the same model, plan, batch and sequence (parallel/estimate.py);
  * host-to-device bandwidth from pinned against pageable memory (``non_blocking`` copies of a
    256 MiB buffer, best of several);
  * a float8 row: the same steps with the blocks' linears in float8 (``plan.float8``, parallel/float8.py,
    ``--float8`` recipe, eager: no torch.compile) where the GPU has float8 matmuls (compute capability >= 8.9),
    its tokens/s against the bf16 row; otherwise the row says "float8: not supported on <GPU>". The dry run
    takes the same path in torchao's CPU emulation;
  * a compile row: the same steps with each block compiled (``plan.compile="blocks"``, parallel/compile.py;
    ``--compile``, off skips it): MFU, tokens/s and peak memory against the eager bf16 row; its compile time
    (the first warm-up step's excess over a timed step) reported apart, never inside tokens/s;
  * an 8-bit optimizer row: the same eager steps with AdamW's moments in 8 bits (``train.optim.states="8bit"``,
    parallel/low_bit_optim.py): tokens/s and peak memory against the estimate for 8-bit states.
Last line: ``RESULT mfu=... tokens_per_s=... peak_mem_gib=... estimate_gib=... mem_vs_estimate=...
h2d_pinned_gbps=... h2d_pageable_gbps=... pinned_vs_pageable=... flash=... device=... float8=<recipe or
unsupported> float8_tokens_per_s=... float8_vs_bf16=... compile=<mode> compile_mfu=... compile_tokens_per_s=...
compile_vs_eager=... compile_peak_mem_gib=... compile_s=... optim8bit_tokens_per_s=... optim8bit_peak_mem_gib=...
optim8bit_estimate_gib=... optim8bit_mem_vs_estimate=...``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from plait.models import estimate_for
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.compile import MODES as COMPILE_MODES
from plait.parallel.compile import apply_compile
from plait.parallel.float8 import RECIPES, convert_model, device_refusal
from plait.parallel.low_bit_optim import LowBitAdamW
from plait.parallel.plan import ParallelPlan
from torch.nn.attention import SDPBackend, sdpa_kernel

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
                    "H20": 148.0, "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}

FULL = dict(vocab_size=32000, d_model=2048, n_layers=18, n_heads=16, max_seq_len=2048)  # ~1.04e9 parameters
TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)


def peak_tflops(name: str, override: float) -> float:
    if override > 0:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return math.nan  # unknown GPU: pass --peak-tflops for an MFU


def flops_per_token(cfg: GPTConfig, seq: int) -> float:
    n = cfg.num_params() - cfg.vocab_size * cfg.d_model  # the embedding lookup does no matmul
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * seq


def estimate_bytes(cfg: GPTConfig, batch: int, seq: int, states: str = "fp32") -> int:
    """``plait plan estimate``'s per-rank total for this model on one rank, plan dp=1 ddp, bf16 model."""
    return estimate_for(cfg, ParallelPlan(dp=1, engine="ddp"), global_batch=batch, seq_len=seq,
                        dtype="bfloat16", optim_states=states)[0].total


def train_steps(cfg: GPTConfig, device: torch.device, batch: int, seq: int, warmup: int, steps: int,
                flash: bool, float8: str = "off", compile: str = "off", states: str = "fp32",
                first: list[float] | None = None) -> tuple[float, list[float]]:
    """Train ``warmup + steps`` steps on random tokens; returns (seconds of the timed steps, losses).
    ``float8``: the blocks' linears converted first (plan.float8's recipe); ``compile``: plan.compile's mode;
    ``states``: AdamW's moments (train.optim.states); ``first``: gets the first step's seconds appended."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg).to(torch.bfloat16)
    convert_model(model, float8, device)
    apply_compile(model, compile)
    if states == "fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=False)  # as the estimator assumes
    else:
        opt = LowBitAdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=0.01, states=states)
    if device.type == "cuda":  # from here on: what the estimate counts (the fp32 init copy is gone)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    losses, started, began = [], 0.0, time.perf_counter()
    backends = [SDPBackend.FLASH_ATTENTION] if flash else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION,
                                                             SDPBackend.EFFICIENT_ATTENTION]
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        if step == 1 and first is not None:
            sync(device)
            first.append(time.perf_counter() - began)
        with sdpa_kernel(backends):  # flash only on GPU: SDPA raises rather than fall back
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a sync per step, as a training loop that logs the loss has
    sync(device)
    return time.perf_counter() - started, losses


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_gbps(device: torch.device, mib: int, pinned: bool, repeats: int = 5) -> float:
    """Best host-to-device bandwidth (GB/s) of a ``mib`` MiB copy from pinned or pageable host memory."""
    host = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dest = torch.empty_like(host, device=device)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dest.copy_(host, non_blocking=True)
        sync(device)
        best = max(best, host.numel() / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 3 steps: checks the code path")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: on a GPU 1 warm-up + 5 timed steps; without one, the --dry-run path")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (default 16; dry run 2)")
    p.add_argument("--seq", type=int, default=0, help="tokens per sequence (default 2048; dry run 64)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 20; dry run 2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--float8", default="tensorwise", choices=RECIPES,
                   help="the float8 row's recipe (plan.float8); off skips the row")
    p.add_argument("--compile", default="blocks", choices=COMPILE_MODES,
                   help="the compile row's mode (plan.compile); off skips the row")
    p.add_argument("--h2d-mib", type=int, default=0, help="copy size for the bandwidth test (default 256; dry 8)")
    args = p.parse_args(argv)
    dry = args.dry_run or (args.quick and not torch.cuda.is_available())
    if args.quick and not dry:
        args.steps, args.warmup = args.steps or 5, 1
    if not dry and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA device (torch {torch.__version__}): run with --dry-run on a CPU machine")
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    cfg = GPTConfig(**(TINY if dry else FULL))
    batch, seq = args.batch or (2 if dry else 16), args.seq or cfg.max_seq_len
    steps, warmup = args.steps or (2 if dry else 20), 1 if dry else args.warmup
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    print(f"gpu_check on {name}: GPT {cfg.num_params() / 1e9:.3f}B params (d={cfg.d_model}, L={cfg.n_layers}, "
          f"V={cfg.vocab_size}), bf16, batch {batch} x seq {seq}, {warmup} warm-up + {steps} timed steps", flush=True)

    seconds, losses = train_steps(cfg, device, batch, seq, warmup, steps, flash=device.type == "cuda")
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss in {losses}")
    tokens_per_s = batch * seq * steps / seconds
    achieved = tokens_per_s * flops_per_token(cfg, seq)
    peak = math.nan if dry else peak_tflops(name, args.peak_tflops) * 1e12
    mfu = achieved / peak
    estimate = estimate_bytes(cfg, batch, seq)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else math.nan
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {seconds / steps * 1e3:.1f} ms/step, {tokens_per_s:,.0f} "
          f"tokens/s, {achieved / 1e12:.1f} TFLOP/s of {peak / 1e12:.0f} peak", flush=True)
    print(f"memory: peak allocated {peak_mem / 2**30:.2f} GiB, plait plan estimate {estimate / 2**30:.2f} GiB",
          flush=True)

    if device.type == "cuda":
        mib = args.h2d_mib or 256
        pinned, pageable = h2d_gbps(device, mib, True), h2d_gbps(device, mib, False)
    else:
        pinned = pageable = math.nan  # pinned memory needs CUDA
    print(f"host->device {args.h2d_mib or 256} MiB: pinned {pinned:.1f} GB/s, pageable {pageable:.1f} GB/s",
          flush=True)
    flash = "asserted" if device.type == "cuda" else "n/a"
    f8_name, f8_tokens_per_s = float8_row(cfg, device, name, args.float8, batch, seq, warmup, steps, tokens_per_s)
    row = dict(cfg=cfg, device=device, batch=batch, seq=seq, warmup=warmup, steps=steps)
    compiled = compile_row(**row, mode=args.compile, eager_tokens_per_s=tokens_per_s, peak=peak)
    low_bit = optim8bit_row(**row)
    print(f"RESULT mfu={mfu:.3f} tokens_per_s={tokens_per_s:.0f} peak_mem_gib={peak_mem / 2**30:.2f} "
          f"estimate_gib={estimate / 2**30:.2f} mem_vs_estimate={peak_mem / estimate:.3f} "
          f"h2d_pinned_gbps={pinned:.1f} h2d_pageable_gbps={pageable:.1f} pinned_vs_pageable={pinned / pageable:.2f} "
          f"flash={flash} device={name.replace(' ', '_')} float8={f8_name} float8_tokens_per_s={f8_tokens_per_s:.0f} "
          f"float8_vs_bf16={f8_tokens_per_s / tokens_per_s:.3f} "
          + " ".join(f"{k}={v}" for k, v in {**compiled, **low_bit}.items()), flush=True)
    return 0


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else math.nan


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compile_row(cfg: GPTConfig, device: torch.device, batch: int, seq: int, warmup: int, steps: int, mode: str,
                eager_tokens_per_s: float, peak: float) -> dict:
    """The compile row (plan.compile=mode): MFU, tokens/s, peak memory, compile time apart (first step's excess)."""
    if mode == "off":
        print("compile: off (--compile off)", flush=True)
        return {"compile": "off"}
    reset_peak(device)
    first: list[float] = []
    seconds, losses = train_steps(cfg, device, batch, seq, max(warmup, 1), steps, flash=device.type == "cuda",
                                  compile=mode, first=first)
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite compiled loss in {losses}")
    tokens_per_s = batch * seq * steps / seconds
    mfu = tokens_per_s * flops_per_token(cfg, seq) / peak
    compile_s = first[0] - seconds / steps
    mem = peak_memory(device)
    print(f"compile ({mode}): loss {losses[0]:.3f} -> {losses[-1]:.3f}; {seconds / steps * 1e3:.1f} ms/step, "
          f"{tokens_per_s:,.0f} tokens/s ({tokens_per_s / eager_tokens_per_s:.2f}x eager), MFU {mfu:.3f}, "
          f"peak {mem / 2**30:.2f} GiB; compile time {compile_s:.1f} s (first step, not in tokens/s)", flush=True)
    return {"compile": mode, "compile_mfu": f"{mfu:.3f}", "compile_tokens_per_s": f"{tokens_per_s:.0f}",
            "compile_vs_eager": f"{tokens_per_s / eager_tokens_per_s:.3f}",
            "compile_peak_mem_gib": f"{mem / 2**30:.2f}",
            "compile_s": f"{compile_s:.1f}"}


def optim8bit_row(cfg: GPTConfig, device: torch.device, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """The 8-bit optimizer states row (train.optim.states=8bit): tokens/s, peak memory against its estimate."""
    reset_peak(device)
    seconds, losses = train_steps(cfg, device, batch, seq, warmup, steps, flash=device.type == "cuda", states="8bit")
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite 8-bit-optimizer loss in {losses}")
    tokens_per_s = batch * seq * steps / seconds
    mem, estimate = peak_memory(device), estimate_bytes(cfg, batch, seq, states="8bit")
    print(f"optimizer states 8bit: loss {losses[0]:.3f} -> {losses[-1]:.3f}; {tokens_per_s:,.0f} tokens/s, peak "
          f"{mem / 2**30:.2f} GiB, plait plan estimate {estimate / 2**30:.2f} GiB", flush=True)
    return {"optim8bit_tokens_per_s": f"{tokens_per_s:.0f}", "optim8bit_peak_mem_gib": f"{mem / 2**30:.2f}",
            "optim8bit_estimate_gib": f"{estimate / 2**30:.2f}", "optim8bit_mem_vs_estimate": f"{mem / estimate:.3f}"}


def float8_row(cfg: GPTConfig, device: torch.device, name: str, recipe: str, batch: int, seq: int, warmup: int,
               steps: int, bf16_tokens_per_s: float) -> tuple[str, float]:
    """The float8 row: (recipe or why not, tokens/s); the same steps with plan.float8's conversion."""
    refusal = device_refusal(recipe, device)
    if recipe == "off" or refusal:
        print(f"float8: not supported on {name}" if refusal else "float8: off (--float8 off)", flush=True)
        return ("unsupported" if refusal else "off"), math.nan
    seconds, losses = train_steps(cfg, device, batch, seq, warmup, steps, flash=device.type == "cuda",
                                  float8=recipe)
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite float8 loss in {losses}")
    tokens_per_s = batch * seq * steps / seconds
    emulated = " (torchao's CPU emulation: not a speed)" if device.type == "cpu" else " (eager, no torch.compile)"
    print(f"float8 ({recipe}){emulated}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; {seconds / steps * 1e3:.1f} "
          f"ms/step, {tokens_per_s:,.0f} tokens/s, {tokens_per_s / bf16_tokens_per_s:.2f}x the bf16 row", flush=True)
    return recipe, tokens_per_s


if __name__ == "__main__":
    raise SystemExit(main())
