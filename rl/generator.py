"""The generator actor: a copy of the policy that samples completions for work items with the newest weights.

    gen = Generator(policy_cfg, GenerationConfig(group_size=8), seed=0, index=0, reward=RewardConfig("math"))
    out = gen.generate(Work(uid=5, task_ids=[40, 41], tasks=[prompt, prompt], max_new_tokens=8), published)
    out.tokens, out.mask, out.behaviour_logprobs, out.rewards, out.version    # (P * group_size) rows
    scores = gen.evaluate(held_out_prompts, published, max_new_tokens=8)      # greedy: pass@1 and mean reward

The policy is any registered family (rl/policy.py: Plait's GPT with the character tokenizer, or a local HF
folder with its own tokenizer and chat template); a work item's prompts are records with their ground truth
(rl/prompts.py; a built-in task becomes one), scored by the run's reward (rl/rewards.py) from the completion's
text (decoded up to the first stop token, cut at the first stop string).

``generate`` first loads ``published`` (a ``plait.rl.weights.Published``) if it is newer than what the actor
holds, so weights move between generations, once per version and actor. Each prompt is sampled
``group_size`` times (consecutive rows: GRPO's groups). The sampler is seeded by (seed, uid), so a work item
gives the same completions on whichever actor runs it, with the same weights. A LoRA policy (``lora``: the
job's ``[train.lora]``) is the same adapted model the trainer builds, its base weights read from the folder
here; a version carries the adapters only.

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
from plait.models.gpt import GPTConfig
from plait.models.lora import LoraSettings
from plait.rl.generate import Rollout, generate
from plait.rl.policy import Policy, PolicyConfig
from plait.rl.prompts import Prompt
from plait.rl.rewards import RewardConfig, RewardRunner
from plait.rl.tasks import Task
from plait.rl.tokenizer import left_pad
from plait.rl.weights import Published, load_published


@dataclass
class GenerationConfig:
    group_size: int = 8  # completions per prompt (a GRPO group)
    prompts_per_call: int = 2  # prompts in one work item (one generate call)
    max_new_tokens: int = 4  # budget per completion (the longest of a work item's budgets, see max_new_tokens_min)
    max_new_tokens_min: int = 0  # > 0: each work item's budget drawn in [min, max] (varied generation lengths)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # > 0: sample among the k most probable tokens
    format_reward: float = 0.0  # built-in tasks: reward of a well-formed wrong answer (rl.tasks.reward)
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


def as_prompt(task: Task | Prompt) -> Prompt:
    """A built-in task as a prompt record (its name the data source, its checker's facts in extra)."""
    if isinstance(task, Prompt):
        return task
    return Prompt(task.prompt, task.answer, task.name, {"meta": task.meta, "prompt": task.prompt})


@dataclass
class Work:
    uid: int  # unique over a run; lost work is issued again under the same uid
    task_ids: list[int]  # positions in the run's prompt stream
    tasks: list[Prompt | Task]  # the prompt records (a built-in task is turned into one)
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
    prompt_texts: list[str] = field(default_factory=list, repr=False)  # one per prompt (what completions answer)
    reward_failures: list = field(default_factory=list, repr=False)  # rl.rewards.Failure of this item's samples
    reward_extras: dict = field(default_factory=dict)  # key -> (sum, count) of a dict reward's numeric extras

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
    def __init__(self, policy: PolicyConfig | GPTConfig, gen_cfg: GenerationConfig, seed: int, index: int,
                 reward: RewardConfig | None = None, reward_search: list[str] | None = None,
                 lora: LoraSettings | None = None):
        gen_cfg.check()
        self.cfg, self.seed, self.index = gen_cfg, seed, index
        self.policy = Policy(policy if isinstance(policy, PolicyConfig) else policy_of(policy), lora=lora)
        self.tok = self.policy.tokens()
        self.model = self.policy.build().eval()
        if self.policy.synced is not None:  # LoRA: the frozen base from the folder; versions bring the adapters
            with torch.no_grad():
                self.policy.spec.load_weights(self.model, self.policy.weights)
        self.rewards = RewardRunner(reward or RewardConfig(), list(reward_search or []))
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
            self._receiver = WeightReceiver(tuple(address), timeout_s=timeout_s, synced=self.policy.synced)
            self._receiver_at = tuple(address)
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
            load_published(self.model, published, self.policy.synced)
            self.version = published.version
        return time.perf_counter() - t0

    def generate(self, work: Work, published: Published) -> RolloutBatch:
        load_s = self._load(published)
        g = self.cfg.group_size
        records = [as_prompt(t) for t in work.tasks]
        prompts = [self.tok.prompt_ids(r.prompt) for r in records for _ in range(g)]
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
                           top_k=self.cfg.top_k, stop_tokens=self.tok.stop_ids, generator=rng, pad_id=self.tok.pad_id,
                           weight_version=self.version, spec=self.policy.spec,
                           should_interrupt=self._newer_out if self.cfg.interrupt else None)
            live, budget = self._extend(out, live, completions, logprobs, budget)
            if out.interrupted and live and budget > 0:
                interrupted += 1
                gen_s = time.perf_counter()
                load_s += self._load(self._pending)
                t0 += time.perf_counter() - gen_s  # loading is not generation time
                versions.append(self.version)
        gen_time = time.perf_counter() - t0
        return self._pack(work, records, prompts, completions, logprobs, versions, gen_time, load_s, interrupted)

    @torch.no_grad()
    def evaluate(self, records: list[Prompt], published: Published, max_new_tokens: int) -> dict:
        """Greedy completions of held-out ``records`` under ``published`` (pass@1 at temperature 0): per record
        the reward, whether it is correct (reward >= 1) and the completion's text."""
        self._load(published)
        records = [as_prompt(r) for r in records]
        batch = left_pad([self.tok.prompt_ids(r.prompt) for r in records], self.tok.pad_id)
        out = generate(self.model, batch.tokens, max_new_tokens, temperature=0.0, stop_tokens=self.tok.stop_ids,
                       pad_id=self.tok.pad_id, weight_version=self.version, spec=self.policy.spec)
        texts = [self.tok.decode(out.tokens[i, :int(out.lengths[i])].tolist()) for i in range(len(records))]
        scores, extras = self.rewards.score([self._sample(r, t) for r, t in zip(records, texts, strict=True)])
        failures, self.rewards.failures = self.rewards.failures, []
        return {"version": self.version, "rewards": scores, "texts": texts,
                "finished": out.finished.tolist(), "reward_errors": len(failures), "extras": sum_extras(extras)}

    def _sample(self, record: Prompt, text: str) -> tuple:
        extra = {**record.extra, "format_reward": self.cfg.format_reward}
        extra.setdefault("prompt", record.prompt if isinstance(record.prompt, str) else "")
        return record.data_source, text, record.ground_truth, extra

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

    def _pack(self, work, records, prompts, completions, logprobs, versions, gen_time, load_s,
              interrupted) -> RolloutBatch:
        width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        rows = len(prompts)
        tokens = torch.full((rows, width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.bool)
        behaviour = torch.zeros((rows, width), dtype=torch.float32)
        texts, samples, finished = [], [], []
        for i, (p, c, lp) in enumerate(zip(prompts, completions, logprobs, strict=True)):
            tokens[i, :len(p)] = torch.tensor(p)
            tokens[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, len(p):len(p) + len(c)] = True
            behaviour[i, len(p):len(p) + len(c)] = torch.tensor(lp, dtype=torch.float32)
            texts.append(self.tok.decode(c))
            samples.append(self._sample(records[i // self.cfg.group_size], texts[-1]))
            finished.append(bool(c) and c[-1] in self.tok.stop_ids)
        rewards, extras = self.rewards.score(samples)
        failures, self.rewards.failures = self.rewards.failures, []
        scores, done = torch.tensor(rewards, dtype=torch.float32), torch.tensor(finished, dtype=torch.bool)
        return RolloutBatch(uid=work.uid, task_ids=list(work.task_ids), version=min(versions), versions=versions,
                            tokens=tokens, mask=mask, behaviour_logprobs=behaviour, rewards=scores,
                            group_size=self.cfg.group_size, completion_tokens=int(mask.sum()), gen_time_s=gen_time,
                            load_time_s=load_s, generator=self.index, interrupted=interrupted, texts=texts,
                            finished=done, train_rewards=torch.where(done, scores, self.cfg.unfinished_reward),
                            prompt_texts=[_prompt_text(r.prompt) for r in records], reward_failures=failures,
                            reward_extras=sum_extras(extras))

    def loaded_version(self) -> int:
        return self.version


def sum_extras(extras: list[dict]) -> dict[str, tuple[float, int]]:
    """(sum, count) per key of the numbers (and booleans) among a dict reward's extras; other values (text, lists)
    stay out of the metrics."""
    out: dict[str, tuple[float, int]] = {}
    for extra in extras:
        for key, value in extra.items():
            if isinstance(value, (int, float)) and key != "reward_error":
                total, n = out.get(key, (0.0, 0))
                out[key] = (total + float(value), n + 1)
    return out


def policy_of(gpt: GPTConfig) -> PolicyConfig:
    """A PolicyConfig of Plait's GPT with these sizes (the character tokenizer)."""
    return PolicyConfig(vocab_size=gpt.vocab_size, d_model=gpt.d_model, n_layers=gpt.n_layers, n_heads=gpt.n_heads,
                        n_kv_heads=gpt.n_kv_heads, ffn_hidden=gpt.ffn_hidden, max_seq_len=gpt.max_seq_len,
                        rope_theta=gpt.rope_theta, norm_eps=gpt.norm_eps)


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
