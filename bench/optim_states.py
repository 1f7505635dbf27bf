"""AdamW's moments in fp32 (torch.optim.AdamW, what a user would otherwise run), bf16 and 8 bits (Plait's
``train.optim.states``, parallel/low_bit_optim.py), and torchao's AdamW8bit (the 8-bit optimizer a user would
install instead), on the demo GPT, in one process.

    python bench/optim_states.py            # the demo's data, 300 steps, 3 seeds (about 15 minutes on 2 cores)
    python bench/optim_states.py --quick    # 60 steps, 1 seed (about a minute)
    python bench/optim_states.py --data markov   # the synthetic Markov-chain tokens instead

Each run trains the demo's GPT (``examples/gpt_dp2.toml``: d_model 128, 4 layers, vocab 256) with the demo's
optimizer settings (lr 3e-3 cosine to 3e-4, 15 warm-up steps, weight decay 0.1, clipping 1.0) on batches of 16 x 128
tokens of the demo's data (byte tokens of the Python standard library, ``data.source = "python-stdlib"``; the last
5% of the rows held out). For each seed every optimizer gets the same initialisation and the same batches, so the
runs are paired: the figure that matters is the per-seed difference from fp32, and its spread over seeds says
how much of it is noise. Reported per optimizer:
  * bytes of moment state per parameter, counted from what the optimizer holds (step counters excluded);
  * the final training loss (mean of the last 10 steps) and the held-out loss at the end (32 fixed batches),
    each as the mean over seeds, and the held-out difference from fp32 in percent (mean and worst seed);
  * the optimizer step's time (median), separately from the forward/backward; torchao's first step (its
    torch.compile) is excluded and reported as compile time.
Last line: ``RESULT heldout_diff_8bit_pct=... bytes_per_param_8bit=... ... torchao8bit ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from plait.lm.data import markov_tokens, stdlib_bytes
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.parallelize import OptimConfig, lr_at, make_optimizer

CFG = GPTConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=128)
OPTIM = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=15)
SETTINGS = ("fp32", "bf16", "8bit", "torchao8bit")
HELD_OUT_BATCHES = 32


def token_rows(data: str, seq: int) -> np.ndarray:
    """(rows, seq + 1) of the demo's tokens (2M bytes of stdlib source), or of the Markov chain."""
    tokens = stdlib_bytes(2_000_000).astype(np.int64) if data == "stdlib" else markov_tokens(2_000_000, 256, 0)
    n = len(tokens) // (seq + 1)
    return tokens[: n * (seq + 1)].reshape(n, seq + 1)


def make(setting: str, model: torch.nn.Module):
    if setting != "torchao8bit":
        return make_optimizer(model.parameters(), OptimConfig(**{**vars(OPTIM), "states": setting}))
    from torchao.optim import AdamW8bit  # block-wise 8-bit moments, its own block size (256)

    return AdamW8bit(model.parameters(), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2),
                     weight_decay=OPTIM.weight_decay)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, rows: torch.Tensor, batch: int) -> float:
    losses = [lm_loss(model(rows[i:i + batch, :-1]), rows[i:i + batch, 1:]).item()
              for i in range(0, HELD_OUT_BATCHES * batch, batch)]
    return statistics.fmean(losses)


