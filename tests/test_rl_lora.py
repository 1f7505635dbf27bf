"""A LoRA policy in the RL job (``[train.lora]``): the trainer trains peft adapters over a Hugging Face folder's frozen
weights, the generators build the same adapted model from the same folder, and every weight sync (object store and
broadcast) carries the adapters only; the export is the merged model, an ordinary HF folder.

The jobs run on the session's Ray cluster with a tiny random Llama made offline, at eta = 0: every step trains on
rollouts of the version it starts from, so the behaviour log-probs the generators report must be the trainer's own
(behaviour_kl 0) at every version, which holds only if the adapters they received are the trainer's.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from plait.models.lora import LoraSettings, is_adapter
from plait.rl.policy import Policy, PolicyConfig
from plait.rl.weights import load_weights
from plait.runtime.config import ConfigError

RANK, ALPHA = 4, 8.0
HIDDEN, KV = 64, 32  # the tiny Llama's width and its k / v projections' (2 of 4 heads of 16)

SPEC = """
job = "plait.rl.rl_job"
run_dir = {run_dir}

[cluster]
num_cpus = 4

[workers]
num = {workers}
cpus_per_worker = 1

[plan]
dp = {workers}
engine = "fsdp2"

[model]
path = {model}
chat_template = false

[prompts]
files = [{train}]

[reward]
function = "lora_reward_mod:compute_score"

[generation]
group_size = 4
prompts_per_call = 2
max_new_tokens = 3

[rl]
generators = 1
eta = 0
batch_prompts = 2
weight_sync = "{sync}"

[train]
steps = 3
checkpoint_every = 0
max_step_kl = 0.0

[train.lora]
rank = {rank}
alpha = {alpha}

[train.optim]
lr = 2e-2
warmup_steps = 0
"""

# A character vocabulary of 14 tokens: a random policy ends some completions (eos) within 3 tokens and not others, and
# an unfinished one is trained on with -1 (generation.unfinished_reward), so advantages are nonzero and every step
# moves the adapters; finished ones score by their text, which varies too.
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info):
    return (sum(map(ord, solution_str)) % 7) / 6.0
'''


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from plait.models.hf.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", hidden=HIDDEN, layers=1, heads=4,
                           kv_heads=2, chars="0123456789+=")


@pytest.fixture(scope="module")
def restore_imports():
    """load_spec puts the spec's folder on sys.path and the reward module in sys.modules: undone afterwards."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [n for n in sys.modules if "_reward_" in n]:
        del sys.modules[name]


def write_spec(folder: Path, model: Path, sync: str = "object_store", workers: int = 1, rank: int = RANK,
               alpha: float = ALPHA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"{a}+{b}=", "ground_truth": str(a + b)} for a, b in [(1, 2), (2, 5), (4, 4), (3, 6)]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "lora_reward_mod.py").write_text(REWARD)
    spec = folder / "spec.toml"
    spec.write_text(SPEC.format(run_dir=json.dumps(str(folder / "run")), model=json.dumps(str(model)), sync=sync,
                                train=json.dumps(str(folder / "train.jsonl")), workers=workers, rank=rank,
                                alpha=alpha))
    return spec


def run(spec: Path, *overrides: str) -> dict:
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    return run_job(load_spec(spec, list(overrides)))


def folder_weights(model: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model / "model.safetensors"))


def adapter_bytes(model: Path) -> int:
    """The float32 adapters of the default targets (q, k, v, o projections), from the folder's config alone."""
    policy = Policy(PolicyConfig(path=str(model)), lora=LoraSettings(rank=RANK, alpha=ALPHA))
    with torch.device("meta"):
        built = policy.build()
    return sum(p.numel() * p.element_size() for n, p in built.named_parameters() if is_adapter(n))


