"""The language-model job for any registered family: ``job = "plait.lm.lm_job"`` in a spec.

Pretraining Plait's GPT from scratch on tokens made offline, or fine-tuning a local Hugging Face folder (any
family plait.models knows: Llama, Mistral, Qwen2/3, Phi-3, Gemma-3 ...) on your own Parquet / JSONL text; the
configuration is lm/lm_config.py. Every rank builds the model (on the meta device when it loads weights or
draws a random init shard by shard), applies the spec's ParallelPlan through the family's spec on one named
DeviceMesh, reads its slice of each step's batch, and drives the one training loop (runtime/trainer.py: resume,
cadence, checkpoints, metrics, watchdog, stop requests). Each step's global batch is a pure function of (seed,
step), so a checkpoint resumes under another dp degree without repeating or skipping a sequence.

``train.mode`` picks the backward: "full" (the plan's train step), "seco" (exact chunk-wise back-propagation over
``train.chunk_len``-token chunks, lm/chunkwise.py: long sequences in the memory of one chunk's activations plus
the K/V cache) or "spaco" (SeCO through ``train.spaco_t`` of the chunks on average, unbiased; ``spaco_cap`` > 0
caps its per-hop factor). Chunk-wise modes run on data parallelism only (DDP or FSDP2). ``[train.lora]`` with
rank > 0 wraps the model in peft LoRA adapters: only the adapters train.

At the end the trained model is written as a complete HF folder (weights, config, tokenizer and generation
files of the source folder), ``<run_dir>/outputs/hf_export`` by default, that ``from_pretrained`` loads
(``export.hf``: "auto" when the model came from a folder). The loss on a fixed batch (the first step's) is
measured before the first and after the last step: ``eval_loss_start`` / ``eval_loss_end`` in the summary.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from plait.lm.chunkwise import seco_step, spaco_step
from plait.lm.lm_config import Config, check_batch, check_experts, model_config
from plait.models.moe import ExpertLoad
from plait.models.spec import ModelSpec, model_params
from plait.parallel.data_parallel import call_model, to_device
from plait.parallel.estimate import estimate_report
from plait.parallel.loss import tp_loss
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import Parallelized, clip_grad_norm, lr_at, parallelize
from plait.runtime.checkpoint import EngineState, ModelOptimizer
from plait.runtime.context import RankContext
from plait.runtime.trainer import TrainLoop

__all__ = ["Config", "validate", "check_resume", "estimate", "prepare", "train", "summarize"]


def validate(cfg: Config, world_size: int) -> None:
    """On the driver, before anything starts: the world first, then the config, the plan against the model."""
    cfg.plan.check()
    if cfg.plan.world_size != world_size:  # the rank count first: a batch or size message would mislead
        cfg.plan.validate(world_size, world_name="workers.num")
    cfg.check()
    check_batch(cfg)
    spec, model_cfg = model_config(cfg.model)
    cfg.plan.validate(world_size, spec.shape(model_cfg), cfg.train.global_batch // cfg.plan.dp,
                      world_name="workers.num", model_dtype=cfg.train.dtype, seq_len=cfg.train.seq_len)
    check_experts(cfg, spec.shape(model_cfg).n_experts)
    limit = getattr(model_cfg, "max_seq_len", None) or getattr(model_cfg, "max_position_embeddings", None)
    if limit and cfg.train.seq_len > limit:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds the model's {limit} positions (model.max_seq_len "
                         "or max_position_embeddings): shorten the sequences or raise the limit")
    if cfg.model.path and cfg.model.init == "pretrained" and not cfg.model.make_tiny:
        check_model_folder(Path(cfg.model.path), needs_tokenizer=bool(cfg.data.files) and not cfg.data.tokenizer)


def check_resume(cfg: Config, meta: dict) -> None:
    """On the driver, before anything starts (runtime/job.py): the checkpoint to resume fits this run. Another
    train.steps changes the learning-rate schedule: refused unless train.reschedule=true, which says so in one line;
    another train.global_batch would read another sequence order: refused."""
    from plait.runtime.driver_log import say
    from plait.runtime.trainer import check_reschedule

    note = check_reschedule(meta.get("total_steps"), cfg.train.steps, cfg.train.reschedule)
    if note:
        say(note)
    saved = meta.get("data", {}).get("global_batch")
    if saved is not None and saved != cfg.train.global_batch:
        raise ValueError(f"the checkpoint was written with train.global_batch={saved}, this run asks for "
                         f"{cfg.train.global_batch}: the data order is a function of (seed, step, global batch), so "
                         f"resuming under another global batch would repeat or skip sequences. Keep "
                         f"train.global_batch={saved} (the dp degree may change), or start a new run")


def check_model_folder(folder: Path, needs_tokenizer: bool) -> None:
    """Weights (and, when the text is tokenised with it, a tokenizer) in the model folder, checked on the driver:
    a folder with config.json but no weights would otherwise fail on every rank after launch."""
    from plait.models.hf.weights import weight_files

    try:
        weight_files(folder)
    except FileNotFoundError as e:
        raise ValueError(f"model.path: {e}") from None
    if needs_tokenizer and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"model.path={folder} has no tokenizer.json to tokenise data.files with: set "
                         "data.tokenizer to a tokenizer.json (the tokenizers library's format; "
                         "AutoTokenizer.save_pretrained writes it)")


def estimate(cfg: Config, world_size: int) -> str:
    """`plait plan estimate`: per-rank memory of the model under the plan, from its config alone."""
    validate(cfg, world_size)
    spec, model_cfg = model_config(cfg.model)
    where = f" from {cfg.model.path}" if cfg.model.path else ""
    return estimate_report(model_params(spec, model_cfg), spec.shape(model_cfg), cfg.plan, world_size,
                           global_batch=cfg.train.global_batch, seq_len=cfg.train.seq_len, dtype=cfg.train.dtype,
                           title=f"{spec.name}{where}", optim_states=cfg.train.optim.states)


def prepare(cfg: Config, run_dir: Path) -> None:
    """On the driver: absolute paths for the ranks, the tiny model and sample text when asked, the token dataset
    built (or checked) once, before launch."""
    from plait.lm.data import ensure_token_dataset
    from plait.lm.text_data import ensure_text_dataset, recipe_digest
    from plait.runtime.storage_location import persistent_path

    data, model = cfg.data, cfg.model
    for key in ("data.path",) + (("model.path",) if model.path and model.make_tiny else ()):
        section, attr = key.split(".")
        where, note = persistent_path(getattr(getattr(cfg, section), attr), key)  # under a Ray job's temp copy
        if note:
            print(f"[plait] {note}", flush=True)
        setattr(getattr(cfg, section), attr, str(Path(where).resolve()))
    if model.path:
        model.path = str(Path(model.path).resolve())
    data.files = [str(Path(f).resolve()) for f in data.files]
    if data.tokenizer:
        data.tokenizer = str(Path(data.tokenizer).resolve())
    if model.make_tiny and model.path and not Path(model.path).exists():
        from plait.models.hf.tiny import make_tiny_llama

        print(f"[plait] model.path={model.path} does not exist: making a tiny random Llama there", flush=True)
        make_tiny_llama(model.path)
    if data.make_sample and data.files and not Path(data.files[0]).exists():
        from plait.models.hf.tiny import write_sample_text

        print(f"[plait] data.files[0]={data.files[0]} does not exist: writing standard-library text there", flush=True)
        write_sample_text(data.files[0])
    spec, model_cfg = model_config(model)
    vocab = spec.shape(model_cfg).vocab_size
    if not data.files:
        ensure_token_dataset(token_config(cfg), Path(data.path), cfg.train.seq_len, vocab)
        return
    text = text_config(cfg)
    check_tokenizer_fits(text, vocab)
    data.built = recipe_digest(ensure_text_dataset(text, Path(data.path)).meta)


def token_config(cfg: Config):
    from plait.lm.data import DataConfig

    d = cfg.data
    return DataConfig(path=d.path, source=d.source, num_tokens=d.num_tokens, seed=d.seed, rebuild=d.rebuild)


def text_config(cfg: Config):
    from plait.lm.text_data import TextDataConfig

    return TextDataConfig(files=list(cfg.data.files), text_column=cfg.data.text_column,
                          prompt_column=cfg.data.prompt_column,
                          tokenizer=cfg.data.tokenizer or cfg.model.path, seq_len=cfg.train.seq_len,
                          doc_mask=cfg.data.doc_mask, rebuild=cfg.data.rebuild)


def check_tokenizer_fits(text, vocab: int) -> None:
    from plait.lm.text_data import tokenizer_file
    from tokenizers import Tokenizer

    file = tokenizer_file(text)
    if (size := Tokenizer.from_file(str(file)).get_vocab_size()) > vocab:
        raise ValueError(f"the tokenizer {file} has {size} tokens, more than the model's vocab_size={vocab}: use the "
                         "model's own tokenizer (data.tokenizer)")


def build_model(cfg: Config, spec: ModelSpec, model_cfg, dtype: torch.dtype) -> torch.nn.Module:
    """The family's model in ``dtype``, wrapped in peft LoRA adapters when train.lora.rank > 0."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = spec.build(model_cfg)
    finally:
        torch.set_default_dtype(previous)
    if cfg.train.lora.rank:
        from plait.models.lora import add_lora

        model = add_lora(model, cfg.train.lora, spec)
    return model