def run(setting: str, train: torch.Tensor, held: torch.Tensor, order: torch.Tensor, seed: int, batch: int) -> dict:
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = make(setting, model)
    losses, opt_s, first_s = [], [], 0.0
    steps = order.shape[0]
    for s in range(steps):
        for group in opt.param_groups:  # torchao keeps lr as a tensor (its compiled step reads it)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr_at(s, steps, OPTIM))
            else:
                group["lr"] = lr_at(s, steps, OPTIM)
        opt.zero_grad()
        rows = train[order[s]]
        loss = lm_loss(model(rows[:, :-1]), rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        t0 = time.perf_counter()
        opt.step()
        if s:
            opt_s.append(time.perf_counter() - t0)
        else:
            first_s = time.perf_counter() - t0
        losses.append(loss.item())
    n = sum(p.numel() for p in model.parameters())
    return dict(bytes_per_param=(moment_bytes(opt)) / n, final=statistics.fmean(losses[-10:]), first=losses[0],
                held=held_out_loss(model, held, batch), step_ms=statistics.median(opt_s[4:]) * 1e3,
                first_step_s=first_s, curve=losses)


def moment_bytes(opt) -> int:
    """Bytes of the moments this optimizer holds (step counters excluded); torchao's state tensors are subclasses
    holding codes and scales."""
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key == "step":
                continue
            if hasattr(value, "codes"):  # torchao OptimState8bit: uint8 codes + fp32 scales
                total += value.codes.numel() * value.codes.element_size() + value.scale.numel() * 4
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps and one seed")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--data", choices=("stdlib", "markov"), default="stdlib")
    p.add_argument("--settings", default=",".join(SETTINGS))
    args = p.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    seeds = args.seeds or (1 if args.quick else 3)
    settings = args.settings.split(",")
    rows = torch.from_numpy(token_rows(args.data, args.seq))
    split = int(len(rows) * 0.95)
    train, held = rows[:split], rows[split:]
    print(f"GPT {CFG.num_params():,} params (d_model {CFG.d_model}, {CFG.n_layers} layers), {args.data} data "
          f"({len(train)} training rows, {len(held)} held out), {steps} steps of {args.batch} x {args.seq} tokens, "
          f"lr 3e-3 cosine, clipping 1.0, {seeds} seed(s)", flush=True)
    results: dict[str, list[dict]] = {s: [] for s in settings}
    for seed in range(seeds):
        order = torch.randint(0, len(train), (steps, args.batch), generator=torch.Generator().manual_seed(seed))
        for setting in settings:
            r = run(setting, train, held, order, seed, args.batch)
            results[setting].append(r)
            every = max(1, steps // 6)
            curve = " ".join(f"{r['curve'][i]:.3f}" for i in range(0, steps, every))
            print(f"seed {seed} {setting:>11}: {r['bytes_per_param']:.3f} B/param of moments, loss {r['first']:.3f} "
                  f"-> {r['final']:.4f} (every {every} steps: {curve}), held-out {r['held']:.4f}, optimizer step "
                  f"{r['step_ms']:.2f} ms (first step {r['first_step_s']:.1f} s)", flush=True)
    base = results.get("fp32")
    fields, head = [], []
    for setting in [s for s in ("8bit", "torchao8bit", "bf16") if s in results] + (["fp32"] if base else []):
        rs = results[setting]
        fields.append(f"bytes_per_param_{setting}={rs[0]['bytes_per_param']:.3f}")
        fields.append(f"heldout_{setting}={statistics.fmean(r['held'] for r in rs):.4f}")
        fields.append(f"final_{setting}={statistics.fmean(r['final'] for r in rs):.4f}")
        if base and setting != "fp32":
            diffs = [(r["held"] - b["held"]) / b["held"] * 100 for r, b in zip(rs, base, strict=True)]
            head.append(f"heldout_diff_{setting}_pct={statistics.fmean(diffs):+.2f}")
            fields.append(f"heldout_diff_{setting}_worst_pct={max(diffs, key=abs):+.2f}")
        fields.append(f"step_ms_{setting}={statistics.median(r['step_ms'] for r in rs):.2f}")
    if "torchao8bit" in results:
        fields.append(f"compile_s_torchao8bit={results['torchao8bit'][0]['first_step_s']:.1f}")
    if base and len(base) > 1:
        held = [r["held"] for r in base]
        fields.append(f"fp32_seed_spread_pct={(max(held) - min(held)) / statistics.fmean(held) * 100:.2f}")
    fields += [f"steps={steps}", f"seeds={seeds}", f"data={args.data}"]
    print("RESULT " + " ".join(head + fields), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