def checkpoint_model(path: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a committed DCP checkpoint, read on this process alone."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "ckpt.pt"
    dcp_to_torch_save(path, out)
    state = torch.load(out, weights_only=False)
    return state["app"]["model"]


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


def check_synced_adapters_only(summary: dict, run_dir: Path, model: Path) -> list[dict]:
    """What every sync of the run carried: the adapters' bytes, a small part of the model; and the generators held
    the trainer's weights at every version (behaviour_kl 0, importance weights 1)."""
    adapters = adapter_bytes(model)
    full = sum(t.numel() * t.element_size() for t in folder_weights(model).values())
    assert summary["weight_sync_bytes"] == adapters and adapters < 0.1 * full, (summary["weight_sync_bytes"], full)
    assert summary["model_bytes"] >= full  # the trainer's whole model: base + adapters
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and {r["weight_sync_bytes"] for r in rows} == {adapters}
    assert all(abs(r["behaviour_kl"]) < 1e-5 and abs(r["is_weight"] - 1) < 1e-5 for r in rows), rows
    assert sum(r["updated"] for r in rows) >= 2, rows  # steps were taken: later versions' adapters differ
    return rows


def check_base_frozen_adapters_trained(ckpt: str, model: Path, tmp: Path) -> dict[str, torch.Tensor]:
    state = checkpoint_model(ckpt, tmp)
    base = folder_weights(model)
    frozen = {n.replace(".base_layer", ""): t for n, t in state.items() if not is_adapter(n)}
    assert set(frozen) == set(base)
    assert all(torch.equal(frozen[n], base[n]) for n in base), [n for n in base if not torch.equal(frozen[n], base[n])]
    lora_b = [t for n, t in state.items() if ".lora_B." in n]
    assert len(lora_b) == 4 and all(t.abs().max() > 0 for t in lora_b)  # B starts at 0: every adapter trained
    return state


@pytest.fixture(scope="module")
def fsdp2_run(ray_cluster, tmp_path_factory, tiny_llama, restore_imports):
    """A LoRA run on two FSDP2 trainer ranks, weights through the object store."""
    folder = tmp_path_factory.mktemp("fsdp2")
    spec = write_spec(folder, tiny_llama, sync="object_store", workers=2)
    return spec, run(spec)


@pytest.mark.slow
def test_a_lora_policy_under_fsdp2_publishes_only_its_adapters_and_keeps_the_base(fsdp2_run, tiny_llama, tmp_path):
    spec, summary = fsdp2_run
    assert summary["version"] == 3 and summary["weight_sync"] == "object_store"
    check_synced_adapters_only(summary, spec.parent / "run", tiny_llama)
    check_base_frozen_adapters_trained(summary["checkpoint"], tiny_llama, tmp_path)


@pytest.mark.slow
def test_a_lora_checkpoint_of_two_fsdp2_ranks_resumes_on_one(fsdp2_run, tiny_llama, tmp_path):
    spec, first = fsdp2_run
    resumed = run(spec, "train.resume=latest", "train.steps=4", "workers.num=1", "plan.dp=1", "export.hf=never")
    assert resumed["start_version"] == 3 and resumed["version"] == 4 and resumed["steps_run"] == 1
    assert min(at for _, _, at in resumed["trained"]) == 3  # training carried on from the saved version
    assert resumed["weight_sync_bytes"] == first["weight_sync_bytes"]
    rows = metrics(spec.parent / "run")
    assert rows[-1]["step"] == 4 and abs(rows[-1]["behaviour_kl"]) < 1e-5  # the generator got the resumed adapters
    before = checkpoint_model(first["checkpoint"], tmp_path / "a")
    after = check_base_frozen_adapters_trained(resumed["checkpoint"], tiny_llama, tmp_path / "b")
    assert set(after) == set(before)
    moved = [n for n in before if is_adapter(n) and not torch.equal(before[n], after[n])]
    assert moved  # the resumed step trained the loaded adapters on


@pytest.fixture(scope="module")
def broadcast_run(ray_cluster, tmp_path_factory, tiny_llama, restore_imports):
    folder = tmp_path_factory.mktemp("broadcast")
    summary = run(write_spec(folder, tiny_llama, sync="broadcast"))
    return folder, summary


@pytest.mark.slow
def test_a_lora_policy_broadcasts_only_its_adapters(broadcast_run, tiny_llama, tmp_path):
    folder, summary = broadcast_run
    assert summary["weight_sync"] == "broadcast" and summary["version"] == 3
    assert summary["sync_rounds"] >= 3 and summary["sync_rounds_failed"] == 0  # versions 0..2 reached the generator
    check_synced_adapters_only(summary, folder / "run", tiny_llama)
    check_base_frozen_adapters_trained(summary["checkpoint"], tiny_llama, tmp_path)


@pytest.mark.slow
def test_the_export_of_a_lora_run_is_the_merged_model_transformers_loads(broadcast_run, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, summary = broadcast_run
    export = Path(summary["export"])
    assert export == folder / "run" / "outputs" / "hf_export"
    tuned = AutoModelForCausalLM.from_pretrained(export).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert AutoTokenizer.from_pretrained(export).eos_token_id is not None  # the folder's tokenizer came along
    # an ordinary model of the family: the base's tensor names, no adapters
    assert set(tuned.state_dict()) == set(base.state_dict())
    # its projections are W + (alpha / rank) * B @ A of the final checkpoint; everything else is the base's
    state = checkpoint_model(summary["checkpoint"], tmp_path)
    exported = folder_weights(export)
    for name, w in folder_weights(tiny_llama).items():
        stem = name.removesuffix(".weight")
        a, b = state.get(f"{stem}.lora_A.default.weight"), state.get(f"{stem}.lora_B.default.weight")
        if a is None:
            assert torch.equal(exported[name], w), name
        else:
            assert torch.allclose(exported[name], w + (ALPHA / RANK) * b @ a, atol=1e-6), name
            assert not torch.equal(exported[name], w), name
    ids = torch.tensor([[0, 3, 12, 4, 13, 5]])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits, atol=1e-4)


def test_bad_lora_settings_are_refused_on_the_driver_before_anything_starts(tmp_path, tiny_llama, restore_imports,
                                                                            capsys):
    from plait.runtime.cli import main

    with pytest.raises(ConfigError, match=r"train.lora.rank=-1: 0 \(off\) or a positive adapter rank"):
        run(write_spec(tmp_path / "rank", tiny_llama, rank=-1))
    spec = write_spec(tmp_path / "targets", tiny_llama)
    with pytest.raises(ValueError, match=r"train.lora.targets: 'qproj' matches no module of the llama model; its "
                                         r"Linear layers are named \[.*'q_proj'.*\]"):
        run(spec, 'train.lora.targets=["q_proj", "qproj"]')
    with pytest.raises(ValueError, match=r"train.lora.targets: 'embed_tokens' names Embedding modules"):
        run(spec, 'train.lora.targets=["embed_tokens"]')
    with pytest.raises(ValueError, match=r"train.lora.rank > 0 adapts a pretrained policy .* set model.path"):
        run(spec, 'model.path=""', "reward.function=exact_match")
    assert not (tmp_path / "targets" / "run").exists()  # refused before the run directory, the cluster or any actor
    assert main(["run", str(spec), 'train.lora.targets=["qproj"]']) == 2
    assert "matches no module of the llama model" in capsys.readouterr().err


def test_a_generator_model_takes_exactly_the_adapters_and_names_a_missing_one(tiny_llama):
    policy = Policy(PolicyConfig(path=str(tiny_llama)), lora=LoraSettings(rank=RANK, alpha=ALPHA))
    model = policy.build()
    with torch.no_grad():
        policy.spec.load_weights(model, policy.weights)
    adapters = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if is_adapter(n)}
    assert len(adapters) == 8 and policy.synced is is_adapter
    load_weights(model, adapters, synced=policy.synced)
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    base = folder_weights(tiny_llama)
    assert all(torch.equal(p, base[n.replace(".base_layer", "")]) for n, p in model.named_parameters()
               if not is_adapter(n))  # the base came from the folder, untouched by the sync
    gone = "model.layers.0.self_attn.v_proj.lora_B.default.weight"
    with pytest.raises(ValueError, match=rf"missing LoRA adapters \['{gone}'\]"):
        load_weights(model, {n: t for n, t in adapters.items() if n != gone}, synced=policy.synced)
    with pytest.raises(ValueError, match=r"unexpected \['model.norm.weight'\]"):
        load_weights(model, {**adapters, "model.norm.weight": base["model.norm.weight"]}, synced=policy.synced)
    assert sum(p.numel() for p in adapters.values()) == RANK * 4 * HIDDEN + RANK * (HIDDEN + KV + KV + HIDDEN)