def open_batches(cfg: Config, dtype: torch.dtype):
    """This job's StepBatches (made-offline tokens) or TextBatches (packed text), as the driver built them."""
    from plait.lm.data import StepBatches, open_token_dataset
    from plait.lm.text_data import TextBatches, ensure_text_dataset, open_text_dataset

    t = cfg.train
    if not cfg.data.files:
        vocab = model_config(cfg.model)[0].shape(model_config(cfg.model)[1]).vocab_size
        return StepBatches(open_token_dataset(token_config(cfg), t.seq_len, vocab), t.global_batch, t.seed)
    shards = (open_text_dataset(cfg.data.path, cfg.data.built, t.seq_len) if cfg.data.built
              else ensure_text_dataset(text_config(cfg), Path(cfg.data.path)))
    mask_dtype = torch.bool if cfg.model.attn_implementation != "eager" else dtype  # eager adds a float mask
    return TextBatches(shards, t.global_batch, t.seed, doc_mask=cfg.data.doc_mask, mask_dtype=mask_dtype)


def model_inputs(inputs, cfg: Config):
    """What the model is called with: token ids for Plait's GPT and for pipeline stages; else the batch's
    tensors and no KV cache."""
    if not isinstance(inputs, dict):
        return inputs
    if not cfg.model.path or cfg.plan.pp > 1:
        return inputs["input_ids"]
    return {**inputs, "use_cache": False}


