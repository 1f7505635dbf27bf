"""The generator actor: a GPT copy that samples completions for work items with the newest published weights.

    gen = Generator(model_cfg, GenerationConfig(group_size=8), seed=0, index=0)    # in an ActorPool slot
    out = gen.generate(Work(uid=5, task_ids=[40, 41], tasks=[...], max_new_tokens=8), published)
    out.tokens, out.mask, out.behaviour_logprobs, out.rewards, out.version    # (P * group_size) rows

``generate`` first loads ``published`` (a ``plait.rl.weights.Published``) if it is newer than what the actor
holds, so weights move between generations, once per version and actor. Each prompt is sampled
``group_size`` times (consecutive rows: GRPO's groups). The sampler is seeded by (seed, uid), so a work item
gives the same completions on whichever actor runs it, with the same weights.

Interruption (``GenerationConfig.interrupt``): the pool runs the actor with two threads; the driver's
``notify(version)`` marks a newer version as out, generation stops at its next decode step, the new weights
are loaded and the unfinished rows continue from their prompt plus what they generated so far (AReaL's
interruptible rollouts). Every token's behaviour log-prob is the one of the weights that sampled it; the
rollout's ``version`` is the OLDEST version that contributed (what staleness is counted from), and
``versions`` lists them all.

Unfinished completions: a row that has not emitted the stop token when its budget ends is trained on with
``unfinished_reward`` (default -1, below any task reward) instead of its task reward (DAPO's overlong
penalty). Without it, "never stop" scores like a wrong answer (0) while GRPO keeps pushing the stop token
down after every wrong answer; once most rows run to the budget, whole groups score 0, advantages vanish
and nothing pulls the policy back (an asynchronous run of digit_sum collapsed so). ``rewards`` stays the
task's score (what the metrics report); ``train_rewards`` is what the advantages use.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from plait.models.gpt import GPT, GPTConfig
from plait.rl.generate import Rollout, generate
from plait.rl.tasks import Task, reward
from plait.rl.tokenizer import CharTokenizer, left_pad
from plait.rl.weights import Published, load_weights


@dataclass
class GenerationConfig:
    group_size: int = 8  # completions per prompt (a GRPO group)
    prompts_per_call: int = 2  # prompts in one work item (one generate call)
    max_new_tokens: int = 4  # budget per completion (the longest of a work item's budgets, see max_new_tokens_min)
    max_new_tokens_min: int = 0  # > 0: each work item's budget drawn in [min, max] (varied generation lengths)
    temperature: float = 1.0
    top_p: float = 1.0
    format_reward: float = 0.0  # reward of a well-formed wrong answer (rl.tasks.reward)
    unfinished_reward: float = -1.0  # trained-on reward of a completion without the stop token in its budget
    interrupt: bool = False  # stop in-flight generation when a newer version is out, continue with it

    def check(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"generation.group_size={self.group_size}: GRPO advantages need >= 2 completions per "
                             "prompt")
        if self.prompts_per_call < 1 or self.max_new_tokens < 1:
            raise ValueError(f"generation.prompts_per_call={self.prompts_per_call} and max_new_tokens="
                             f"{self.max_new_tokens} must be >= 1")
        if not 0 <= self.max_new_tokens_min <= self.max_new_tokens:
            raise ValueError(f"generation.max_new_tokens_min={self.max_new_tokens_min}: 0 (off) or 1..max_new_tokens="
                             f"{self.max_new_tokens}")


@dataclass
class Work:
    uid: int  # unique over a run; lost work is issued again under the same uid
    task_ids: list[int]  # positions in the run's task stream
    tasks: list[Task]
    max_new_tokens: int

    @property
    def prompts(self) -> int:
        return len(self.tasks)


@dataclass
class RolloutBatch:
    """One work item's completions, ``prompts * group_size`` rows, right-padded prompt + completion."""

    uid: int
    task_ids: list[int]
    version: int  # the oldest weight version that sampled any token (staleness counts from it)
    versions: list[int]  # every version that contributed (several only after an interruption)
    tokens: torch.Tensor  # (R, S) long
    mask: torch.Tensor  # (R, S) bool: completion tokens
    behaviour_logprobs: torch.Tensor  # (R, S)
    rewards: torch.Tensor  # (R,)
    group_size: int
    completion_tokens: int  # valid completion tokens in all rows
    gen_time_s: float  # time spent in generate (weights loading excluded)
    load_time_s: float  # time spent fetching and loading weights
    generator: int  # the actor slot that made it
    interrupted: int = 0  # times generation was interrupted by a newer version
    texts: list[str] = field(default_factory=list, repr=False)
    finished: torch.Tensor | None = None  # (R,) bool: the row emitted the stop token within its budget
    train_rewards: torch.Tensor | None = None  # (R,) what advantages use: rewards, or unfinished_reward

    @property
    def shaped_rewards(self) -> torch.Tensor:
        """The rewards GRPO advantages are computed from (``rewards`` when no shaping was recorded)."""
        return self.rewards if self.train_rewards is None else self.train_rewards

    @property
    def prompts(self) -> int:
        return len(self.task_ids)

    @property
    def samples(self) -> int:
        return int(self.rewards.numel())


