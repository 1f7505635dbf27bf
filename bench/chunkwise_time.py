"""Step time of SeCO against full back-propagation, and SpaCO's speed-up over SeCO (parallel/chunkwise.py).

    python bench/chunkwise_time.py --quick     # ~1 minute on 2 cores
    python bench/chunkwise_time.py             # longer sequences, more repetitions

Plait's GPT in the Llama shape of bench/seco_memory.py (vocab 32000, d_model 128, 8 layers, GQA 4:1,
SwiGLU), float32, batch 1, one torch thread (``--threads``).

1. SeCO / full: a length both can run (quick 512 tokens, else 1024) in 4 chunks. A full step is
   ``lm_loss(model(x), y).backward()``; a SeCO step is ``seco_step``: one forward over every chunk without
   grad, then every chunk again with grad and its backward, so about 4/3 of full's work (forward 1,
   backward 2, plus one more forward), the floor the issue puts at ~1.33x. Goal: <= 1.4x.
2. SpaCO / SeCO at 16 chunks (quick 1024 tokens, else 2048): ``spaco_step`` with t = 2 (each chunk joins
   the backward with probability 2/16), against ``seco_step``. Stage 1 (the forward over all chunks) is
   the same for both; stage 2 does about t/k of SeCO's. Goal: speed-up >= 2.5x (the paper reports up to 3x).

Method: the steps of each pair alternate (A B B A A B ...) after one warm-up step each; every step zeroes
the gradients first and is timed with perf_counter; the table shows medians and the process CPU time over
wall time (far below 1 means other processes took the core). The SpaCO draws use a seeded generator.
Last line: ``RESULT seco_vs_full=<median ratio> spaco_speedup=<seco/spaco> full_ms=... seco_ms=... spaco_ms=...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from plait.lm.chunkwise import seco_step, spaco_step
from plait.models.gpt import GPT, GPTConfig, lm_loss

SHAPE = dict(vocab_size=32000, d_model=128, n_layers=8, n_heads=4, n_kv_heads=1, max_seq_len=1 << 14)


def alternate(steps: dict, reps: int) -> dict[str, dict]:
    """Run each step ``reps`` times in A B B A order after a warm-up; wall and CPU seconds per run."""
    names = list(steps)
    for name in names:
        steps[name]()
    out = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            out[name]["wall"].append(time.perf_counter() - w0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def make_steps(model: GPT, length: int, chunk: int, t: int | None, seed: int = 0) -> dict:
    data = torch.randint(0, model.cfg.vocab_size, (1, length + 1), generator=torch.Generator().manual_seed(seed))
    x, y = data[:, :-1], data[:, 1:]
    gen = torch.Generator().manual_seed(seed)

    def zero():
        for p in model.parameters():
            p.grad = None

    def full():
        zero()
        lm_loss(model(x), y).backward()

    def seco():
        zero()
        seco_step(model, x, y, chunk)

    def spaco():
        zero()
        spaco_step(model, x, y, chunk, t, generator=gen)

    return {"full": full, "seco": seco} if t is None else {"seco": seco, "spaco": spaco}


def report(title: str, result: dict) -> dict[str, float]:
    print(title)
    medians = {}
    for name, r in result.items():
        medians[name] = statistics.median(r["wall"])
        load = sum(r["cpu"]) / sum(r["wall"])
        print(f"  {name:6} median {medians[name] * 1e3:9.1f} ms  (min {min(r['wall']) * 1e3:.1f}, "
              f"max {max(r['wall']) * 1e3:.1f}, n={len(r['wall'])}, cpu/wall {load:.2f})")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer repetitions")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE))
    reps = 5 if args.quick else 9
    short, long = (512, 1024) if args.quick else (1024, 2048)
    print(f"GPT {SHAPE}, float32, batch 1, {args.threads} thread(s), {reps} timed steps per method")
    first = report(f"1. full vs SeCO at {short} tokens, 4 chunks of {short // 4}",
                   alternate(make_steps(model, short, short // 4, None), reps))
    second = report(f"2. SeCO vs SpaCO (t=2) at {long} tokens, 16 chunks of {long // 16}",
                    alternate(make_steps(model, long, long // 16, 2), reps))
    ratio = first["seco"] / first["full"]
    speedup = second["seco"] / second["spaco"]
    print(f"SeCO / full = {ratio:.2f} (goal <= 1.4: {'met' if ratio <= 1.4 else 'NOT met'}); "
          f"SpaCO speed-up over SeCO = {speedup:.2f} (goal >= 2.5: {'met' if speedup >= 2.5 else 'NOT met'})")
    print(f"RESULT seco_vs_full={ratio:.2f} spaco_speedup={speedup:.2f} full_ms={first['full'] * 1e3:.0f} "
          f"seco_ms={first['seco'] * 1e3:.0f} spaco_ms={second['spaco'] * 1e3:.0f}", flush=True)


if __name__ == "__main__":
    main()
