"""Fine-tuning a Hugging Face Llama through Plait against a plain single-process transformers loop.

    python bench/hf_finetune.py --quick        # ~1 minute on 2 cores
    python bench/hf_finetune.py                # more steps, steadier medians

The same local HF folder (a random ``LlamaForCausalLM`` made offline by ``hf_tiny``: default hidden 256,
4 layers, 8 heads / 4 kv heads, a 512-token BPE vocabulary trained on Python's standard library) and the
same packed text (standard-library documents, ``text_data``: seq 128, a block-diagonal document mask,
-100 targets across documents), the same global batch (8 sequences) and the same steps on both sides:

- plain: ``AutoModelForCausalLM.from_pretrained`` + ``torch.optim.AdamW`` (foreach, the same
  hyperparameters) + ``clip_grad_norm_(1.0)``, forward with the batch's ``input_ids``, ``position_ids``
  and ``attention_mask``, mean cross-entropy, backward, step: what a user writes by hand. No
  torch.distributed. torch threads: what it would use on this machine (``torch.get_num_threads()`` in a
  fresh process = the cores given to it).
- Plait dp=1: ``parallelize(..., weights=folder)`` with ``ParallelPlan(dp=1)`` (meta build, load, one AdamW,
  Plait's global-norm clipping at 1.0), ``train_step`` per step.

Both run in ONE process (a Ray rank with all the cores, torch threads = cores), interleaved in blocks of
steps so load drift on a shared machine hits both alike; the time of each step is taken to the returned
float loss (both sides synchronise there). The bench fails unless both sides' first losses agree (the
same computation). Then Plait at dp=2 (FSDP2, or DDP with ``--dp2-engine ddp``; 2 ranks, one core and
thread each, half the batch each) shows scaling: its tokens/s over Plait dp=1's (on 2 cores both use both
cores, so ~1x is the ceiling here; on a machine with more cores per rank, dp=2 adds hardware).

Last line: ``RESULT plait_dp1_time_over_plain=<median step time ratio> plain_tokens_per_s=...
plait_dp1_tokens_per_s=... plait_dp2_tokens_per_s=... dp2_over_dp1=...``. Goal: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

LOSS_TOL = 1e-4


def setup(root: Path, a) -> dict:
    """The model folder and the packed dataset (on the driver, once)."""
    from plait.lm.text_data import TextDataConfig, ensure_text_dataset
    from plait.models.hf.tiny import make_tiny_llama, write_sample_text

    model = make_tiny_llama(root / "model", hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads)
    text = write_sample_text(root / "text.parquet", max_docs=a.docs)
    cfg = TextDataConfig(files=[str(text)], tokenizer=str(model), seq_len=a.seq)
    ensure_text_dataset(cfg, root / "tokens")
    return {"model": str(model), "tokens": str(root / "tokens"), "batch": a.batch, "seq": a.seq,
            "steps": a.steps, "warmup": a.warmup, "block": a.block, "lr": 1e-3,
            "dp2_engine": a.dp2_engine}


def plain_side(args: dict):
    """A plain transformers training loop: returns step(inputs, targets) -> float loss."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step(inputs, targets) -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(**inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        return float(loss.detach())

    return step


def plait_side(args: dict, dp: int, engine: str = "fsdp2"):
    import torch
    from plait.models import spec_for_config
    from plait.parallel.mesh import build_mesh
    from plait.parallel.parallelize import OptimConfig, parallelize
    from plait.parallel.plan import ParallelPlan
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = ParallelPlan(dp=dp, engine=engine)
    cfg = AutoConfig.from_pretrained(args["model"], local_files_only=True)
    optim = OptimConfig(lr=args["lr"], warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
    parts = parallelize(lambda: AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), plan,
                        build_mesh(plan, "cpu"), torch.device("cpu"), optim, weights=args["model"],
                        spec=spec_for_config(cfg))
    return lambda inputs, targets: parts.train_step({**inputs, "use_cache": False}, targets, args["lr"])


def timed(step, batches, i: int, dp_rank: int, dp: int) -> tuple[float, float]:
    inputs, targets = batches.batch(i, dp_rank, dp)
    t = time.perf_counter()
    loss = step(inputs, targets)
    return time.perf_counter() - t, loss