def train(ctx: RankContext, cfg: Config) -> dict:
    plan, t = cfg.plan, cfg.train
    spec, model_cfg = model_config(cfg.model)
    torch.manual_seed(t.seed)
    dtype = getattr(torch, t.dtype)
    mesh = build_mesh(plan, ctx.device_type)
    pretrained = bool(cfg.model.path) and cfg.model.init == "pretrained"
    parts = parallelize(lambda: build_model(cfg, spec, model_cfg, dtype), plan, mesh, ctx.device, t.optim,
                        global_batch=t.global_batch, spec=spec, weights=cfg.model.path if pretrained else None,
                        init_seed=t.seed if t.meta_init and not pretrained else None)
    state = EngineState(parts.engine, trusted_root=ctx.run_dir) if parts.engine is not None else \
        ModelOptimizer(parts.modules, parts.optimizers)
    batches = open_batches(cfg, dtype)
    loop = TrainLoop(ctx, t, total=t.steps, state=state, meta=lambda done: {"data": batches.data_state(done),
                                                                           "plan": plan.describe()})
    if "data" in loop.resumed:
        batches.check_resume(loop.resumed["data"])
    step_fn = full_step(parts, cfg) if t.mode == "full" else chunkwise_step(parts, cfg, ctx.device, spec)
    dp_rank = mesh.get_local_rank("dp")
    probe = batches.batch(0, dp_rank, plan.dp)
    eval_start = eval_loss(parts, *probe, cfg, ctx.device)
    tokens_per_step = t.global_batch * t.seq_len
    meter = ExpertLoad.attach(parts.modules[0], spec) if spec.routers and len(parts.modules) == 1 else None
    expert_counts = None
    for step in loop:
        inputs, targets = batches.batch(step, dp_rank, plan.dp)
        lr = lr_at(step, t.steps, t.optim)
        loss = step_fn(inputs, targets, lr, step)
        dt = loop.elapsed()
        moe = meter.take(mesh["dp"].get_group() if plan.dp > 1 else None) if meter is not None else {}
        expert_counts = moe.pop("counts", expert_counts)
        loop.step_done(loss=loss, lr=lr, step_time_s=dt, tokens_per_s=tokens_per_step / dt, **moe)
    result = loop.finish()
    if meter is not None:
        meter.close()
    eval_end = eval_loss(parts, *probe, cfg, ctx.device)
    export = export_model(cfg, ctx, parts, spec, model_cfg) if not result.stopped else None
    return {"rank": ctx.rank, **result.as_dict(), "eval_loss_start": eval_start, "eval_loss_end": eval_end,
            "export": str(export) if export else None, "family": spec.name,
            **({"expert_counts_last_step": expert_counts} if expert_counts is not None else {})}


