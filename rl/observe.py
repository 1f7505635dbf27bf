"""What a user watches while RL trains: sample completions, answer diversity, a warning when the run collapses.

    watch = RunWatch(run_dir, metrics, cfg.rl)
    scalars = watch.step(version, batch_items)     # distinct_answers, answer_entropy, empty_share (into metrics)

Every ``rl.log_completions_every`` versions, ``rl.log_completions`` samples of the batch just trained (prompt,
completion, reward, the version that made it) are appended to ``<run_dir>/completions.jsonl`` and written to
TensorBoard as text. Each version's metrics get the batch's answer diversity: ``distinct_answers`` (how many
different completion texts, stripped), ``answer_entropy`` (nats, of their distribution) and ``empty_share``
(completions with no text). A run whose batches hold one answer for ``rl.collapse_window`` versions in a row
has collapsed (a constant answer or the empty one): it is said once, on the console and in the log, with what to
try.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path


def diversity(texts: list[str]) -> dict[str, float]:
    answers = Counter(t.strip() for t in texts)
    n = max(1, len(texts))
    entropy = -sum(c / n * math.log(c / n) for c in answers.values())
    return {"distinct_answers": float(len(answers)), "answer_entropy": entropy,
            "empty_share": answers.get("", 0) / n}


class RunWatch:
    def __init__(self, run_dir: str | Path, metrics, rl_cfg):
        self.path = Path(run_dir) / "completions.jsonl"
        self.metrics, self.cfg = metrics, rl_cfg
        self.same_answer, self.warned, self.last_answer = 0, False, None

    def step(self, version: int, items: list) -> dict[str, float]:
        texts = [t for it in items for t in it.texts]
        scalars = diversity(texts)
        if self.cfg.log_completions_every and version % self.cfg.log_completions_every == 0:
            self.log_completions(version, items)
        self.check_collapse(version, texts)
        return scalars

    def log_completions(self, version: int, items: list) -> None:
        rows = []
        for it in items:
            for i, text in enumerate(it.texts):
                if len(rows) >= self.cfg.log_completions:
                    break
                prompt = it.prompt_texts[i // it.group_size] if it.prompt_texts else ""
                rows.append({"version": version, "made_by": it.version, "prompt": prompt, "completion": text,
                             "reward": float(it.rewards[i]),
                             "finished": bool(it.finished[i]) if it.finished is not None else True})
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tb = getattr(self.metrics, "tb", None)
        if tb is not None:
            text = "\n\n".join(f"**{r['prompt']!r}** -> `{r['completion']!r}` (reward {r['reward']:.2f})" for r in rows)
            tb.add_text("completions", text, version)

    def check_collapse(self, version: int, texts: list[str]) -> None:
        answers = {t.strip() for t in texts}
        one = next(iter(answers)) if len(answers) == 1 else None
        self.same_answer = self.same_answer + 1 if one is not None and one == self.last_answer else \
            (1 if one is not None else 0)
        self.last_answer = one
        if not self.warned and self.cfg.collapse_window and self.same_answer >= self.cfg.collapse_window:
            self.warned = True
            what = "the empty answer" if one == "" else f"the one answer {one!r}"
            print(f"[plait] warning: the policy has given {what} to every prompt for {self.same_answer} versions "
                  f"(version {version}): it collapsed; a warm start with correct answers, a lower train.optim.lr, a "
                  "smaller train.max_step_kl or train.kl_beta > 0 usually help", flush=True)
