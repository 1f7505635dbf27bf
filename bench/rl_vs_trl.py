"""Plait's asynchronous RL job against TRL's GRPOTrainer: the same tiny model, prompts, reward, group size, batch,
learning rate and wall-clock budget, in one process run.

    python bench/rl_vs_trl.py --quick        # about two minutes: 2 x (start-up + 20 s of RL) + a shared warm start
    python bench/rl_vs_trl.py --budget 120   # longer runs, steadier figures

The workload, made offline in a temporary folder (nothing is downloaded):

- model: a random ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads / 2 kv heads; ``--hidden`` ``--layers``) with a
  character-level tokenizer (WordLevel over ``0123456789+=`` plus ``<pad> <s> </s> <unk>``; ``<s>`` before every
  prompt, ``</s>`` ends a completion), saved as a HF folder that both systems load;
- task: two-digit addition, prompt ``"a+b="`` (a, b in 10..99), ground truth ``str(a + b)``; 200 pairs are held out
  (never trained), the other 7900 are the training prompts (one JSONL file for Plait, the same rows as a
  ``datasets.Dataset`` for TRL);
- reward: ``plait.rl.rewards.exact_match`` (the stripped completion equals the answer: 1, else 0), the same Python
  function on both sides (Plait's ``reward.function = "exact_match"``, and a TRL reward callable around it);
- a shared supervised warm start (``--warm-steps``, default 600: cross-entropy on prompt + correct answer + eos,
  AdamW 3e-3, batch 64) so RL starts from a policy with some held-out accuracy (from random weights neither system
  gets any reward within the budget, and pass@1 would read 0 against 0). Both RL runs start from the same
  warm-started folder; the warm start is not timed against either.

RL settings, both sides: group size 8 (``--group``), 8 prompts per step (``--prompts``: 64 completions per optimizer
step), at most 5 new tokens, temperature 1 (no top-k / top-p), learning rate 3e-4 constant (``--lr``: Plait's RL
default; at 1e-3 both systems collapsed to held-out pass@1 ~0 within 20 s, while TRL reached ~0.9 anywhere in
3e-5..3e-4), AdamW (betas 0.9 / 0.95, weight decay 0, gradient clip 1.0), no KL term (beta 0), GRPO group advantages
(r - group mean) / group std, token-level loss normalisation (the batch's tokens), one policy update per generated
batch, float32 on the CPU. An unfinished completion (no ``</s>`` in 5 tokens) scores what the reward gives it (0) on
both sides (Plait's ``generation.unfinished_reward`` is set to 0 here; its default is -1).

- Plait: the control job ``plait.rl.rl_job`` on a local Ray cluster: 1 trainer rank (1 CPU, 1 torch thread) and
  ``rl.generators = 1`` generator actor (1 CPU, 1 thread) with ``rl.eta = 2`` (asynchronous: generation runs ahead
  of training by up to 2 weight versions), ``generation.prompts_per_call = 8`` (one work item = one step's
  prompts), loss ``tis`` (truncated importance weights, rho 2), and its trust region (``train.max_step_kl`` 0.05,
  its default; ``--set train.max_step_kl=0`` turns it off). Two processes with one core each, plus the driver and
  Ray's own processes.
- TRL 1.16 ``GRPOTrainer`` in this process, with torch's thread count chosen for it (``pick_threads``: the faster
  of 1 thread and torch's default, the cores, timed on a few training steps; ``--trl-threads`` fixes it), and its
  best ordinary settings for this size: ``loss_type="dapo"`` (its default: token-level over the batch, as Plait's),
  ``beta=0`` (its default), ``num_iterations=1``, ``per_device_train_batch_size=64`` with
  ``gradient_accumulation_steps=1`` (one generate call of all 64 completions per step: the largest batch, fewest
  calls), ``gradient_checkpointing=False`` (its default True trades time for memory a tiny model does not need),
  ``bf16=False`` (float32 on the CPU, as Plait), ``lr_scheduler_type="constant"``, ``adam_beta2=0.95`` (Plait's),
  ``use_cpu=True``, no vLLM, ``disable_tqdm``, ``report_to="none"``, ``save_strategy="no"``, logging every step.
  A TrainerCallback stops training once the budget has passed since ``on_train_begin``.

Measured for each, the same way: samples/s = completions trained / the training loop's wall time (Plait: its
controller's loop, ``loop_s``, from after the trainer and the generator actor are up to the last step's return;
TRL: from ``on_train_begin`` to the last ``on_step_end``), so start-up (Ray, actors, model loads; TRL's trainer
construction) is left out of both and reported apart (``startup``). Held-out pass@1: the final weights of each
(TRL's model in memory; Plait's HF export of its final policy, ``outputs/hf_export``, or without one its final
checkpoint loaded from its DCP files into the same HF class) through ONE
greedy evaluation function (``greedy_pass_at_1``: HF ``generate``, greedy, 5 new tokens, exact_match) on the 200
held-out prompts; the start figure is the warm-started folder's, the same for both.

CPU: on 2 cores Plait's trainer and generator take one core each (two busy processes), TRL one process with the
threads above; on an idle machine both can use both cores. On a machine loaded by other work the kernel shares the
cores per runnable thread, so two busy processes get a larger share than one, and the load moves between the two
runs: the table gives the 1-minute load average before and after each (one run each, TRL first, Plait second).

Last line: ``RESULT samples_per_s_ratio=<plait/trl> plait_samples_per_s=... trl_samples_per_s=...
plait_pass_at_1=... trl_pass_at_1=... start_pass_at_1=... ... budget_s=... load_avg=...`` (load at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

CHARS = "0123456789+="
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0 1 2 3


# --- the workload ----------------------------------------------------------------------------------------------

def char_tokenizer():
    """A transformers fast tokenizer: one token per character of CHARS, <s> before a text, </s> the eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=32,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_prompts(root: Path, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Every two-digit pair a+b, shuffled; the first ``held_out`` are the held-out split. Written as JSONL."""
    rows = [{"prompt": f"{a}+{b}=", "ground_truth": str(a + b), "data_source": "addition"}
            for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(rows)
    held, train = rows[:held_out], rows[held_out:]
    for name, part in (("train.jsonl", train), ("held_out.jsonl", held)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return train, held


def warm_start(src: Path, dst: Path, train: list[dict], steps: int, seed: int, batch: int = 64,
               lr: float = 3e-3) -> Path:
    """Supervised steps on prompt + correct answer + eos (loss on the answer), saved as a HF folder at ``dst``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    model = LlamaForCausalLM.from_pretrained(src)
    if steps:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        rng = random.Random(seed + 1)
        model.train()
        for _ in range(steps):
            rows = rng.sample(train, batch)
            seqs, starts = [], []
            for r in rows:
                p = tok(r["prompt"])["input_ids"]
                seqs.append(p + tok(r["ground_truth"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
                starts.append(len(p))
            width = max(map(len, seqs))
            ids = torch.full((batch, width), tok.pad_token_id)
            labels = torch.full((batch, width), -100)
            for i, (s, p) in enumerate(zip(seqs, starts, strict=True)):
                ids[i, :len(s)] = torch.tensor(s)
                labels[i, p:len(s)] = torch.tensor(s[p:])
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def pick_threads(folder: Path, train: list[dict], batch: int = 64, steps: int = 4) -> tuple[int, dict]:
    """The faster torch thread count for this process (TRL's side, and the untimed warm start and evaluations): 1,
    or torch's default (the cores), timed on a few training steps of the model. On a loaded machine more threads
    than free cores make every parallel region wait for a descheduled thread (measured here under load: 2 threads
    45x slower than 1 on this model), so a fixed default could handicap TRL; an idle machine may favour 2. The
    default-thread trial stops once it is past twice the 1-thread time."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    enc = tok([r["prompt"] + r["ground_truth"] for r in train[:batch]], return_tensors="pt", padding=True)

    def step() -> None:
        model(**enc, labels=enc["input_ids"]).loss.backward()

    default, times = torch.get_num_threads(), {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        step()  # warm-up
        t0, n = time.perf_counter(), 0
        while n < steps and not (1 in times and threads != 1 and time.perf_counter() - t0 > 2 * times[1] * steps):
            step()
            n += 1
        times[threads] = (time.perf_counter() - t0) / max(1, n)
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return best, times


def greedy_pass_at_1(model, tok, held: list[dict], max_new_tokens: int) -> float:
    """The ONE held-out evaluation of every model here: greedy completions (HF generate, left padding), decoded up to
    the eos without special tokens, scored by exact_match; the share scoring 1."""
    import torch
    from plait.rl.rewards import exact_match

    model.eval()
    tok.padding_side = "left"
    right = 0
    with torch.no_grad():
        for at in range(0, len(held), 100):
            rows = held[at:at + 100]
            enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            for r, ids in zip(rows, out[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
                ids = ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
                right += exact_match(r["data_source"], tok.decode(ids, skip_special_tokens=True), r["ground_truth"], {})
    return right / len(held)


def load_plait_checkpoint(start: Path, checkpoint: str):
    """Plait's final checkpoint (DCP files of the trainer's model, an HF LlamaForCausalLM under its own names) into
    a fresh model of the start folder's class and config."""
    from plait.runtime.checkpoint import ModelOptimizer
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(start)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ModelOptimizer(model).load_from(Path(checkpoint))
    if all(bool((before[k] == v).all()) for k, v in model.state_dict().items()):
        raise RuntimeError(f"loading {checkpoint} changed no weight: the checkpoint's names do not match the model's")
    return model


# --- TRL -------------------------------------------------------------------------------------------------------

def trl_exact_match(completions, ground_truth, data_source, **_):
    """TRL's reward callable: plait.rl.rewards.exact_match per completion (the function Plait's job uses)."""
    from plait.rl.rewards import exact_match

    return [exact_match(ds, c, gt, {}) for c, gt, ds in zip(completions, ground_truth, data_source, strict=True)]


def run_trl(a, start: Path, train: list[dict], out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    class Budget(TrainerCallback):
        """Stops training once ``budget`` seconds have passed since on_train_begin; keeps the loop's clock."""

        def __init__(self, budget: float):
            self.budget, self.t0, self.t_last, self.steps = budget, None, None, 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            self.t_last, self.steps = time.monotonic(), state.global_step
            if self.t_last - self.t0 >= self.budget:
                control.should_training_stop = True
            return control

    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    batch = a.prompts * a.group
    cfg = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=a.seed, data_seed=a.seed,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, gradient_checkpointing=False,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=a.group,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
        max_steps=1_000_000, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_vllm=False,
    )
    dataset = Dataset.from_list(train)
    tok = AutoTokenizer.from_pretrained(start)
    model = LlamaForCausalLM.from_pretrained(start)
    budget = Budget(a.budget)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_exact_match, args=cfg, train_dataset=dataset,
                          processing_class=tok, callbacks=[budget])
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every step's log dict; logs still kept
    trainer.train()
    wall = time.monotonic() - t_start
    loop = budget.t_last - budget.t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    samples = budget.steps * batch  # one generation batch = one optimizer step (num_iterations = 1)
    return {"steps": budget.steps, "samples": samples, "loop_s": loop, "samples_per_s": samples / loop,
            "startup_s": budget.t0 - t_start, "wall_s": wall, "rewards": rewards, "model": trainer.model,
            "threads": __import__("torch").get_num_threads(), "load": (load0, os.getloadavg()[0])}


# --- Plait -----------------------------------------------------------------------------------------------------

def plait_table(a, start: Path, root: Path, run_dir: Path) -> dict:
    return {
        "job": "plait.rl.rl_job", "run_dir": str(run_dir),
        "workers": {"num": 1, "cpus_per_worker": 1},
        "model": {"path": str(start)},
        "prompts": {"files": [str(root / "train.jsonl")], "eval_files": [str(root / "held_out.jsonl")],
                    "eval_every": 1_000_000_000, "eval_size": a.held_out, "seed": a.seed},  # version 0 and the end
        "reward": {"function": "exact_match"},
        "generation": {"group_size": a.group, "prompts_per_call": a.prompts_per_call,
                       "max_new_tokens": a.max_new_tokens, "temperature": 1.0, "unfinished_reward": 0.0},
        "rl": {"generators": 1, "generator_cpus": 1, "eta": a.eta, "batch_prompts": a.prompts},
        "train": {"steps": 1_000_000, "time_budget_s": a.budget, "checkpoint_every": 0, "seed": a.seed,
                  "optim": {"lr": a.lr, "weight_decay": 0.0, "warmup_steps": 0}},
        "plan": {"dp": 1},
    }


def run_plait(a, start: Path, root: Path) -> dict:
    from plait.runtime import ClusterConfig, connect, shutdown
    from plait.runtime.config import apply_overrides
    from plait.runtime.job import run_job
    from plait.runtime.spec import spec_from_table

    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    connect(ClusterConfig(num_cpus=2, num_gpus=0))  # logical CPUs: the trainer rank and the generator, one each
    try:
        table = apply_overrides(plait_table(a, start, root, root / "plait_run"), a.set)
        s = run_job(spec_from_table(table, source="bench/rl_vs_trl.py"))
    finally:
        shutdown()  # no Ray log lines after this: RESULT stays the last line
    wall = time.monotonic() - t_start
    return {**s, "wall_s": wall, "startup_wall_s": wall - s["loop_s"], "load": (load0, os.getloadavg()[0])}


# --- the bench -------------------------------------------------------------------------------------------------

def tail_mean(values: list[float], share: float = 0.25) -> float:
    n = max(1, int(len(values) * share))
    return sum(values[-n:]) / n if values else float("nan")


def head_mean(values: list[float], share: float = 0.25) -> float:
    n = max(1, int(len(values) * share))
    return sum(values[:n]) / n if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s of RL per system")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of RL per system (the training loop's)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO group)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    ap.add_argument("--prompts-per-call", type=int, default=8, help="Plait: prompts per generator work item")
    ap.add_argument("--eta", type=int, default=2, help="Plait's staleness bound (0 = synchronous)")
    ap.add_argument("--lr", type=float, default=3e-4, help="both sides (Plait's RL default)")
    ap.add_argument("--max-new-tokens", type=int, default=5)
    ap.add_argument("--warm-steps", type=int, default=600, help="shared supervised warm start (0: RL from random)")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-threads", type=int, default=0, help="torch threads for TRL (0: the faster of 1 and the "
                    "default, timed)")
    ap.add_argument("--set", action="append", default=[], help="extra Plait spec overrides (train.loss=decoupled_ppo)")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget = 20.0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames TRL still passes
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP read in one process
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars around the table

    with tempfile.TemporaryDirectory(prefix="plait-rl-vs-trl-") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        base = make_model(root / "random", args.hidden, args.layers, args.seed)
        train, held = make_prompts(root, args.held_out, args.seed)
        threads, trial = pick_threads(base, train) if args.trl_threads == 0 else (args.trl_threads, {})
        import torch

        torch.set_num_threads(threads)
        print(f"[bench] torch threads in this process (TRL): {threads} "
              f"({', '.join(f'{k}: {1000 * v:.0f} ms/step' for k, v in trial.items()) or 'given'})", flush=True)
        start = warm_start(base, root / "start", train, args.warm_steps, args.seed)
        tok = AutoTokenizer.from_pretrained(start)
        from transformers import LlamaForCausalLM

        start_p1 = greedy_pass_at_1(LlamaForCausalLM.from_pretrained(start), tok, held, args.max_new_tokens)
        print(f"[bench] workload made in {time.monotonic() - t0:.1f}s: {len(train)} training prompts, {len(held)} "
              f"held out; warm start {args.warm_steps} steps -> held-out pass@1 {start_p1:.3f}", flush=True)

        trl = run_trl(args, start, train, root / "trl_out")  # before Ray starts: no Ray process beside it
        trl_p1 = greedy_pass_at_1(trl.pop("model"), tok, held, args.max_new_tokens)
        print(f"[bench] TRL: {trl['steps']} steps in {trl['loop_s']:.1f}s, held-out pass@1 {trl_p1:.3f}", flush=True)

        plait = run_plait(args, start, root)
        if plait.get("export"):  # the job's own HF export of its final policy (outputs/hf_export)
            final, source = LlamaForCausalLM.from_pretrained(plait["export"]), "its HF export"
        else:  # a job without [export]: its final checkpoint
            final, source = load_plait_checkpoint(start, plait["checkpoint"]), "its final checkpoint"
        plait_p1 = greedy_pass_at_1(final, tok, held, args.max_new_tokens)
        print(f"[bench] Plait: {plait['steps_run']} steps in {plait['loop_s']:.1f}s, held-out pass@1 {plait_p1:.3f} "
              f"({source})", flush=True)

    def reward_trend(rewards: list[float]) -> str:
        return f"{head_mean(rewards):.3f} -> {tail_mean(rewards):.3f}"

    rows = [("plait", plait["steps_run"], plait["samples_trained"], plait["loop_s"], plait["samples_per_s"], start_p1,
             plait_p1, reward_trend(plait["rewards"]), plait["startup_wall_s"], plait["wall_s"], plait["load"]),
            ("trl", trl["steps"], trl["samples"], trl["loop_s"], trl["samples_per_s"], start_p1, trl_p1,
             reward_trend(trl["rewards"]), trl["startup_s"], trl["wall_s"], trl["load"])]
    print(f"{'system':6} {'steps':>6} {'samples':>8} {'loop s':>7} {'samples/s':>10} {'pass@1 start':>12} "
          f"{'pass@1 end':>10} {'reward 1st -> last 1/4':>22} {'startup s':>9} {'wall s':>7} {'load before/after':>17}")
    for r in rows:
        print(f"{r[0]:6} {r[1]:>6} {r[2]:>8} {r[3]:>7.1f} {r[4]:>10.1f} {r[5]:>12.3f} {r[6]:>10.3f} {r[7]:>22} "
              f"{r[8]:>9.1f} {r[9]:>7.1f} {f'{r[10][0]:.1f} / {r[10][1]:.1f}':>17}")
    print(f"plait: eta={plait['eta']} staleness={plait['staleness']} dropped={len(plait['dropped'])} "
          f"train_step_s={plait['train_step_s']:.3f} gen_ms_per_sample={1000 * plait['gen_s_per_sample']:.2f} "
          f"trainer_busy={plait['trainer_busy_share']:.2f} gen_busy={plait['gen_busy_share']:.2f}; "
          f"trl: torch threads={trl['threads']}")
    own = [e["eval_pass_at_1"] for e in plait.get("evals", [])]
    if own:  # Plait's own greedy scoring (its generator, its decoding) of the same held-out prompts: a cross-check
        print(f"plait's own held-out scoring (generator, greedy): pass@1 {own[0]:.3f} at version 0, {own[-1]:.3f} at "
              f"the end (this bench's evaluation: {start_p1:.3f}, {plait_p1:.3f})")
    ratio = plait["samples_per_s"] / trl["samples_per_s"]
    print(f"RESULT samples_per_s_ratio={ratio:.2f} plait_samples_per_s={plait['samples_per_s']:.1f} "
          f"trl_samples_per_s={trl['samples_per_s']:.1f} plait_pass_at_1={plait_p1:.3f} trl_pass_at_1={trl_p1:.3f} "
          f"start_pass_at_1={start_p1:.3f} plait_steps={plait['steps_run']} trl_steps={trl['steps']} "
          f"budget_s={args.budget:g} eta={args.eta} cores={os.cpu_count()} load_avg={os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
