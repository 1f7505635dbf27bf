"""The RL job's configuration: the spec's ``[task]``, ``[generation]``, ``[rl]``, ``[train]``, ``[model]`` and
``[plan]`` tables (``plait.rl.rl_job`` re-exports ``Config`` and ``validate``), and the driver-side check that
the pieces fit together before any actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.models.gpt import GPTConfig
from plait.parallel.data_parallel import ZERO_STAGES
from plait.parallel.plan import ParallelPlan
from plait.rl.generator import GenerationConfig
from plait.rl.tasks import make_tasks
from plait.rl.tokenizer import CharTokenizer
from plait.rl.trainer import TrainConfig


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
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_size=54, d_model=64, n_layers=2, n_heads=4,
                                                               max_seq_len=32))
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: ParallelPlan = field(default_factory=ParallelPlan)


def validate(cfg: Config, world_size: int) -> None:
    """On the driver: the pieces fit together (vocabulary, lengths, batch shapes, trainer ranks)."""
    gen, rl = cfg.generation, cfg.rl
    if cfg.model.vocab_size < CharTokenizer().vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{CharTokenizer().vocab_size}: raise it")
    if rl.batch_prompts % gen.prompts_per_call:
        raise ValueError(f"rl.batch_prompts={rl.batch_prompts} must be a multiple of generation.prompts_per_call="
                         f"{gen.prompts_per_call} (a step takes whole work items)")
    if rl.weight_sync == "broadcast" and gen.interrupt:
        raise ValueError("rl.weight_sync='broadcast' syncs idle generators only: set generation.interrupt=false, or "
                         "use rl.weight_sync='object_store' to interrupt generation with new weights")
    if cfg.plan.dp != world_size or cfg.plan.tp * cfg.plan.pp * cfg.plan.cp != 1 or cfg.plan.engine in ZERO_STAGES:
        raise ValueError(f"plan {cfg.plan.describe()}, engine {cfg.plan.engine}: the RL trainer is data-parallel only "
                         f"(DDP or FSDP2), with plan.dp = workers.num = {world_size}")
    if (rl.batch_prompts * gen.group_size) % world_size:
        raise ValueError(f"rl.batch_prompts * generation.group_size = {rl.batch_prompts * gen.group_size} rows must "
                         f"split evenly over workers.num={world_size} trainer ranks")
    longest = max(len(t.prompt) for t in make_tasks(cfg.task.name, 256, cfg.task.seed, **cfg.task.options)) + 1
    if longest + gen.max_new_tokens > cfg.model.max_seq_len:
        raise ValueError(f"prompts of up to {longest} tokens + generation.max_new_tokens={gen.max_new_tokens} exceed "
                         f"model.max_seq_len={cfg.model.max_seq_len}: raise it or lower max_new_tokens")
