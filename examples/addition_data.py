"""The RL recipe's inputs, made offline: a small random HF Llama with a character tokenizer, supervised text for a
short warm start, and two-digit addition prompts with their answers (a training set and a held-out set).

    python examples/addition_data.py data/addition

writes, under the folder given (a new or empty one, or one this script made before: then nothing is redone):

    model/          config.json, model.safetensors, tokenizer.json (one token per character of "0123456789+= ")
    sft.parquet     "prompt" "a+b=" and "completion" "c": answers to a share of the training prompts (the warm
                    start; the LM job trains on the completions only, data.prompt_column)
    train.jsonl     {"prompt": "a+b=", "ground_truth": "c"} for RL
    test.jsonl      held-out prompts, in neither of the two above

Every pair of two-digit numbers (10..99) appears in exactly one of train / test. A constant answer scores at most
1.1% here (no sum covers more than 90 of the 8,100 pairs), so the held-out pass@1 measures addition, not a guess.
Bring your own instead: any HF folder of a registered family, and Parquet / JSONL prompts with a ground-truth
column (README, "Your policy, prompts and reward").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

MARKER = "addition_data.json"


def make(out: Path, held_out: int, sft_share: float, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from plait.models.hf.tiny import make_tiny_llama
    from plait.storage.folders import write_atomic

    recipe = {"held_out": held_out, "sft_share": sft_share, "seed": seed, "sft": "prompt/completion"}
    marker = out / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made != recipe:
            sys.exit(f"{out} was made with {made}, not {recipe}: choose another folder (nothing was changed)")
        print(f"{out} is ready (made earlier with the same recipe)")
        return
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} holds files this script did not write: choose a new or empty folder (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    make_tiny_llama(out / "model", hidden=64, layers=2, heads=4, kv_heads=2, chars="0123456789+= ",
                    max_positions=64, seed=seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    test, train = pairs[:held_out], pairs[held_out:]
    sft = train[:int(len(train) * sft_share)]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": [f"{a}+{b}=" for a, b in sft], "completion": [str(a + b) for a, b in sft]}),
                   sink)
    write_atomic(out / "sft.parquet", sink.getvalue().to_pybytes())
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        text = "".join(json.dumps({"prompt": f"{a}+{b}=", "ground_truth": str(a + b)}) + "\n" for a, b in rows)
        write_atomic(out / name, text)
    write_atomic(marker, json.dumps(recipe))  # last: the folder is complete
    print(f"wrote {out}: model/, sft.parquet ({len(sft)} sums), train.jsonl ({len(train)} prompts), "
          f"test.jsonl ({len(test)} held out)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=Path("data/addition"))
    ap.add_argument("--held-out", type=int, default=500, help="pairs kept for the held-out test set")
    ap.add_argument("--sft-share", type=float, default=0.5, help="share of the training pairs in the warm start")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.sft_share <= 1 or not 0 < args.held_out < 8100:
        ap.error("--sft-share in (0, 1] and --held-out in 1..8099")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    make(args.out, args.held_out, args.sft_share, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
