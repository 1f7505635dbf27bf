"""Fine-tune a local Hugging Face causal LM on your own text: ``job = "plait.lm.hf_job"`` in a spec.

    [model]  path = "/models/llama-1b"        a local HF folder (config.json + safetensors); no download
    [data]   files = ["corpus.parquet"]       Parquet or JSONL files with a text column, tokenised with
                                              model.path/tokenizer.json (or data.tokenizer), packed into
                                              train.seq_len sequences (parallel/text_data.py), built once
    [train]  steps, global_batch, seq_len, optim (lr ...), checkpoint_every, resume
    [plan]   dp, tp, pp, engine, ...           any plan whose architecture has a tp plan (hf_plans)

Every rank builds the model on the meta device, applies the plan, allocates only its own shards and
reads its slices of the folder (``parallelize(..., weights=model.path)``): no rank holds the whole
model. Each step's global batch is a pure function of (seed, step), so a checkpoint (model, optimizer,
step) resumes under another dp degree without repeating or skipping a sequence. At the end the trained
model is written as a HF folder, ``<run_dir>/outputs/hf_export`` (``export.path`` to choose), that
``from_pretrained`` loads. Loss on a fixed batch (the first step's) is measured before the first and
after the last step: ``eval_loss_start`` / ``eval_loss_end`` in the summary.

``model.make_tiny = true`` makes a small random Llama and its tokenizer at ``model.path`` when the path
does not exist, and ``data.make_sample = true`` writes standard-library text to ``data.files[0]`` when it
is missing (hf_tiny.py): the example runs with nothing downloaded. Under pp > 1 the stages see token ids
only: set ``data.doc_mask = false`` (attention then crosses packed documents).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, lr_at, parallelize
from plait.parallel.plan import ParallelPlan
from plait.parallel.tensor_parallel import tp_loss
from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
from plait.runtime.config import ConfigError
from plait.runtime.context import RankContext
from plait.runtime.metrics import MetricsLogger

DTYPES = ("float32", "bfloat16", "float64")


@dataclass
class ModelSection:
    path: str = "models/tiny-llama"  # a local HF folder; relative paths resolve where `plait run` starts
    make_tiny: bool = False  # make a small random Llama + tokenizer at path when it does not exist
    dtype: str = "float32"  # parameter dtype: float32 (with plan.mixed_precision for bf16 compute) | float64
    attn_implementation: str = "sdpa"  # sdpa | eager (| flash_attention_2 on a GPU with it installed)


@dataclass
class DataSection:
    files: list[str] = field(default_factory=list)  # Parquet / JSONL files with a text column
    text_column: str = "text"
    tokenizer: str = ""  # a tokenizer.json (or a folder holding one); "" = the one in model.path
    path: str = "data/hf_text"  # where the packed dataset is built (once; reused while the recipe holds)
    doc_mask: bool = True  # attention stays inside each packed document
    rebuild: bool = False
    make_sample: bool = False  # write standard-library text to files[0] when it is missing
    built: str = ""  # set by prepare: the recipe digest of the dataset it checked; ranks open exactly that one


@dataclass
class TrainConfig:
    steps: int = 20
    global_batch: int = 8  # sequences per optimizer step over all data-parallel ranks
    seq_len: int = 128
    seed: int = 0
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = ""  # "" fresh, "latest", or a committed checkpoint folder
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2,
                                                                   weight_decay=0.0))


@dataclass
class ExportSection:
    path: str = ""  # "" = <run_dir>/outputs/hf_export
    dtype: str = ""  # "" = the model's dtype


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    export: ExportSection = field(default_factory=ExportSection)

    def check(self) -> None:
        for key, value in (("model.dtype", self.model.dtype), ("export.dtype", self.export.dtype or "float32")):
            if value not in DTYPES:
                raise ValueError(f"{key}={value!r}: choose one of {', '.join(DTYPES)}")
        if not self.data.files:
            raise ValueError("data.files is empty: list Parquet or JSONL files with a text column, e.g. "
                             "files = [\"data/corpus.parquet\"]")
        if self.train.steps < 1 or self.train.global_batch < 1 or self.train.seq_len < 2:
            raise ValueError("train.steps and train.global_batch must be >= 1 and train.seq_len >= 2")
        if self.train.global_batch % self.plan.dp:
            raise ValueError(f"train.global_batch={self.train.global_batch} must divide evenly over plan.dp="
                             f"{self.plan.dp} data-parallel ranks")
        if self.plan.pp > 1 and self.data.doc_mask:
            raise ValueError(f"plan.pp={self.plan.pp}: pipeline stages take token ids only, not a document mask; "
                             "set data.doc_mask=false or pp=1")


def hf_config(model: ModelSection):
    """The model's HF config: read from ``model.path``, or the tiny Llama's when make_tiny will make it."""
    from transformers import AutoConfig

    path = Path(model.path)
    if (path / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    elif model.make_tiny and not path.exists():
        from plait.models.hf.tiny import tiny_llama_config

        cfg = tiny_llama_config()
    else:
        raise ConfigError(f"model.path={model.path} has no config.json: point it at a local Hugging Face model "
                          "folder (save_pretrained, or huggingface-cli download on a machine with network), "
                          "or set model.make_tiny=true with a path that does not exist yet")
    cfg._attn_implementation = model.attn_implementation
    return cfg


def text_config(cfg: Config):
    from plait.lm.text_data import TextDataConfig

    return TextDataConfig(files=list(cfg.data.files), text_column=cfg.data.text_column,
                          tokenizer=cfg.data.tokenizer or cfg.model.path,
                          seq_len=cfg.train.seq_len, doc_mask=cfg.data.doc_mask, rebuild=cfg.data.rebuild)


def validate(cfg: Config, world_size: int) -> None:
    """On the driver: the config, and the plan against the world and the model's config."""
    cfg.check()
    cfg.plan.validate(world_size, hf_config(cfg.model), cfg.train.global_batch // cfg.plan.dp,
                      world_name="workers.num", model_dtype=cfg.model.dtype)


