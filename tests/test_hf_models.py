"""Hugging Face decoder families under Plait's plans, on real gloo ranks, against the unsharded model.

Tiny configs built offline (hidden 64, 2 layers, no downloads). float64 where the comparison is about
sharding (differences are reduction order, plus HF's float32 RMSNorm internals); float32 where the
test is a user's fine-tune round trip (save_pretrained -> Plait -> export -> from_pretrained).
"""

import pytest
import torch
from plait.models import model_spec, spec_for_config, spec_for_model
from plait.models.gpt import GPT, GPTConfig
from plait.models.hf.export import export_hf_folder
from plait.models.hf.weights import load_hf_folder, materialize, weight_files
from plait.parallel.kv_replication import sync_replicated_kv_grads
from plait.parallel.loss import tp_loss
from plait.parallel.names import clean_fqn
from plait.parallel.pipeline import build_pipeline
from plait.parallel.tensor_parallel import apply_tensor_parallel
from plait.runtime import run_ranks
from plait.storage.folders import ForeignFolderError
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

VOCAB, BATCH, SEQ = 128, 4, 16
GPT_CFG = GPTConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
GPT_SPEC, LLAMA = model_spec("gpt"), model_spec("llama")


def hf_config(family: str, kv_heads: int = 2, heads: int = 4, attn: str = "sdpa", tied: bool = False):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    return cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads,
               max_position_embeddings=64, attn_implementation=attn, tie_word_embeddings=tied)


def build(family: str, kv_heads: int = 2, heads: int = 4, attn: str = "sdpa", dtype=torch.float64, tied=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(family, kv_heads, heads, attn, tied)).to(dtype)
    if family == "qwen2":  # HF inits biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def tokens(seed: int = 5, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def forward_backward(model, loss_parallel: bool = False):
    inputs, targets = tokens()
    out = model(input_ids=inputs, use_cache=False)
    logits, loss = out.logits, tp_loss(out, targets, loss_parallel)  # tp_loss takes a HF output too
    loss.backward()
    return full(logits), loss.item()


# (family, kv heads, sequence_parallel, loss_parallel, attention); kv 1 < tp 2 replicates the kv head
TP_CASES = [("llama", 2, False, False, "sdpa"), ("mistral", 2, True, True, "sdpa"), ("qwen2", 2, True, False, "sdpa"),
            ("qwen3", 2, False, True, "eager"), ("llama", 1, True, False, "eager"), ("qwen2", 1, False, False, "sdpa"),
            ("qwen3", 1, True, False, "sdpa")]


def tp_rank(ctx) -> dict:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {}
    for family, kv, sp, lp, attn in TP_CASES:
        model = apply_tensor_parallel(build(family, kv, attn=attn), mesh, LLAMA, sequence_parallel=sp,
                                      loss_parallel=lp)
        logits, loss = forward_backward(model, lp)
        sync_replicated_kv_grads(model)
        attn0 = model.model.layers[0].self_attn
        out[family, kv, sp, lp, attn] = {
            "logits": logits, "loss": loss, "grads": {n: full(p.grad) for n, p in model.named_parameters()},
            "k_rows": attn0.k_proj.weight.to_local().shape[0], "groups": attn0.num_key_value_groups,
            "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        }
    return out


def pipeline_run(mesh, family: str, src) -> dict:
    """pp2 (GPipe, 2 microbatches); with ``src`` the model is built on the meta device and each stage
    allocates and loads only its own layers from the HF folder."""
    from transformers import AutoModelForCausalLM

    def on_meta():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float64)

    def load(stage):
        load_hf_folder(materialize(stage, "cpu", LLAMA), src, LLAMA)
        return stage

    pipe = build_pipeline(on_meta if src else lambda: build(family), mesh, LLAMA, schedule="GPipe", microbatches=2,
                          loss_fn=lambda out, tgt: tp_loss(out, tgt, False), device="cpu",
                          parallelize_stage=load if src else None, materialize=not src)
    inputs, targets = tokens()
    loss = pipe.step(inputs, targets)
    return pipe, {"loss": None if loss is None else loss.item(),
                  "grads": {n: p.grad.detach().clone() for n, p in pipe.named_parameters().items()},
                  "types": [type(m).__name__ for m in pipe.modules]}


def pipeline_rank(ctx, src, dst) -> dict:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    out = {}
    pipe, out["llama"] = pipeline_run(mesh, "llama", src)
    torch.optim.SGD(pipe.parameters(), lr=0.1).step()
    export_hf_folder(pipe.modules, dst, pipe.modules[0].config)  # each stage writes its own names; family found
    _, out["qwen3"] = pipeline_run(mesh, "qwen3", None)
    return out


