"""AdamW's moments in fp32 (torch.optim.AdamW, what a user would otherwise run), bf16 and 8 bits (Plait's
``train.optim.states``, parallel/low_bit_optim.py), on the demo GPT's shape, in one process.

    python bench/optim_states.py            # 300 steps each (a few minutes on 2 cores)
    python bench/optim_states.py --quick    # 60 steps each (about a minute)

Each run trains the same GPT (d_model 128, 4 layers: the demo's ``examples/gpt_dp2.toml`` model) from the same
initialisation on the same batches of random-structure tokens (a fixed Markov chain, so the loss falls) with the
same learning-rate schedule, and reports:
  * bytes of moment state per parameter, counted from what the optimizer holds (step counters excluded);
  * the final loss (mean of the last 10 steps) and its difference from fp32's, in percent;
  * the optimizer step's time per step (median), separately from the forward/backward.
The baseline is torch's own AdamW (foreach, fp32 moments). Last line:
``RESULT bytes_8bit_vs_fp32=... bytes_per_param_8bit=... loss_diff_8bit_pct=... step_ms_fp32=... ...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.low_bit_optim import state_bytes
from plait.parallel.parallelize import OptimConfig, lr_at, make_optimizer

CFG = GPTConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=128)


def batches(steps: int, batch: int, seq: int) -> torch.Tensor:
    """Tokens from a fixed random Markov chain (each token has 4 likely successors): learnable structure."""
    g = torch.Generator().manual_seed(0)
    succ = torch.randint(0, CFG.vocab_size, (CFG.vocab_size, 4), generator=g)
    out = torch.empty(steps, batch, seq + 1, dtype=torch.long)
    out[:, :, 0] = torch.randint(0, CFG.vocab_size, (steps, batch), generator=g)
    for t in range(seq):
        pick = torch.randint(0, 4, (steps, batch), generator=g)
        noise = torch.rand(steps, batch, generator=g) < 0.1
        nxt = succ[out[:, :, t], pick]
        out[:, :, t + 1] = torch.where(noise, torch.randint(0, CFG.vocab_size, (steps, batch), generator=g), nxt)
    return out


def run(states: str, data: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=15, states=states)
    opt = make_optimizer(model.parameters(), cfg)
    losses, opt_s = [], []
    steps = data.shape[0]
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(s, steps, cfg)
        opt.zero_grad()
        loss = lm_loss(model(data[s, :, :-1]), data[s, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        t0 = time.perf_counter()
        opt.step()
        opt_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
    n = sum(p.numel() for p in model.parameters())
    moments = state_bytes(opt) - 4 * len(opt.state)
    return dict(bytes_per_param=moments / n, final=statistics.fmean(losses[-10:]), first=losses[0],
                step_ms=statistics.median(opt_s[5:]) * 1e3, curve=losses)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps instead of 300")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = batches(steps, args.batch, args.seq)
    print(f"GPT {CFG.num_params():,} params (d_model {CFG.d_model}, {CFG.n_layers} layers), {steps} steps of "
          f"{args.batch} x {args.seq} tokens, lr 3e-3 cosine, clipping 1.0", flush=True)
    results = {}
    for states in ("fp32", "bf16", "8bit"):
        r = results[states] = run(states, data)
        every = max(1, steps // 6)
        curve = " ".join(f"{r['curve'][i]:.3f}" for i in range(0, steps, every))
        print(f"{states:>5}: {r['bytes_per_param']:.3f} B/param of moments, loss {r['first']:.3f} -> "
              f"{r['final']:.4f} (every {every} steps: {curve}), optimizer step {r['step_ms']:.2f} ms", flush=True)
    base = results["fp32"]
    fields = [f"bytes_8bit_vs_fp32={results['8bit']['bytes_per_param'] / base['bytes_per_param']:.3f}"]
    for states in ("8bit", "bf16"):
        r = results[states]
        fields += [f"bytes_per_param_{states}={r['bytes_per_param']:.3f}",
                   f"loss_diff_{states}_pct={(r['final'] - base['final']) / base['final'] * 100:+.2f}",
                   f"step_ms_{states}={r['step_ms']:.2f}"]
    fields += [f"bytes_per_param_fp32={base['bytes_per_param']:.3f}", f"final_loss_fp32={base['final']:.4f}",
               f"step_ms_fp32={base['step_ms']:.2f}", f"steps={steps}"]
    print("RESULT " + " ".join(fields), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
