"""The language-model job's configuration: which model (any registered family), which text, how to train.

    [model]   Plait's GPT from its sizes (vocab_size, d_model, n_layers ...: models/gpt.py), or
              path = "/models/llama-1b"    a local HF folder: config.json picks the family (llama, mistral, qwen2,
                                           qwen3, phi3, gemma3_text ...), its weights are loaded (init = "random":
                                           the same architecture from scratch), its tokenizer reads the text
    [data]    files = ["corpus.parquet"]   your Parquet / JSONL text, tokenised and packed (lm/text_data.py), or
              no files: byte-level tokens made offline (source = "python-stdlib" | "synthetic", lm/data.py)
    [train]   steps, global_batch, seq_len, dtype, mode (full | seco | spaco), lora, optim, and the loop's own
              checkpoint_every, keep_last, resume, reschedule (runtime/trainer.py)
    [plan]    the ParallelPlan: dp, tp, pp, cp, engine ...
    [export]  hf = "auto" | "always" | "never": the trained model as a HF folder (auto: when fine-tuning a folder)

Everything here is checked on the driver before anything starts (``validate``): the plan against the model's
sizes, the mode against the plan, the data against the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.models.gpt import GPTConfig
from plait.models.hf.export import EXPORTS, ExportSection  # noqa: F401 (the [export] table; EXPORTS re-exported)
from plait.models.lora import LoraSettings  # noqa: F401 (the [train.lora] table, shared with the RL job)
from plait.models.registry import model_spec, spec_for_config
from plait.models.spec import ModelSpec
from plait.parallel.parallelize import OptimConfig, optim_states_refusal
from plait.parallel.plan import ParallelPlan, batch_violations
from plait.runtime.config import ConfigError
from plait.runtime.trainer import LoopConfig

MODES = ("full", "seco", "spaco")
DTYPES = ("float32", "float64", "bfloat16")
INITS = ("pretrained", "random")


@dataclass
class ModelSection:
    path: str = ""  # a local HF folder; "" = Plait's GPT with the sizes below
    init: str = "pretrained"  # with a path: its weights ("pretrained") or its architecture from scratch ("random")
    make_tiny: bool = False  # make a small random Llama + tokenizer at path when it does not exist (examples)
    attn_implementation: str = "sdpa"  # HF: sdpa | eager (| flash_attention_2 on a GPU with it installed)
    vocab_size: int = 256  # Plait's GPT (no path): models/gpt.py's GPTConfig
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0
    ffn_hidden: int = 0
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_experts: int = 0  # > 0: a mixture of experts in every block (models/moe.py; GPTConfig's MoE fields)
    experts_top_k: int = 2
    n_shared_experts: int = 0
    expert_hidden: int = 0
    router: str = "topk_softmax"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                         n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, ffn_hidden=self.ffn_hidden,
                         max_seq_len=self.max_seq_len, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
                         n_experts=self.n_experts, experts_top_k=self.experts_top_k,
                         n_shared_experts=self.n_shared_experts, expert_hidden=self.expert_hidden, router=self.router,
                         aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef)


@dataclass
class DataSection:
    path: str = "data/stdlib-bytes"  # where the token dataset is built (once; reused while its recipe holds)
    files: list[str] = field(default_factory=list)  # your Parquet / JSONL text (globs ok); [] = made-offline tokens
    text_column: str = "text"  # the text; with prompt_column, the completion
    prompt_column: str = ""  # set: prompt / completion pairs, loss on the completion only (lm/pair_rows.py)
    tokenizer: str = ""  # a tokenizer.json or a folder holding one; "" = the one in model.path
    doc_mask: bool = True  # packed text: attention and loss stay inside each document
    make_sample: bool = False  # write standard-library text to files[0] when it is missing (examples)
    source: str = "python-stdlib"  # no files: byte-level tokens of the Python standard library, or "synthetic"
    num_tokens: int = 2_000_000
    seed: int = 0
    rebuild: bool = False  # replace a Plait dataset of another recipe (or a corrupt one); never other files
    built: str = ""  # set by prepare: the recipe digest of the text dataset it checked; ranks open exactly that


@dataclass
class TrainConfig(LoopConfig):
    steps: int = 100
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    seq_len: int = 128
    seed: int = 0
    dtype: str = "float32"  # parameters: float32 (with plan.mixed_precision for bf16 compute) | float64 | bfloat16
    checkpoint_every: int = 50
    mode: str = "full"  # full | seco | spaco (chunk-wise back-propagation, lm/chunkwise.py)
    chunk_len: int = 0  # tokens per chunk under seco / spaco
    spaco_t: int = 0  # spaco: chunks that back-propagate per step, on average (1 .. seq_len / chunk_len)
    spaco_cap: float = 0.0  # spaco: cap on the k/t factor per hop between chunks; 0 = none (unbiased)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    meta_init: bool = False  # a random init on the meta device, each rank drawing only its shards

    def check(self) -> None:
        self.check_loop()
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.steps < 1 or self.global_batch < 1 or self.seq_len < 2:
            raise ValueError("train.steps and train.global_batch must be >= 1 and train.seq_len >= 2")
        if self.mode not in MODES:
            raise ValueError(f"train.mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode != "full" and not 1 <= self.chunk_len <= self.seq_len:
            raise ValueError(f"train.mode={self.mode!r} needs train.chunk_len in 1..train.seq_len={self.seq_len}, "
                             f"got {self.chunk_len}")
        chunks = math.ceil(self.seq_len / self.chunk_len) if self.chunk_len else 0
        if self.mode == "spaco" and not 1 <= self.spaco_t <= chunks:
            raise ValueError(f"train.spaco_t={self.spaco_t}: choose 1..{chunks}, the number of {self.chunk_len}-token "
                             f"chunks in train.seq_len={self.seq_len} ({chunks} is SeCO)")
        if self.spaco_cap and self.spaco_cap < 1:
            raise ValueError(f"train.spaco_cap={self.spaco_cap}: 0 (no cap, unbiased) or >= 1")
        if self.lora.rank < 0:
            raise ValueError(f"train.lora.rank={self.lora.rank}: 0 (off) or a positive adapter rank")
        if self.meta_init and self.lora.rank:
            raise ValueError("train.meta_init with train.lora.rank > 0: LoRA adapters have their own init (B = 0); "
                             "use train.meta_init=false for LoRA runs")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    export: ExportSection = field(default_factory=ExportSection)

    def check(self) -> None:
        self.train.check()
        if self.model.init not in INITS:
            raise ValueError(f"model.init={self.model.init!r}: choose one of {', '.join(INITS)}")
        self.export.check()
        if self.data.files and self.data.doc_mask and (self.plan.pp > 1 or self.plan.cp > 1 or not self.model.path):
            why = ("pipeline stages take token ids only" if self.plan.pp > 1 else "ring attention is causal over the "
                   "whole sequence" if self.plan.cp > 1 else "Plait's GPT takes no attention mask")
            raise ValueError(f"data.doc_mask=true: {why}, not a document mask; set data.doc_mask=false (attention "
                             "then crosses packed documents)")
        if self.train.lora.rank and self.model.path and self.model.init == "pretrained":
            raise ValueError("train.lora with model.path: LoRA adapters over a Hugging Face folder's weights are not "
                             "supported by the LM job yet (its loader reads the base model's names); fine-tune every "
                             "parameter (train.lora.rank=0), or use LoRA with Plait's GPT")
        if self.data.files and not (self.data.tokenizer or self.model.path):
            raise ValueError("data.files needs a tokenizer: data.tokenizer (a tokenizer.json) or model.path (a folder "
                             "holding one)")
        check_chunkwise(self.train.mode, self.plan)
        if self.train.optim.states != "fp32" and self.plan.engine not in ("ddp", "fsdp2"):
            raise ValueError(optim_states_refusal(self.plan.engine, self.train.optim.states))


def check_experts(cfg: Config, n_experts: int) -> None:
    """What a mixture-of-experts model (``n_experts`` per MoE layer, from the family's shape) cannot train with."""
    if not n_experts:
        return
    if cfg.train.mode != "full":
        raise ValueError(f"train.mode={cfg.train.mode!r} with a mixture-of-experts model ({n_experts} experts per "
                         "layer): chunk-wise training computes the cross-entropy chunk by chunk and would drop the "
                         "experts' balance and z-loss (a statistic of the whole batch's routing); use "
                         "train.mode='full'")
    if cfg.export.hf == "always" and not cfg.model.path:
        raise ValueError(f"export.hf='always' with model.n_experts={n_experts}: Plait's GPT-MoE has no Hugging Face "
                         "layout (a GPT exports as a Llama, which has no experts); use export.hf='never' (DCP "
                         "checkpoints keep the trained model)")


def check_batch(cfg: Config) -> None:
    """After the world check (validate): the global batch splits over the dp ranks."""
    for msg in batch_violations(cfg.plan, cfg.train.global_batch):
        raise ValueError(msg)


def check_chunkwise(mode: str, plan: ParallelPlan) -> None:
    """Chunk-wise modes run on DDP or FSDP2 data parallelism; refuse what they do not drive."""
    if mode == "full":
        return
    for name, degree in {"plan.tp": plan.tp, "plan.pp": plan.pp, "plan.cp": plan.cp}.items():
        if degree > 1:
            raise ValueError(f"train.mode={mode!r} with {name}={degree}: chunk-wise training recomputes whole "
                             f"chunks on one rank's model; it runs with data parallelism only (DDP or FSDP2). "
                             f"Set {name}=1, or train.mode='full'")
    if plan.engine not in ("ddp", "fsdp2"):
        raise ValueError(f"train.mode={mode!r} with plan.engine={plan.engine!r}: DeepSpeed owns the backward pass; "
                         "use engine='ddp' or 'fsdp2'")
    if plan.activation_checkpointing != "off":
        raise ValueError(f"train.mode={mode!r} with plan.activation_checkpointing="
                         f"{plan.activation_checkpointing!r}: a chunk's activations are already bounded by "
                         "train.chunk_len; set activation_checkpointing='off' (or a smaller chunk_len)")


def model_config(model: ModelSection) -> tuple[ModelSpec, Any]:
    """(the family's spec, its model config): Plait's GPT from the [model] sizes, or a HF folder's config.json
    (the tiny Llama's when ``make_tiny`` will make it)."""
    if not model.path:
        return model_spec("gpt"), model.gpt()
    path = Path(model.path)
    if (path / "config.json").is_file():
        from plait.models.hf.family import read_config

        cfg = read_config(path, model.attn_implementation)
    elif model.make_tiny and not path.exists():
        from plait.models.hf.tiny import tiny_llama_config

        cfg = tiny_llama_config()
        cfg._attn_implementation = model.attn_implementation
    else:
        raise ConfigError(f"model.path={model.path} has no config.json: point it at a local Hugging Face model "
                          "folder (save_pretrained, or huggingface-cli download on a machine with network), "
                          "or set model.make_tiny=true with a path that does not exist yet")
    try:
        return spec_for_config(cfg), cfg
    except ValueError as e:
        raise ConfigError(f"model.path={model.path}: {e}") from None