@pytest.fixture(scope="module")
def tp_results(ray_cluster, tmp_path_factory):
    return run_ranks(tp_rank, 2, run_dir=tmp_path_factory.mktemp("hf_tp"))


def reference(family, kv, attn="sdpa"):
    model = build(family, kv, attn=attn)
    logits, loss = forward_backward(model)
    return logits, loss, {n: p.grad.detach() for n, p in model.named_parameters()}


def dereplicated(name: str, grad: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Every copy of a replicated kv head holds the head's summed gradient: check they agree, return one."""
    if grad.shape == ref.shape:
        return grad
    copies = grad.unflatten(0, (ref.shape[0] // 16, -1, 16))  # (kv heads, copies, head_dim, ...)
    assert torch.allclose(copies[:, 0:1].expand_as(copies), copies, rtol=0, atol=1e-12), name
    return copies[:, 0].flatten(0, 1)


@pytest.mark.parametrize("case", TP_CASES, ids=["-".join(map(str, c)) for c in TP_CASES])
def test_families_under_tp_match_unsharded(tp_results, case):
    family, kv, sp, lp, attn = case
    ref_logits, ref_loss, ref_grads = reference(family, kv, attn)
    for got in (r[case] for r in tp_results):
        assert got["all_dtensor"]
        assert torch.allclose(got["logits"], ref_logits, rtol=0, atol=1e-10), case
        assert abs(got["loss"] - ref_loss) < 2e-6, case  # the cross-entropy runs in float32
        assert got["k_rows"] == 16 * max(1, kv // 2)  # one head (16 rows) per rank, replicated when kv == 1
        assert got["groups"] == 2 // max(1, kv // 2)  # 2 local query heads per local kv head
        assert got["grads"].keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            grad = dereplicated(name, got["grads"][name], ref)
            # HF's RMSNorm computes in float32: gradients through it round to ~1e-8
            assert torch.allclose(grad, ref, rtol=1e-6, atol=1e-8), (case, name)


def test_hf_pipeline_pp2_matches_single_process(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    build("llama").save_pretrained(tmp_path / "src")
    results = run_ranks(pipeline_rank, 2, tmp_path / "src", tmp_path / "out", run_dir=tmp_path)
    for family in ("llama", "qwen3"):
        _, ref_loss, ref_grads = reference(family, 2)
        assert results[0][family]["loss"] is None and abs(results[1][family]["loss"] - ref_loss) < 1e-6
        assert [r[family]["types"] for r in results] == [["HFDecoderStage"], ["HFDecoderStage"]]
        first, last = results[0][family]["grads"], results[1][family]["grads"]
        assert "model.embed_tokens.weight" in first and "lm_head.weight" in last and "model.norm.weight" in last
        assert {n for n in first if ".layers." in n} == {n for n in ref_grads if ".layers.0." in n}
        assert not first.keys() & last.keys() and first.keys() | last.keys() == ref_grads.keys()
        for name, grad in {**first, **last}.items():
            assert torch.allclose(grad, ref_grads[name], rtol=1e-6, atol=1e-8), (family, name)
    # the two stages' export is one HF folder: the model after the same SGD step
    model = build("llama")
    forward_backward(model)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).state_dict()
    assert exported.keys() == model.state_dict().keys()
    for name, ref in model.state_dict().items():
        assert torch.allclose(exported[name], ref, rtol=0, atol=1e-8), name


class Mystery(nn.Module):
    pass


def test_unknown_family_is_refused_with_the_known_ones():
    import transformers

    with pytest.raises(ValueError) as err:
        spec_for_config(transformers.GPT2Config())
    msg = str(err.value)
    assert "model_type 'gpt2' (GPT2Config) has no Plait model spec" in msg and "plait/models" in msg
    assert all(t in msg for t in ("llama", "mistral", "qwen2", "qwen3"))
    with pytest.raises(ValueError, match="not a model of a registered family"):
        spec_for_model(Mystery())
    assert spec_for_model(build("qwen3", 2)) is LLAMA and spec_for_model(GPT(GPT_CFG)) is GPT_SPEC


def meta_tp_model(family: str, kv: int, mesh, dtype):
    """Built on the meta device, sharded, then each rank allocates only its shards."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(family, kv), dtype=dtype)
    apply_tensor_parallel(model, mesh, LLAMA)
    return model


def roundtrip_rank(ctx, src, dst) -> dict:
    """Qwen2 (biases, one kv head replicated over tp2): meta build, load, one step, export."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = materialize(meta_tp_model("qwen2", 1, mesh, torch.float64), "cpu", LLAMA)
    local_k = model.model.layers[0].self_attn.k_proj.bias.to_local().clone()
    load_hf_folder(model, src, LLAMA)
    probe, _ = tokens(seed=9)
    before = full(model(input_ids=probe).logits)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    forward_backward(model)
    sync_replicated_kv_grads(model)
    opt.step()
    after = full(model(input_ids=probe).logits)
    export_hf_folder(model, dst / "qwen2", model.config, max_shard_bytes=64 * 1024)
    out = {"before": before, "after": after, "local_k_bias": model.model.layers[0].self_attn.k_proj.bias.to_local(),
           "garbage_before_load": local_k}
    # Plait's own GPT (tp2) out as a HF Llama folder, and back into a differently initialised GPT
    torch.manual_seed(1)
    gpt = apply_tensor_parallel(GPT(GPT_CFG), mesh, GPT_SPEC)
    export_hf_folder(gpt, dst / "gpt", GPT_CFG)
    with torch.device("meta"):
        fresh = GPT(GPT_CFG)
    materialize(apply_tensor_parallel(fresh, mesh, GPT_SPEC), "cpu", GPT_SPEC)  # garbage shards, fresh RoPE tables
    out["gpt"] = gpt(probe).detach()
    load_hf_folder(fresh, dst / "gpt", GPT_SPEC)
    out["fresh_after"] = fresh(probe).detach()
    return out


def test_qwen2_tp2_load_and_export_round_trip(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    original = build("qwen2", 1)
    original.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert len(set(weight_files(tmp_path / "src").values())) > 1  # a sharded folder with an index
    results = run_ranks(roundtrip_rank, 2, tmp_path / "src", tmp_path / "out", run_dir=tmp_path)
    probe, _ = tokens(seed=9)
    expected = original(input_ids=probe).logits.detach()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "qwen2", dtype=torch.float64)
    got = reloaded(input_ids=probe).logits.detach()
    for r in results:
        assert torch.allclose(r["before"], expected, rtol=0, atol=1e-10)
        assert torch.allclose(r["after"], got, rtol=0, atol=1e-10)
        # both ranks' copies of the one kv head hold the original head's bias, trained identically
        assert torch.equal(r["local_k_bias"], results[0]["local_k_bias"])
    assert (got - expected).abs().max() > 1e-3  # the step changed the model
    files = sorted(p.name for p in (tmp_path / "out" / "qwen2").iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files, files
    assert not list((tmp_path / "out").glob(".*"))  # the temporary folders were renamed into place
    assert reloaded.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)  # one kv head again
    # one process (no torch.distributed): an earlier export is replaced, a folder Plait did not write never is
    export_hf_folder(reloaded, tmp_path / "out" / "qwen2", reloaded.config)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "qwen2", dtype=torch.float64)
    assert torch.equal(again(input_ids=probe).logits, got)
    with pytest.raises(ForeignFolderError, match="never replaced or deleted"):
        export_hf_folder(reloaded, tmp_path / "src", reloaded.config)
    assert len(set(weight_files(tmp_path / "src").values())) > 1  # untouched
    # a Plait GPT exported as HF Llama computes the same logits in transformers, and loads back
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "gpt")
    assert type(llama).__name__ == "LlamaForCausalLM"
    llama_logits = llama(input_ids=probe).logits.detach()
    for r in results:
        assert torch.allclose(r["gpt"], llama_logits, rtol=0, atol=1e-5)  # float32; HF norms round differently
        assert torch.allclose(r["fresh_after"], r["gpt"], rtol=0, atol=1e-6)


def fsdp_tp_rank(ctx, src, dst) -> dict:
    """tp2 x dp2 (FSDP2) fine-tune of a save_pretrained Llama: load, logits, 3 AdamW steps, export."""
    from plait.parallel.data_parallel import apply_fsdp2

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = meta_tp_model("llama", 2, mesh["tp"], torch.float32)
    apply_fsdp2(model, mesh["dp"])
    materialize(model, "cpu", LLAMA)
    mesh_dims = {p.device_mesh.mesh_dim_names for p in model.parameters()}
    load_hf_folder(model, src, LLAMA)
    probe, _ = tokens(seed=9)
    before = model(input_ids=probe).logits.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dp = mesh.get_local_rank("dp")
    for step in range(3):
        inputs, targets = tokens(seed=100 + step, batch=2 * BATCH)
        rows = slice(dp * BATCH, (dp + 1) * BATCH)
        opt.zero_grad()
        tp_loss(model(input_ids=inputs[rows]).logits, targets[rows], False).backward()
        opt.step()
    after = model(input_ids=probe).logits.detach().clone()
    export_hf_folder(model, dst, model.config)
    return {"before": before, "after": after, "mesh_dims": mesh_dims}


def four_rank_tp(ctx) -> dict:
    """tp4 over 2 kv heads (each head replicated twice); then pp2 x tp2 with sequence parallelism."""
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    model = apply_tensor_parallel(build("llama", 2), mesh, LLAMA, sequence_parallel=True)
    logits, loss = forward_backward(model)
    sync_replicated_kv_grads(model)
    out = {"logits": logits, "loss": loss, "grads": {n: full(p.grad) for n, p in model.named_parameters()}}
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pipe = build_pipeline(lambda: build("qwen3", 1), mesh["pp"], LLAMA, schedule="1F1B", microbatches=2,
                          loss_fn=lambda o, t: tp_loss(o, t, True), device="cpu",
                          parallelize_stage=lambda part: apply_tensor_parallel(part, mesh["tp"], LLAMA,
                                                                               sequence_parallel=True,
                                                                               loss_parallel=True))
    inputs, targets = tokens()
    pp_loss = pipe.step(inputs, targets)
    sync_replicated_kv_grads(pipe.modules)
    out["pp_tp"] = {"loss": None if pp_loss is None else pp_loss.item(),
                    "grads": {n: full(p.grad) for n, p in pipe.named_parameters().items()}}
    return out


@pytest.mark.slow
def test_llama_tp2_dp2_fsdp2_finetune_round_trip(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    original = build("llama", 2, dtype=torch.float32)
    original.save_pretrained(tmp_path / "src")
    results = run_ranks(fsdp_tp_rank, 4, tmp_path / "src", tmp_path / "out", run_dir=tmp_path)
    probe, _ = tokens(seed=9)
    expected = original(input_ids=probe).logits.detach()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.float32
    got = reloaded(input_ids=probe).logits.detach()
    for r in results:
        assert r["mesh_dims"] == {("dp", "tp")}  # every parameter a 2-D (dp, tp) DTensor
        assert torch.allclose(r["before"], expected, rtol=0, atol=1e-5)
        assert torch.allclose(r["after"], got, rtol=0, atol=1e-5)
    assert (got - expected).abs().max() > 1e-2  # training moved the model


@pytest.mark.slow
def test_gqa_tp4_and_pp2_tp2_sequence_parallel(ray_cluster, tmp_path):
    results = run_ranks(four_rank_tp, 4, run_dir=tmp_path)
    ref_logits, ref_loss, ref_grads = reference("llama", 2)
    for got in results:
        assert torch.allclose(got["logits"], ref_logits, rtol=0, atol=1e-10)
        assert abs(got["loss"] - ref_loss) < 1e-6
        for name, ref in ref_grads.items():
            assert torch.allclose(dereplicated(name, got["grads"][name], ref), ref, rtol=1e-6, atol=1e-8), name
    _, ref_loss, ref_grads = reference("qwen3", 1)  # one kv head over tp2: replicated; Qwen3's per-head norms
    assert [r["pp_tp"]["loss"] is None for r in results] == [True, True, False, False]  # ranks 2, 3: last stage
    assert abs(results[2]["pp_tp"]["loss"] - ref_loss) < 2e-6
    merged = {**results[0]["pp_tp"]["grads"], **results[2]["pp_tp"]["grads"]}
    assert merged.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert torch.allclose(dereplicated(name, merged[name], ref), ref, rtol=1e-6, atol=1e-8), name


def parallelize_rank(ctx, src, family, kv) -> dict:
    """parallelize(weights=folder) under tp2: meta build, tp, activation checkpointing, each rank loads its slices;
    two AdamW steps through train_step (replicated kv heads' gradients summed inside)."""
    from plait.parallel.parallelize import OptimConfig, parallelize
    from plait.parallel.plan import ParallelPlan
    from transformers import AutoModelForCausalLM

    plan = ParallelPlan(tp=2, activation_checkpointing="full")
    mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("dp", "pp", "tp"))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.0)
    parts = parallelize(lambda: AutoModelForCausalLM.from_config(hf_config(family, kv), dtype=torch.float64), plan,
                        mesh, torch.device("cpu"), optim, weights=src, spec=LLAMA)
    model = parts.modules[0]
    local = sum(p.to_local().numel() for p in model.parameters())
    losses = []
    for step in range(2):
        inputs, targets = tokens(seed=100 + step)
        losses.append(parts.train_step({"input_ids": inputs, "use_cache": False}, targets, optim.lr))
    wrapped = any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    return {"losses": losses, "local_numel": local, "wrapped": wrapped,
            "params": {clean_fqn(n): full(p) for n, p in model.named_parameters()}}


def test_parallelize_loads_hf_weights_per_shard_and_trains_like_one_process(ray_cluster, tmp_path):
    """Qwen2 with one kv head over tp2 (replicated): the same two AdamW steps as a plain single-process loop."""
    from transformers import AutoModelForCausalLM

    build("qwen2", 1).save_pretrained(tmp_path / "src")
    results = run_ranks(parallelize_rank, 2, tmp_path / "src", "qwen2", 1, run_dir=tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float64)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref_losses = []
    for step in range(2):
        inputs, targets = tokens(seed=100 + step)
        opt.zero_grad()
        loss = tp_loss(ref(input_ids=inputs, use_cache=False), targets, False)
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    total = sum(p.numel() for p in ref.parameters())
    for r in results:
        assert r["local_numel"] < total and r["wrapped"]  # no rank held the whole model; blocks checkpointed
        assert r["losses"] == pytest.approx(ref_losses, abs=1e-6)
        for name, p in ref.named_parameters():
            got = dereplicated(name, r["params"][name], p)
            assert torch.allclose(got, p.detach(), rtol=1e-6, atol=1e-8), name


def transformers_loss(model, batches, dp: int) -> float:
    """The job's eval loss computed with transformers alone: the first step's batch, mean over dp slices."""
    losses = []
    for rank in range(dp):
        inputs, targets = batches.batch(0, rank, dp)
        with torch.no_grad():
            losses.append(tp_loss(model(**inputs, use_cache=False), targets, False).item())
    return sum(losses) / dp


@pytest.mark.slow
def test_hf_llama_finetune_example_exports_a_folder_transformers_loads(ray_cluster, tmp_path):
    """examples/hf_llama_finetune.toml through the job path (tp2 x FSDP2 dp2): the export reloads with transformers
    and computes Plait's loss; before training Plait computed the original model's; a dp4 resume continues."""
    from plait.lm.text_batches import TextBatches
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec
    from plait.storage.row_shards import RowShards
    from transformers import AutoModelForCausalLM

    paths = [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}", f"data.path={tmp_path / 'tokens'}",
             f"data.files=['{tmp_path / 'text.parquet'}']", "train.checkpoint_every=0"]
    summary = run_job(load_spec("examples/hf_llama_finetune.toml", ["train.steps=3", *paths]))
    assert summary["plan"] == "dp2(fsdp2) tp2 pp1"
    assert summary["export"] == str(tmp_path / "run" / "outputs" / "hf_export")
    batches = TextBatches(RowShards(tmp_path / "tokens"), 8, 0)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "outputs" / "hf_export")
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.dtype == torch.float32
    assert summary["eval_loss_start"] == pytest.approx(transformers_loss(original, batches, 2), abs=1e-5)
    assert summary["eval_loss_end"] == pytest.approx(transformers_loss(exported, batches, 2), abs=1e-5)
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 1e-3  # training moved the model
    resumed = run_job(load_spec("examples/hf_llama_finetune.toml", [
        "train.steps=4", "train.resume=latest", "train.reschedule=true", "plan.dp=4", "plan.tp=1", *paths]))
    assert resumed["start_step"] == 3 and resumed["checkpoint"].endswith("step_00000004")
    # Export a saved checkpoint (made under dp4) without training: resume from it with as many steps as it holds,
    # under the example's tp2 x dp2 plan.
    only = [p for p in paths if not p.startswith("run_dir=")] + [f"run_dir={tmp_path / 'export_only'}"]
    export = run_job(load_spec("examples/hf_llama_finetune.toml", [
        "train.steps=4", f"train.resume={resumed['checkpoint']}", *only]))
    assert export["start_step"] == 4
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export_only" / "outputs" / "hf_export")
    assert export["eval_loss_end"] == pytest.approx(transformers_loss(again, batches, 2), abs=1e-5)
    assert export["eval_loss_end"] == pytest.approx(resumed["eval_loss_end"], abs=1e-5)


def test_plan_estimate_of_the_hf_example_counts_the_models_parameters(tmp_path, capsys):
    """`plait plan estimate` works for the HF job from config.json alone (the tiny config when make_tiny)."""
    from plait.models.hf.tiny import tiny_llama_config
    from plait.runtime.cli import main
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny_llama_config()).parameters())
    assert main(["plan", "estimate", "examples/hf_llama_finetune.toml", f"model.path={tmp_path / 'none'}"]) == 0
    out = capsys.readouterr().out
    assert f"llama from {tmp_path / 'none'} {total:,} params" in out and "plan dp2(fsdp2) tp2 pp1" in out
    assert "peak: rank" in out