class Generator:
    def __init__(self, model_cfg: GPTConfig, gen_cfg: GenerationConfig, seed: int, index: int):
        gen_cfg.check()
        self.cfg, self.seed, self.index = gen_cfg, seed, index
        self.tok = CharTokenizer()
        self.model = GPT(model_cfg).eval()
        self.version = -1  # nothing loaded yet
        self.newest = -1  # the newest version the driver told us about (notify)
        self._lock = threading.Lock()
        self._pending: Published | None = None  # set by notify when interrupting
        self._receiver, self._receiver_at = None, None  # broadcast weight sync (sync_weights)

    def notify(self, published: Published) -> None:
        """A newer version is out (called from another thread while ``generate`` may run)."""
        with self._lock:
            if published.version > self.newest:
                self.newest, self._pending = published.version, published

    def sync_weights(self, address: tuple[str, int], round_id: int, epoch: int, size: int, version: int,
                     timeout_s: float = 60.0) -> int:
        """Broadcast weight sync (``plait.rl.weight_broadcast``): join the driver's round ``round_id`` as member
        ``index + 1`` of ``size`` and load the version the trainer broadcasts; returns it."""
        from plait.rl.weight_broadcast import WeightReceiver

        if self._receiver is None or self._receiver_at != tuple(address):
            self._receiver, self._receiver_at = WeightReceiver(tuple(address), timeout_s=timeout_s), tuple(address)
        self.version = -1  # a round that fails midway leaves some parameters overwritten: no version is held
        self.version = self._receiver.receive(self.model, round_id, epoch, self.index + 1, size, version)
        return self.version

    def _load(self, published: Published) -> float:
        t0 = time.perf_counter()
        if published.version > self.version and not published.ref:
            raise RuntimeError(f"generator {self.index} holds weight version {self.version}, the work asks for "
                               f"{published.version}, and weights come by broadcast (rl.weight_sync): the driver "
                               "must run a sync round (sync_weights) before issuing work of a newer version")
        if published.version > self.version:
            load_weights(self.model, published.fetch())
            self.version = published.version
        return time.perf_counter() - t0

    def generate(self, work: Work, published: Published) -> RolloutBatch:
        load_s = self._load(published)
        g = self.cfg.group_size
        prompts = [self.tok.encode(t.prompt, bos=True) for t in work.tasks for _ in range(g)]
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + work.uid)
        t0 = time.perf_counter()
        versions, interrupted = [self.version], 0
        completions: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        budget = work.max_new_tokens
        while live and budget > 0:
            batch = left_pad([prompts[i] + completions[i] for i in live], self.tok.pad_id)
            out = generate(self.model, batch.tokens, budget, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                           stop_token=self.tok.eos_id, generator=rng, pad_id=self.tok.pad_id,
                           weight_version=self.version,
                           should_interrupt=self._newer_out if self.cfg.interrupt else None)
            live, budget = self._extend(out, live, completions, logprobs, budget)
            if out.interrupted and live and budget > 0:
                interrupted += 1
                gen_s = time.perf_counter()
                load_s += self._load(self._pending)
                t0 += time.perf_counter() - gen_s  # loading is not generation time
                versions.append(self.version)
        gen_time = time.perf_counter() - t0
        return self._pack(work, prompts, completions, logprobs, versions, gen_time, load_s, interrupted)

    def _newer_out(self) -> bool:
        return self.newest > self.version

    def _extend(self, out: Rollout, live: list[int], completions, logprobs, budget: int) -> tuple[list[int], int]:
        still = []
        for row, i in enumerate(live):
            n = int(out.lengths[row])
            completions[i] += out.tokens[row, :n].tolist()
            logprobs[i] += out.logprobs[row, :n].tolist()
            if not bool(out.finished[row]):
                still.append(i)
        return still, budget - out.tokens.shape[1]

    def _pack(self, work, prompts, completions, logprobs, versions, gen_time, load_s, interrupted) -> RolloutBatch:
        width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        rows = len(prompts)
        tokens = torch.full((rows, width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.bool)
        behaviour = torch.zeros((rows, width), dtype=torch.float32)
        texts, rewards, finished = [], [], []
        for i, (p, c, lp) in enumerate(zip(prompts, completions, logprobs, strict=True)):
            tokens[i, :len(p)] = torch.tensor(p)
            tokens[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, len(p):len(p) + len(c)] = True
            behaviour[i, len(p):len(p) + len(c)] = torch.tensor(lp, dtype=torch.float32)
            text = self.tok.decode(c) if max(c, default=0) < self.tok.vocab_size else None  # None: an id past the
            texts.append(text or "")  # tokenizer's vocabulary (a model with a larger vocab_size): reward 0
            task = work.tasks[i // self.cfg.group_size]
            rewards.append(0.0 if text is None else reward(task, text, format_reward=self.cfg.format_reward))
            finished.append(self.tok.eos_id in c)
        scores, done = torch.tensor(rewards), torch.tensor(finished, dtype=torch.bool)
        return RolloutBatch(uid=work.uid, task_ids=list(work.task_ids), version=min(versions), versions=versions,
                            tokens=tokens, mask=mask, behaviour_logprobs=behaviour, rewards=scores,
                            group_size=self.cfg.group_size, completion_tokens=int(mask.sum()), gen_time_s=gen_time,
                            load_time_s=load_s, generator=self.index, interrupted=interrupted, texts=texts,
                            finished=done, train_rewards=torch.where(done, scores, self.cfg.unfinished_reward))

    def loaded_version(self) -> int:
        return self.version

