"""The trainer: one object per rank of the trainer's worker group, holding the policy and its optimizer.

    group.start(Trainer, cfg)                             # Trainer(ctx, cfg) per rank; loads ctx.resume_from
    [first] = group.call("hello")[:1]                     # {"version", "published", "meta"} (rank 0 publishes)
    stats = group.call("train_step", per_rank_args=collate(batch.items, dp, normalize))[0]
    stats["version"], stats["published"]                  # the new version, put in the object store once
    group.call("save", {"cursor": ...})                   # a committed checkpoint of version k

The policy is Plait's GPT under ``parallelize`` with the spec's plan: one rank, or data parallelism (DDP or
FSDP2) over the group's ranks, each training on its slice of the batch's rows; tp, pp and cp are refused.
The loss is ``plait.rl.losses.PolicyLoss`` ("tis" or "decoupled_ppo") through parallelize's own train
step (clipping, optimizer); decoupled PPO's proximal log-probs are the trainer's weights before the step.
GRPO advantages are per prompt group, computed in ``collate``. After every step rank 0 publishes the
new weights (``plait.rl.weights.publish``; unsharding is a collective, so every rank takes part).

``[train.lora]`` with rank > 0 (``plait.models.lora``): the folder's weights, frozen, with peft adapters on the
target modules; only the adapters are in the optimizer, and only they are published or broadcast (the
generators read the same base from the folder). Checkpoints hold the whole model as before; the export merges
the adapters into the base weights.

A batch in which every advantage is 0 (every group's completions scored alike: common once the policy is
nearly deterministic) takes no optimizer step, though it still makes a new version: Adam would otherwise
count its zero gradient, its second moment would decay over a run of such steps while its momentum
coasts on, and the next small noisy gradient becomes a full-size move of every parameter. A digit_sum run
(eta = 2, lr 1e-3) collapsed so into answering nothing (behaviour_kl 4 within three versions).

Every step is also held inside a trust region (``train.max_step_kl``, default 0.05 nats per token; 0 = off):
a step that moves the policy's next-token distributions on its own batch further than that is scaled back
by TRPO's backtracking line search (``plait.rl.trust_region``). Even with the skip above, single ordinary
Adam steps at lr 1e-3 moved the policy by up to 2.2 nats per token; synchronous runs recover on the next
fresh batch, but under eta = 2 the next two steps train on the old policy's rollouts, and 3 of 12 seeded
digit_sum runs collapsed into answering nothing (reward 0.00, 0.05, 0.00 at the end) where with the trust
region all 12 learned (final reward 0.26 to 0.32, the synchronous runs' 0.26 to 0.28). Metrics: ``step_kl``
(the KL the kept step made) and ``updated`` (the share of the step kept: 1, a halving, or 0).

A short supervised warm start (``train.warm_start_steps``) runs before version 0 is published: prompt +
answer + eos with cross-entropy on the answer. ``warm_start_correct_share`` is the share of examples given
the correct answer; the others get a random answer of the same form (digits stay digits, letters letters),
so with 0 the policy learns the format only and starts at chance (digit_sum: about 10%).
"""

from __future__ import annotations

import contextlib
import random
import string
import time
from dataclasses import dataclass, field

import torch
from plait.models.lora import LoraSettings, merged_view
from plait.parallel.data_parallel import ZERO_STAGES
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, iter_unsharded_parameters, parallelize
from plait.rl.generate import sequence_logprobs
from plait.rl.generator import RolloutBatch, policy_of
from plait.rl.losses import LOSSES, NORMALIZE, PolicyLoss, group_advantages, token_logprobs, train_batch
from plait.rl.policy import Policy, PolicyConfig
from plait.rl.tasks import make_tasks
from plait.rl.trust_region import StepGuard
from plait.rl.weights import Published, publish
from plait.runtime.checkpoint import ModelOptimizer
from plait.runtime.trainer import LoopConfig, TrainLoop


