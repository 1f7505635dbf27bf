"""The RL job's configuration: the spec's ``[model]`` (the policy: rl/policy.py), ``[prompts]`` (your files, or the
built-in ``[task]``: rl/prompts.py), ``[reward]`` (rl/rewards.py), ``[generation]``, ``[rl]``, ``[train]`` and
``[plan]`` tables (``plait.rl.rl_job`` re-exports ``Config`` and ``validate``), and the driver-side check that the
pieces fit together before any actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.models.hf.export import ExportSection
from plait.models.lora import check_lora
from plait.parallel.plan import ParallelPlan
from plait.rl.generator import GenerationConfig, as_prompt
from plait.rl.policy import Policy, PolicyConfig
from plait.rl.prompts import PromptConfig, load_prompt_set
from plait.rl.rewards import RewardConfig, load_reward
from plait.rl.tasks import make_tasks
from plait.rl.trainer import TrainConfig, check_trainer_plan


@dataclass
class TaskConfig:
    name: str = "digit_sum"  # digit_sum | addition | reversal | countdown
    seed: int = 0
    options: dict = field(default_factory=dict)  # the task's difficulty options (rl.tasks)


WEIGHT_SYNC = ("object_store", "broadcast")


@dataclass
class RLConfig:
    generators: int = 2
    generator_cpus: float = 1.0
    eta: int = 2  # staleness bound in versions; 0 = synchronous
    batch_prompts: int = 8  # prompt groups per training step
    capacity: int = 0  # prompts outstanding at most; 0 = (eta + 1) * batch_prompts
    max_generator_restarts: int = 3  # replacements per generator slot
    wait_timeout_s: float = 600.0  # no generation or step finished for this long: stop and name what hangs
    weight_sync: str = "object_store"  # object_store | broadcast (plait.rl.weight_broadcast)
    weight_sync_host: str = "127.0.0.1"  # where trainer rank 0 hosts the broadcast group's store; "node": its IP
    weight_sync_timeout_s: float = 60.0  # a broadcast round not done by then fails; the group is rebuilt
    weight_sync_bucket_mb: float = 64.0  # broadcast in pieces of this size: a generator holds one besides its model
    trainer_queue: int = 2  # steps handed to the trainer at once: the next batch waits there while one trains
    log_completions_every: int = 10  # versions between sample completions logged (completions.jsonl, TensorBoard)
    log_completions: int = 4  # completions logged each time
    collapse_window: int = 20  # versions of one answer (answer entropy ~0) before the run warns of a collapse

    def check(self) -> None:
        if self.weight_sync not in WEIGHT_SYNC:
            raise ValueError(f"rl.weight_sync={self.weight_sync!r}: choose from {WEIGHT_SYNC}")
        if self.generators < 1 or self.generator_cpus <= 0 or self.eta < 0 or self.batch_prompts < 1 or \
                self.trainer_queue < 1:
            raise ValueError(f"rl.generators={self.generators} (>= 1), generator_cpus={self.generator_cpus} (> 0), "
                             f"eta={self.eta} (>= 0), batch_prompts={self.batch_prompts} (>= 1), trainer_queue="
                             f"{self.trainer_queue} (>= 1) out of range")


@dataclass
class Config:
    model: PolicyConfig = field(default_factory=PolicyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    export: ExportSection = field(default_factory=ExportSection)  # the final policy as a HF folder (outputs/hf_export)


def stream_sample(cfg: Config, n: int = 256) -> list:
    """The first ``n`` prompt records of the run: the built-in task's, or (files) every record checked."""
    if cfg.prompts.files:
        prompts = load_prompt_set(cfg.prompts)
        return prompts.train[:n] + prompts.held_out[:n]
    return [as_prompt(t) for t in make_tasks(cfg.task.name, n, cfg.task.seed, **cfg.task.options)]


def check_policy_lora(cfg: Config, policy: Policy) -> None:
    """``[train.lora]`` fits the policy and the plan: a folder's weights to adapt, data parallelism only, targets
    that are Linear modules of the family."""
    lora = cfg.train.lora
    lora.check()
    if not lora.rank:
        return
    if not cfg.model.path:
        raise ValueError("train.lora.rank > 0 adapts a pretrained policy whose base weights both the trainer and the "
                         "generators read from disk: set model.path to a local Hugging Face folder (e.g. an SFT "
                         "run's outputs/hf_export), or train.lora.rank=0 to train Plait's GPT fully")
    if cfg.plan.tp > 1:
        raise ValueError(f"train.lora with plan.tp={cfg.plan.tp}: LoRA adapters are not in the families' tensor-"
                         "parallel plans; use data parallelism (plan.dp with engine 'ddp' or 'fsdp2') and plan.tp=1")
    check_lora(lora, policy.spec, policy.config)


def validate(cfg: Config, world_size: int) -> None:
    """On the driver: the pieces fit together (policy, prompts, reward, lengths, batch shapes, trainer ranks)."""
    gen, rl = cfg.generation, cfg.rl
    if rl.batch_prompts % gen.prompts_per_call:
        raise ValueError(f"rl.batch_prompts={rl.batch_prompts} must be a multiple of generation.prompts_per_call="
                         f"{gen.prompts_per_call} (a step takes whole work items)")
    if rl.weight_sync == "broadcast" and gen.interrupt:
        raise ValueError("rl.weight_sync='broadcast' syncs idle generators only: set generation.interrupt=false, or "
                         "use rl.weight_sync='object_store' to interrupt generation with new weights")
    check_trainer_plan(cfg.plan, world_size)
    if (rl.batch_prompts * gen.group_size) % cfg.plan.dp:
        raise ValueError(f"rl.batch_prompts * generation.group_size = {rl.batch_prompts * gen.group_size} rows must "
                         f"split evenly over plan.dp={cfg.plan.dp} trainer ranks")
    if cfg.prompts.files and cfg.train.warm_start_steps:
        raise ValueError("train.warm_start_steps with prompts.files: the warm start writes the built-in tasks' "
                         "answers; fine-tune on your own answers with the LM job first (examples/rl_sft_addition.toml) "
                         "and point model.path at its export")
    if cfg.reward.function == "task" and cfg.prompts.files:
        raise ValueError("reward.function='task' checks the built-in tasks' answers: with prompts.files choose "
                         "'exact_match', 'math', 'format' or your own 'module:function'")
    load_reward(cfg.reward.function)  # importable here, where the spec's folder is on the path
    policy = Policy(cfg.model)
    check_policy_lora(cfg, policy)
    tok = policy.tokens()
    if tok.vocab_size > policy.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model's vocab_size is {policy.vocab_size}: "
                         "raise model.vocab_size, or use the model's own tokenizer")
    records = stream_sample(cfg)
    longest = max(len(tok.prompt_ids(r.prompt)) for r in records)
    if longest + gen.max_new_tokens > policy.max_positions:
        raise ValueError(f"prompts of up to {longest} tokens + generation.max_new_tokens={gen.max_new_tokens} exceed "
                         f"the model's {policy.max_positions} positions: raise model.max_seq_len or lower "
                         "max_new_tokens")
    if cfg.reward.function in ("task", "exact_match"):  # the answer itself must be what the completion says
        need = max(len(tok.answer_ids(r.ground_truth)) for r in records)
        if need > gen.max_new_tokens:
            raise ValueError(f"answers need up to {need} tokens with their stop token, more than "
                             f"generation.max_new_tokens={gen.max_new_tokens}: no completion could be right; raise "
                             f"it to at least {need}")