def estimate(cfg: Config, world_size: int) -> str:
    """`plait plan estimate`: per-rank memory of the HF model under the plan, from its config.json alone
    (nothing is loaded), as the Llama-shaped decoder of the same sizes (estimate.py's model: RMSNorm,
    SwiGLU, GQA). Biases (Qwen2) and q/k norms (Qwen3) are a few vectors per layer and not counted; kv heads
    replicated when tp exceeds them are counted once per copy only in the activations."""
    from plait.parallel.estimate import estimate_memory, format_table, human
    from plait.models.gpt import GPTConfig

    validate(cfg, world_size)
    hf = hf_config(cfg.model)
    heads = hf.num_attention_heads
    shape = GPTConfig(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
                      n_heads=heads, n_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
                      ffn_hidden=hf.intermediate_size, max_seq_len=max(cfg.train.seq_len, 1))
    kv, tp = shape.kv_heads, cfg.plan.tp
    if tp > kv:  # the estimator shards kv heads over tp; with replication each rank holds one whole head
        shape.n_kv_heads = tp if heads % tp == 0 else kv
    rows = estimate_memory(shape, cfg.plan, global_batch=cfg.train.global_batch, seq_len=cfg.train.seq_len,
                           dtype=cfg.model.dtype)
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
    header = (f"plan {cfg.plan.describe()}, {world_size} ranks, {arch} from {cfg.model.path} "
              f"({shape.num_params():,} params as a Llama-shaped decoder), {cfg.model.dtype} "
              f"({cfg.plan.mixed_precision}), global batch {cfg.train.global_batch} x seq {cfg.train.seq_len}\n")
    peak = max(rows, key=lambda r: r.total)
    return header + format_table(rows) + f"\npeak: rank {peak.rank}, {human(peak.total)}"


def prepare(cfg: Config, run_dir: Path) -> None:
    """On the driver: absolute paths, the tiny model / sample text when asked, the token dataset built once."""
    from plait.lm.text_data import ensure_text_dataset, recipe_digest

    cfg.model.path = str(Path(cfg.model.path).resolve())
    cfg.data.files = [str(Path(f).resolve()) for f in cfg.data.files]
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())
    if cfg.model.make_tiny and not Path(cfg.model.path).exists():
        from plait.models.hf.tiny import make_tiny_llama

        print(f"[plait] model.path={cfg.model.path} does not exist: making a tiny random Llama there", flush=True)
        make_tiny_llama(cfg.model.path)
    if cfg.data.make_sample and not Path(cfg.data.files[0]).exists():
        from plait.models.hf.tiny import write_sample_text

        print(f"[plait] data.files[0]={cfg.data.files[0]} does not exist: writing standard-library text there",
              flush=True)
        write_sample_text(cfg.data.files[0])
    from plait.lm.text_data import tokenizer_file
    from tokenizers import Tokenizer

    text = text_config(cfg)
    vocab, file = hf_config(cfg.model).vocab_size, tokenizer_file(text)
    if (size := Tokenizer.from_file(str(file)).get_vocab_size()) > vocab:
        raise ValueError(f"the tokenizer {file} has {size} tokens, more than the model's vocab_size={vocab}: use the "
                         "model's own tokenizer (data.tokenizer)")
    cfg.data.built = recipe_digest(ensure_text_dataset(text, Path(cfg.data.path)).meta)


def build_model(hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)


def model_inputs(inputs: dict, plan: ParallelPlan):
    """What the model is called with: the batch's tensors and no KV cache; token ids only under pp."""
    if plan.pp > 1:
        return inputs["input_ids"]
    return {**inputs, "use_cache": False}