@dataclass
class TrainConfig(LoopConfig):
    """The RL trainer's ``[train]``: checkpoint_every (in weight versions), keep_last, resume and reschedule are
    the one loop's (runtime/trainer.py LoopConfig)."""

    steps: int = 100  # optimizer steps (= the final weight version)
    loss: str = "tis"  # tis | decoupled_ppo
    rho: float = 2.0  # truncation of the importance weight (0 = none)
    clip_eps: float = 0.2  # decoupled_ppo
    normalize: str = "token"  # token | sequence
    temperature: float = 1.0  # of the log-probs (the generators' sampling temperature)
    seed: int = 0
    warm_start_steps: int = 0  # supervised steps before version 0
    warm_start_batch: int = 32
    warm_start_lr: float = 3e-3
    warm_start_correct_share: float = 0.0  # 0: format only (chance level); 1: correct answers
    max_step_kl: float = 0.05  # > 0: a step moving the policy further (KL per token) is backtracked (trust_region)
    max_backtracks: int = 5  # halvings of the step before it is undone
    time_budget_s: float = 0.0  # > 0: stop after this much wall time (benchmarks), whatever steps says
    kl_beta: float = 0.0  # > 0: GRPO's KL penalty to a frozen reference (the initial policy), k3 estimator
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=0, weight_decay=0.0))
    lora: LoraSettings = field(default_factory=LoraSettings)  # rank > 0: only peft adapters train and sync

    def check(self) -> None:
        self.check_loop()
        self.lora.check()
        if self.loss not in LOSSES or self.normalize not in NORMALIZE:
            raise ValueError(f"train.loss={self.loss!r}, train.normalize={self.normalize!r}: choose a loss from "
                             f"{LOSSES} and a normalisation from {NORMALIZE}")
        if self.steps < 1 or self.rho < 0 or self.clip_eps <= 0 or self.temperature <= 0:
            raise ValueError(f"train.steps={self.steps} (>= 1), rho={self.rho} (>= 0), clip_eps={self.clip_eps} and "
                             f"temperature={self.temperature} (> 0) out of range")
        if not 0 <= self.warm_start_correct_share <= 1:
            raise ValueError(f"train.warm_start_correct_share={self.warm_start_correct_share}: a share in [0, 1]")
        StepGuard(self.max_step_kl, self.max_backtracks)  # its own range check, with the spec
        if self.kl_beta < 0:
            raise ValueError(f"train.kl_beta={self.kl_beta}: 0 (no reference model) or > 0")

    def loss_options(self) -> dict:
        rho = self.rho or None
        if self.loss == "tis":
            return {"rho": rho, "normalize": self.normalize, "kl_beta": self.kl_beta}
        return {"rho": rho, "clip_eps": self.clip_eps, "normalize": self.normalize, "kl_beta": self.kl_beta}


class RLLoss:
    """parallelize's ``loss_fn``: the policy loss, or next-token cross-entropy on a warm-start batch."""

    def __init__(self, policy: PolicyLoss, keep_logits: bool = False):
        self.policy, self.stats, self.keep_logits, self.logits = policy, {}, keep_logits, None

    def __call__(self, logits, batch: dict) -> torch.Tensor:
        logits = getattr(logits, "logits", logits)  # a HF causal LM's output object
        if "sft_mask" in batch:
            logp = token_logprobs(logits, batch["targets"])
            mask = batch["sft_mask"].to(logp.dtype)
            return -(logp * mask).sum() / mask.sum().clamp(min=1.0)
        loss = self.policy(logits, batch)
        self.stats = self.policy.stats
        self.logits = logits.detach() if self.keep_logits else None  # the policy before the step (trust region)
        return loss


def collate(items: list[RolloutBatch], dp: int, normalize: str = "token", pad_id: int = 0) -> list[tuple[dict]]:
    """Rollouts -> one ``(batch,)`` argument tuple per data-parallel rank: rows split evenly, padded to one
    width, GRPO advantages per prompt group (of ``shaped_rewards``: an unfinished row gets the penalty), and
    the loss denominator (global tokens or sequences / dp) that makes the ranks' mean the exact global mean."""
    width = max(int(it.tokens.shape[1]) for it in items)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    tokens = torch.cat([pad(it.tokens, pad_id) for it in items])
    mask = torch.cat([pad(it.mask, False) for it in items])
    behaviour = torch.cat([pad(it.behaviour_logprobs, 0.0) for it in items])
    adv = torch.cat([group_advantages(it.shaped_rewards, it.group_size) for it in items])
    rows = tokens.shape[0]
    if rows % dp:
        raise ValueError(f"{rows} rows do not split over {dp} trainer ranks: make batch_prompts * group_size a "
                         "multiple of the trainer's data-parallel degree")
    total = float(mask.sum()) if normalize == "token" else float((mask.sum(1) > 0).sum())
    each = rows // dp
    signal = bool((adv != 0).any())  # one decision for every rank (skipping is collective)
    return [({"tokens": tokens[r * each:(r + 1) * each], "mask": mask[r * each:(r + 1) * each],
              "behaviour_logprobs": behaviour[r * each:(r + 1) * each], "advantages": adv[r * each:(r + 1) * each],
              "denominator": max(total, 1.0) / dp, "signal": signal},) for r in range(dp)]


def scramble(answer: str, rng: random.Random) -> str:
    """A random answer of the same form: each digit a random digit, each letter a random letter."""
    return "".join(rng.choice(string.digits) if c.isdigit() else rng.choice(string.ascii_lowercase) if c.isalpha()
                   else c for c in answer)


