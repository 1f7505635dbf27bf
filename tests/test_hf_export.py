"""A model you can use after training: an export is a complete Hugging Face folder, and a model folder that
cannot be loaded is refused on the driver before anything starts."""

import json
import stat

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from plait.models.hf.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def test_an_export_loads_with_its_tokenizer_and_generates_like_the_source(tiny, tmp_path):
    from plait.models import spec_for_config
    from plait.models.hf.export import export_hf_folder
    from plait.models.hf.family import read_config
    from plait.models.hf.weights import load_hf_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = read_config(tiny)
    spec = spec_for_config(cfg)
    model = spec.build(cfg)
    load_hf_folder(model, tiny, spec)
    export_hf_folder(model, tmp_path / "out", cfg, spec=spec, source=tiny)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert name in names, names
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}  # as save_pretrained writes
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    exported, source = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(tiny)
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(exported.generate(ids, **kwargs), source.generate(ids, **kwargs))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_a_model_folder_without_weights_is_refused_on_the_driver_with_exit_2(tiny, tmp_path, capsys):
    from plait.runtime.cli import main

    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny / "config.json").read_bytes())
    (folder / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
    code = main(["run", "examples/hf_llama_finetune.toml", f"model.path={folder}", "model.make_tiny=false",
                 f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.safetensors" in err and str(folder) in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_a_model_folder_without_a_tokenizer_for_the_text_is_refused_on_the_driver(tiny, tmp_path, capsys):
    from plait.runtime.cli import main

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    code = main(["run", "examples/hf_llama_finetune.toml", f"model.path={folder}", "model.make_tiny=false",
                 f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "no tokenizer.json" in err and "data.tokenizer" in err, err


def tp_fsdp_rank(ctx) -> list[str]:
    import warnings

    from plait.models import model_spec
    from plait.parallel.mesh import build_mesh
    from plait.parallel.parallelize import OptimConfig, parallelize
    from plait.parallel.plan import ParallelPlan
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    spec, plan = model_spec("llama"), ParallelPlan(dp=2, tp=2, engine="fsdp2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = parallelize(lambda: spec.build(cfg), plan, build_mesh(plan, "cpu"), ctx.device, OptimConfig(),
                            spec=spec)
        x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(ctx.rank))
        parts.train_step({"input_ids": x, "use_cache": False}, x, 1e-3)
    return [str(w.message) for w in caught]


@pytest.mark.slow
def test_tp_under_fsdp2_returns_logits_that_are_not_a_view(ray_cluster, tmp_path):
    """FSDP2 warned that the wrapped model "returned a view tensor" (the gathered logits, DTensor.to_local()): the
    output projection now hands back a tensor of its own, so the root's pre-backward hook cannot be dropped."""
    from plait.runtime import run_ranks

    for caught in run_ranks(tp_fsdp_rank, 4, run_dir=tmp_path):
        assert not [w for w in caught if "returned a view tensor" in w], caught