@torch.no_grad()
def eval_loss(parts, inputs, targets, plan: ParallelPlan, device) -> float | None:
    """The mean loss over dp of a forward on a fixed batch (None under pp: the stages run by schedule)."""
    from plait.parallel.data_parallel import call_model, to_device

    if plan.pp > 1:
        return None
    model = parts.modules[0]
    model.eval()
    try:
        out = call_model(model, to_device(model_inputs(inputs, plan), device))
        loss = tp_loss(out, to_device(targets, device), plan.loss_parallel).detach().double().reshape(()).clone()
    finally:
        model.train()
    dp = parts.mesh["dp"]
    if dp.size() > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp.get_group())
    return float(loss)


def train(ctx: RankContext, cfg: Config) -> dict:
    from plait.models.hf.export import export_hf_folder
    from plait.lm.text_data import TextBatches, ensure_text_dataset, open_text_dataset

    plan, hf_cfg = cfg.plan, hf_config(cfg.model)
    plan.validate(ctx.world_size, hf_cfg, cfg.train.global_batch // plan.dp)
    torch.manual_seed(cfg.train.seed)
    dtype = getattr(torch, cfg.model.dtype)
    mesh = build_mesh(plan, ctx.device_type)
    parts = parallelize(lambda: build_model(hf_cfg, dtype), plan, mesh, ctx.device, cfg.train.optim,
                        global_batch=cfg.train.global_batch, weights=cfg.model.path)
    ckpt = Checkpointer(ctx.run_dir / "checkpoints", keep_last=cfg.train.keep_last, run_id=ctx.run_id)
    state = ModelOptimizer(parts.modules, parts.optimizers) if parts.engine is None else _engine_state(parts, ctx)
    mask_dtype = torch.bool if cfg.model.attn_implementation != "eager" else dtype  # eager adds a float mask
    shards = (open_text_dataset(cfg.data.path, cfg.data.built, cfg.train.seq_len) if cfg.data.built
              else ensure_text_dataset(text_config(cfg), Path(cfg.data.path)))
    batches = TextBatches(shards, cfg.train.global_batch,
                          cfg.train.seed, doc_mask=cfg.data.doc_mask, mask_dtype=mask_dtype)
    start = 0
    if ctx.resume_from is not None:
        meta = ckpt.load(ctx.resume_from, state)
        start = batches.check_resume(meta["data"]) if "data" in meta else meta["step"]
        ctx.log(f"resumed from {ctx.resume_from} (step {start})")
    dp_rank = mesh.get_local_rank("dp")
    probe = batches.batch(0, dp_rank, plan.dp)
    eval_start = eval_loss(parts, *probe, plan, ctx.device)
    metrics = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, total_steps=cfg.train.steps, start_step=start,
                            device=ctx.device)
    losses, tokens_per_step = [], cfg.train.global_batch * cfg.train.seq_len
    ctx.step_done(start)  # the watchdog's rhythm starts here (runtime/watchdog.py)
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        inputs, targets = batches.batch(step, dp_rank, plan.dp)
        lr = lr_at(step, cfg.train.steps, cfg.train.optim)
        loss = parts.train_step(model_inputs(inputs, plan), targets, lr)
        dt = time.perf_counter() - t0
        losses.append(loss)
        metrics.log(step + 1, loss=loss, lr=lr, step_time_s=dt, tokens_per_s=tokens_per_step / dt)
        every = cfg.train.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.train.steps:
            ckpt.save(step + 1, state, meta={"data": batches.data_state(step + 1), "plan": plan.describe()})
        ctx.step_done(step + 1)
    metrics.close()
    eval_end = eval_loss(parts, *probe, plan, ctx.device)
    folder = Path(cfg.export.path) if cfg.export.path else ctx.run_dir / "outputs" / "hf_export"
    modules = [parts.engine.module] if parts.engine is not None else parts.modules
    export_hf_folder(modules, folder, hf_cfg, dtype=getattr(torch, cfg.export.dtype) if cfg.export.dtype else None)
    return {"rank": ctx.rank, "start_step": start, "losses": losses, "checkpoint": str(ckpt.latest()),
            "eval_loss_start": eval_start, "eval_loss_end": eval_end, "export": str(folder)}


def _engine_state(parts, ctx: RankContext):
    from plait.runtime.checkpoint import EngineState

    return EngineState(parts.engine, trusted_root=ctx.run_dir)


def summarize(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    from plait.runtime.plot import plot_run

    main, losses = results[0], results[0]["losses"]
    out = {"plan": cfg.plan.describe(), "model": cfg.model.path, "steps": cfg.train.steps,
           "start_step": main["start_step"], "first_loss": round(losses[0], 4) if losses else None,
           "last_loss": round(losses[-1], 4) if losses else None, "eval_loss_start": main["eval_loss_start"],
           "eval_loss_end": main["eval_loss_end"], "export": main["export"], "checkpoint": main["checkpoint"],
           "metrics": str(run_dir / "metrics.jsonl")}
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:  # none: no step ran
        out["plot"] = str(plot_run(run_dir))
    return out