def check_trainer_plan(plan, world_size: int) -> None:
    """What the RL trainer runs: data parallelism (DDP or FSDP2) and tensor parallelism; not pp, cp or ZeRO."""
    if plan.pp > 1 or plan.cp > 1 or plan.world_size != world_size or plan.engine in ZERO_STAGES:
        raise ValueError(f"the RL trainer runs data (DDP or FSDP2) and tensor parallelism: plan.dp * plan.tp must "
                         f"equal workers.num={world_size}, pp = cp = 1, engine ddp or fsdp2 (got {plan.describe()}, "
                         f"engine {plan.engine})")


class Trainer:
    def __init__(self, ctx, cfg):
        plan, train = cfg.plan, cfg.train
        check_trainer_plan(plan, ctx.world_size)
        self.ctx, self.cfg = ctx, cfg
        self.policy = Policy(cfg.model if isinstance(cfg.model, PolicyConfig) else policy_of(cfg.model),
                             lora=getattr(train, "lora", None), seed=train.seed)
        self.tok = self.policy.tokens()
        torch.manual_seed(train.seed)
        self.mesh = build_mesh(plan, ctx.device_type)
        self.guard = StepGuard(train.max_step_kl, train.max_backtracks, train.temperature)
        self.loss = RLLoss(PolicyLoss(train.loss, train.temperature, train.loss_options()), self.guard.enabled)
        self.parts = parallelize(self.policy.build, plan, self.mesh, ctx.device, train.optim, loss_fn=self.loss,
                                 spec=self.policy.spec, weights=self.policy.weights)
        self.reference = None  # the frozen initial policy of the KL penalty
        if train.kl_beta > 0:
            torch.manual_seed(train.seed)  # Plait's GPT: the same initial weights as the policy
            ref = parallelize(lambda: self.policy.build(base=True), plan, self.mesh, ctx.device, train.optim,
                              spec=self.policy.base_spec, weights=self.policy.weights)  # LoRA: the base alone
            self.reference = ref.modules[0].eval().requires_grad_(False)
        self.state = ModelOptimizer(self.parts.modules, self.parts.optimizers)
        self.warm_losses = []
        self.server = None  # rank 0's WeightServer under rl.weight_sync = "broadcast"
        if getattr(cfg.rl, "weight_sync", "object_store") == "broadcast" and ctx.is_main:
            from plait.rl.weight_broadcast import WeightServer

            host = ctx.node_ip if cfg.rl.weight_sync_host == "node" else cfg.rl.weight_sync_host
            self.server = WeightServer(host, torch.device("cpu"), cfg.rl.weight_sync_timeout_s,  # CPU generators
                                       cfg.rl.weight_sync_bucket_mb)
        # The one loop (runtime/trainer.py), driven from outside: the controller hands over each step and says when
        # to checkpoint (only it knows the rollout position); resume, the watchdog and PLAIT_FAULTS are the loop's.
        # The learning rate is constant, so another train.steps on resume changes no schedule.
        self.loop = TrainLoop(ctx, train, total=train.steps, state=self.state, metrics=False, autosave=False,
                              resume_step=lambda meta: int(meta["version"]), schedule_follows_total=False)
        self.version, self.meta = self.loop.start, self.loop.resumed
        self.loop.begin()
        if ctx.resume_from is None and train.warm_start_steps:
            self.warm_losses = self.warm_start()

    def warm_start(self) -> list[float]:
        train, task = self.cfg.train, self.cfg.task
        n = train.warm_start_steps * train.warm_start_batch
        tasks = make_tasks(task.name, n, seed=task.seed + 7919, **task.options)  # not the RL stream
        rng = random.Random(train.seed * 31 + self.ctx.rank)
        each = train.warm_start_batch // self.ctx.world_size
        losses = []
        for step in range(train.warm_start_steps):
            chunk = tasks[step * train.warm_start_batch:][self.ctx.rank * each:(self.ctx.rank + 1) * each]
            seqs, starts = [], []
            for t in chunk:
                answer = t.answer if rng.random() < train.warm_start_correct_share else scramble(t.answer, rng)
                prompt = self.tok.prompt_ids(t.prompt)
                seqs.append(prompt + self.tok.answer_ids(answer))
                starts.append(len(prompt))
            width = max(map(len, seqs))
            tokens = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.bool)
            for i, (s, p) in enumerate(zip(seqs, starts, strict=True)):
                tokens[i, :len(s)] = torch.tensor(s)
                mask[i, p:len(s)] = True
            batch = {"targets": tokens[:, 1:], "sft_mask": mask[:, 1:]}
            losses.append(self.parts.train_step(tokens[:, :-1], batch, train.warm_start_lr))
        return losses

    def hello(self) -> dict | None:
        """Version and checkpoint meta (rank 0), and the current weights published."""
        published = self._publish()
        self.ctx.step_done(self.version)  # the watchdog's step rhythm (runtime/watchdog.py)
        if not self.ctx.is_main:
            return None
        model_bytes = sum(p.numel() * p.element_size() for m in self.parts.modules for p in m.parameters())
        return {"version": self.version, "published": published, "meta": self.meta, "warm_losses": self.warm_losses,
                "model_bytes": model_bytes,
                "sync_address": self.server.address if self.server is not None else None,
                "pad_id": self.tok.pad_id}

    def _publish(self):
        """Every rank takes part (gathering a sharded parameter is a collective); rank 0 puts the version into the
        object store bucket by bucket, holding one bucket at a time (or hands it to the broadcast server)."""
        params = iter_unsharded_parameters(self.parts, only=self.policy.synced)  # LoRA: the adapters only
        if not self.ctx.is_main:
            for _ in params:  # the other ranks' share of each gather
                pass
            return None
        if self.server is not None:  # the generators get it by broadcast: only the version crosses Ray
            return Published(self.version, [], self.server.update(dict(params), self.version))
        return publish(params, self.version, self.cfg.rl.weight_sync_bucket_mb * 2**20)

    def train_step(self, batch: dict) -> dict | None:
        t0 = time.perf_counter()
        train, model = self.cfg.train, self.parts.modules[0]
        tokens, mask = batch["tokens"].to(self.ctx.device), batch["mask"].to(self.ctx.device)
        prox = None
        if train.loss == "decoupled_ppo":
            with torch.no_grad():
                prox = sequence_logprobs(model, tokens, mask, train.temperature)
        inputs, b = train_batch(tokens, mask, batch["behaviour_logprobs"].to(self.ctx.device),
                                batch["advantages"].to(self.ctx.device), prox)
        if self.reference is not None:
            with torch.no_grad():
                b["ref_logprobs"] = sequence_logprobs(self.reference, tokens, mask, train.temperature)[:, 1:]
        self.loss.policy.options["denominator"] = batch["denominator"]
        step_kl, step_scale = 0.0, float(batch.get("signal", True))
        if batch.get("signal", True):
            params = self.guard.parameters(model) if self.guard.enabled else None
            loss = self.parts.train_step(inputs, b, train.optim.lr)
            grad_norm = self.parts.grad_norm
            if params is not None:  # the step's KL within train.max_step_kl, or backtracked (rl.trust_region)
                valid = b["mask"] > 0
                before = self.guard.before(self.loss.logits, valid, params)  # the step's own forward
                self.loss.logits = None
                step_kl, step_scale = self.guard.enforce(model, inputs, valid, before)
        else:  # every advantage is 0: no optimizer step (see the module docstring), the statistics still
            with torch.no_grad():
                loss, grad_norm = float(self.loss(model(inputs), b)), None
        self.version += 1
        stats = {k: float(v) for k, v in self.loss.stats.items()}
        stats["updated"], stats["step_kl"] = step_scale, step_kl
        compute_s = time.perf_counter() - t0
        self.loop.step_done(loss=float(loss))  # the watchdog's rhythm, PLAIT_FAULTS (metrics are the controller's)
        published = self._publish()
        if not self.ctx.is_main:
            return None
        return {"version": self.version, "published": published, "loss": loss, "compute_s": compute_s,
                "grad_norm": float(grad_norm) if grad_norm is not None else 0.0, **stats}

    def export(self) -> str | None:
        """The policy as a complete HF folder (a collective: every rank calls it) when ``[export]`` asks: by default
        when it came from a folder, whose tokenizer, chat template and generation config go with it. A LoRA
        policy is written with its adapters merged into the base weights: an ordinary model of its family."""
        from plait.models.hf.export import export_hf_folder

        export = self.cfg.export
        if not export.wanted(from_folder=bool(self.policy.cfg.path)):
            return None
        folder = export.folder(self.ctx.run_dir)
        with contextlib.ExitStack() as views:
            if self.policy.synced is not None:  # LoRA: the adapters merged into the base weights, then restored
                for module in self.parts.modules:
                    views.enter_context(merged_view(module))
            export_hf_folder(self.parts.modules, folder, self.policy.config, spec=self.policy.base_spec,
                             source=self.policy.cfg.path or None,
                             dtype=getattr(torch, export.dtype) if export.dtype else None)
        return str(folder)

    def save(self, meta: dict) -> str:
        """A committed checkpoint of the current version (collective); ``meta``: the controller's position."""
        return self.loop.save({**meta, "version": self.version}) or str(self.loop.ckpt.latest())