def rank_dp1(ctx, args: dict) -> dict:
    """Plain loop and Plait dp=1 in one process, interleaved in blocks of steps."""
    import torch
    from plait.lm.text_batches import TextBatches
    from plait.storage.row_shards import RowShards

    batches = TextBatches(RowShards(args["tokens"]), args["batch"], 0)
    sides = {"plain": plain_side(args), "plait": plait_side(args, 1)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    total, block = args["warmup"] + args["steps"], args["block"]
    for start in range(0, total, block):
        for name, step in sides.items():
            for i in range(start, min(total, start + block)):
                dt, loss = timed(step, batches, i, 0, 1)
                losses[name].append(loss)
                if i >= args["warmup"]:
                    times[name].append(dt)
    return {"times": times, "losses": losses, "threads": torch.get_num_threads()}


def rank_dp2(ctx, args: dict) -> dict:
    import torch
    from plait.lm.text_batches import TextBatches
    from plait.storage.row_shards import RowShards

    batches = TextBatches(RowShards(args["tokens"]), args["batch"], 0)
    step = plait_side(args, 2, args["dp2_engine"])
    times, losses = [], []
    for i in range(args["warmup"] + args["steps"]):
        dt, loss = timed(step, batches, i, ctx.rank, 2)
        losses.append(loss)
        if i >= args["warmup"]:
            times.append(dt)
    return {"times": times, "losses": losses, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~1 min on 2 cores)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per side (default 12 quick, 40)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block", type=int, default=4, help="steps per side before switching sides")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--dp2-engine", default="fsdp2", choices=["fsdp2", "ddp"], help="Plait's engine at dp=2")
    ap.add_argument("--docs", type=int, default=400, help="standard-library documents in the text file")
    a = ap.parse_args()
    a.steps = a.steps or (12 if a.quick else 40)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    from plait.runtime import ClusterConfig, connect, run_ranks, shutdown

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plait-hf-bench-") as tmp:
        args = setup(Path(tmp), a)
        connect(ClusterConfig(num_cpus=max(2, cores), num_gpus=0))
        one = run_ranks(rank_dp1, 1, args, run_dir=Path(tmp) / "run1", cpus_per_worker=float(cores))[0]
        two = run_ranks(rank_dp2, 2, args, run_dir=Path(tmp) / "run2", cpus_per_worker=max(1.0, cores / 2))
        shutdown()  # no Ray log lines after this: RESULT stays the last line
    tokens = a.batch * a.seq
    plain, plait = statistics.median(one["times"]["plain"]), statistics.median(one["times"]["plait"])
    dp2 = statistics.median(max(ts) for ts in zip(*(r["times"] for r in two), strict=True))
    ratio = plait / plain
    print(f"LlamaForCausalLM hidden={a.hidden} layers={a.layers} heads={a.heads}/{a.kv_heads} vocab 512, seq {a.seq}, "
          f"{a.batch} sequences/step with document masks, fp32 CPU; {a.steps} measured steps per side "
          f"(+{a.warmup} warm-up), {time.perf_counter() - t0:.0f}s")
    print(f"{'side':<14}{'threads':>8}{'step_ms':>9}{'min_ms':>9}{'tokens/s':>10}{'loss@1':>10}{'loss@end':>10}")
    rows = [("plain", one["threads"], one["times"]["plain"], one["losses"]["plain"]),
            ("plait dp=1", one["threads"], one["times"]["plait"], one["losses"]["plait"]),
            ("plait dp=2", two[0]["threads"], [max(t) for t in zip(*(r["times"] for r in two), strict=True)],
             two[0]["losses"])]
    for name, threads, ts, ls in rows:
        med = statistics.median(ts)
        print(f"{name:<14}{threads:>8}{med * 1e3:>9.1f}{min(ts) * 1e3:>9.1f}{tokens / med:>10.0f}{ls[0]:>10.4f}"
              f"{ls[-1]:>10.4f}")
    diff = abs(one["losses"]["plain"][0] - one["losses"]["plait"][0])
    if not diff <= LOSS_TOL:
        print(f"FAIL: first losses differ by {diff:.2e} > {LOSS_TOL}: not the same computation")
        sys.exit(1)
    print(f"RESULT plait_dp1_time_over_plain={ratio:.3f} plain_tokens_per_s={tokens / plain:.0f} "
          f"plait_dp1_tokens_per_s={tokens / plait:.0f} plait_dp2_tokens_per_s={tokens / dp2:.0f} "
          f"dp2_over_dp1={plait / dp2:.3f} dp2_over_plain={plain / dp2:.3f} loss1_diff={diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