def full_step(parts: Parallelized, cfg: Config):
    def step_fn(inputs, targets, lr, _step):
        return parts.train_step(model_inputs(inputs, cfg), targets, lr)

    return step_fn


def chunkwise_step(parts: Parallelized, cfg: Config, device: torch.device, spec: ModelSpec):
    """(inputs, targets, lr, step) -> the global mean loss, with SeCO or SpaCO instead of one backward."""
    train, model, mesh = cfg.train, parts.modules[0], parts.mesh

    def step_fn(inputs, targets, lr: float, step: int) -> float:
        for opt in parts.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        inputs = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        inputs, targets = inputs.to(device), targets.to(device)
        if train.mode == "seco":
            loss = seco_step(model, inputs, targets, train.chunk_len, spec=spec)
        else:  # a fresh, reproducible draw per step (resumes draw the same chunks), the same on every dp rank:
            # each backward chunk is a forward and backward with FSDP2's all-gathers / reduce-scatters, so ranks that
            # drew different numbers of chunks would issue different collectives and hang
            gen = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
            loss = spaco_step(model, inputs, targets, train.chunk_len, train.spaco_t, cap=train.spaco_cap,
                              generator=gen, spec=spec)
        if train.optim.grad_clip > 0:
            parts.grad_norm = clip_grad_norm(parts.modules, train.optim.grad_clip, mesh)
        for opt in parts.optimizers:
            opt.step()
        loss = loss.detach().double().reshape(()).clone()
        if mesh["dp"].size() > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=mesh["dp"].get_group())
        return float(loss)

    return step_fn


@torch.no_grad()
def eval_loss(parts: Parallelized, inputs, targets, cfg: Config, device) -> float | None:
    """The mean loss over dp of a forward on a fixed batch (None under pp and cp: stages and ring pieces run by
    schedule; None under ZeRO, whose engine owns the forward)."""
    if cfg.plan.pp > 1 or cfg.plan.cp > 1 or parts.engine is not None:
        return None
    model = parts.modules[0]
    model.eval()
    try:
        out = call_model(model, to_device(model_inputs(inputs, cfg), device))
        # the cross-entropy alone: detach() makes a new tensor object, without the MoE auxiliary term an output
        # carries (parallel/loss.py), so held-out losses of MoE and dense models compare
        out = getattr(out, "logits", out).detach()
        loss = tp_loss(out, to_device(targets, device), cfg.plan.loss_parallel).detach().double().reshape(()).clone()
    finally:
        model.train()
    dp = parts.mesh["dp"]
    if dp.size() > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp.get_group())
    return float(loss)


def export_model(cfg: Config, ctx: RankContext, parts: Parallelized, spec: ModelSpec, model_cfg) -> Path | None:
    """The trained model as a complete HF folder (a collective: every rank calls it), when ``export.hf`` asks."""
    from plait.models.hf.export import export_hf_folder

    if not cfg.export.wanted(from_folder=bool(cfg.model.path)):
        return None
    if cfg.train.lora.rank:
        ctx.log("export skipped: a LoRA run's adapters are in its checkpoints (merge them with peft, then export)")
        return None
    folder = cfg.export.folder(ctx.run_dir)
    modules = [parts.engine.module] if parts.engine is not None else parts.modules
    source = cfg.data.tokenizer if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_dir() else cfg.model.path
    export_hf_folder(modules, folder, model_cfg, spec=spec, source=source or None,
                     dtype=getattr(torch, cfg.export.dtype) if cfg.export.dtype else None)
    return folder


def summarize(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    main = results[0]  # start_step, first/last loss and the plot: the runtime's (runtime/run_summary.py)
    return {"plan": cfg.plan.describe(), "family": main["family"], "model": cfg.model.path or "gpt",
            "steps": cfg.train.steps, "eval_loss_start": main["eval_loss_start"],
            "eval_loss_end": main["eval_loss_end"], "export": main["export"], "checkpoint": main["checkpoint"],
            "losses": main["losses"], "metrics": str(run_dir / "metrics.jsonl"),
            **({"expert_counts_last_step": main["expert_counts_last_step"]}  # per layer, per expert (all dp ranks)
               if "expert_counts_last_step" in main else {})}
