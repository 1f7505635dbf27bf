"""plan.float8 trains the blocks' linears through torchao's float8 (emulated on CPU, as here): the right
linears are converted, the loss follows the float32 run's, FSDP2 (float8 all-gather) and TP (torchao's float8
styles) on two gloo ranks follow the one-process float8 run, and what cannot run is refused with the fix.

The reference runs in this process with the optimizer ``parallelize`` builds (AdamW, clipping at 1.0) on one
fixed batch; the ranks split that batch over dp, so the global mean loss is the same quantity.
"""

import math

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig
from plait.parallel.float8 import convert_model, float8_linears
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, parallelize
from plait.parallel.plan import ParallelPlan, PlanError
from plait.runtime import run_ranks

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)  # ffn hidden 96
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0)
BATCH, SEQ, STEPS = 4, 16, 8
# Measured (8 steps, this model and batch, torchao 0.18 emulated): float8 vs float32 differ by at most 0.014
# (tensorwise) and 0.010 (rowwise) on losses falling 4.18 -> 2.29; bf16 autocast vs float32: 0.006. 0.05 is
# ~4x the measured gap and far below the 1.9 the loss falls.
CLOSE_TO_FP32 = 0.05
# Two ranks against the one-process float8 run. TP computes the same scales (amax over the whole DTensor):
# measured 2e-5 (tensorwise), 1e-4 (rowwise + SP). Rowwise scales each token's row, so pipeline microbatches
# and cp's sequence pieces change nothing: pp2 and cp2 measured 0.0000. Where tensorwise sees a split batch
# (dp ranks), each rank's activations get their own scale, a different rounding that Adam at lr 1e-2 carries
# on: measured 0.040 for dp2 (DDP and FSDP2 alike, so not the float8 all-gather), about 3x float8's own gap
# to float32. The float32 runs of fsdp2 dp2 and tp2 match the one-process run to 1e-6: the gap is float8's.
CLOSE_SAME_SCALES, CLOSE_SPLIT_BATCH = 1e-3, 0.08  # split: dp > 1, or pp / cp with tensorwise


def _tokens() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))


def one_process_losses(recipe: str = "off", autocast: bool = False) -> list[float]:
    """STEPS steps of the whole batch in this process, the optimizer as parallelize makes it."""
    torch.manual_seed(0)
    model = GPT(CFG)
    convert_model(model, recipe, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2),
                            weight_decay=OPTIM.weight_decay, foreach=True)
    tokens, losses = _tokens(), []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


def _gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_only_the_blocks_linears_become_float8():
    model = GPT(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert convert_model(model, "tensorwise", "cpu") == 14  # 2 blocks x (wq wk wv wo w1 w2 w3)
    converted = float8_linears(model)
    assert sorted(converted) == sorted(f"layers.{i}.{n}" for i in range(2) for n in
                                       ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    assert type(model.output) is torch.nn.Linear and type(model.tok_embeddings) is torch.nn.Embedding
    assert all(model.get_submodule(f).config.emulate for f in converted)  # CPU: torchao's emulation mode
    after = model.state_dict()  # checkpoints and weight loading see the same names, dtypes and values
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_loss_stays_close_to_float32(recipe):
    fp32, bf16, f8 = one_process_losses(), one_process_losses(autocast=True), one_process_losses(recipe)
    print(f"{recipe}: float8 vs fp32 max gap {_gap(f8, fp32):.4f}, bf16 vs fp32 {_gap(bf16, fp32):.4f}, "
          f"loss {f8[0]:.3f} -> {f8[-1]:.3f}")
    assert all(math.isfinite(v) for v in f8) and f8[-1] < f8[0] - 1.0, f8
    assert _gap(f8, fp32) < CLOSE_TO_FP32, (f8, fp32)


def test_refusals_name_the_fix():
    with pytest.raises(PlanError, match=r"float8='fp4' is not one of: off, tensorwise, rowwise"):
        ParallelPlan(float8="fp4").check()
    with pytest.raises(PlanError, match=r"engine='zero2'.*use engine=\"fsdp2\""):
        ParallelPlan(dp=2, engine="zero2", float8="tensorwise").check()
    with pytest.raises(PlanError, match=r"the model is float64: build it in float32.*plan.float8=\"off\""):
        ParallelPlan(float8="rowwise").validate(1, CFG, model_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the model is float64"):
        convert_model(GPT(CFG).double(), "tensorwise", "cpu")
    with pytest.raises(ValueError, match=r"no Linear inside its blocks"):
        convert_model(torch.nn.Sequential(torch.nn.Linear(32, 32)), "tensorwise", "cpu")
    with pytest.raises(ValueError, match=r"not on 'meta'"):
        convert_model(GPT(CFG), "tensorwise", "meta")
    ParallelPlan(dp=2, engine="fsdp2", float8="tensorwise").validate(2, CFG, 2, model_dtype=torch.float32)
    from plait.lm.lm_config import Config
    from plait.runtime.config import build

    assert build(Config, {"plan": {"float8": "rowwise"}}).plan.float8 == "rowwise"  # a spec's [plan] table
    with pytest.raises(ValueError, match=r"plan.float8='fp8' is not one of"):
        build(Config, {"plan": {"float8": "fp8"}})


TWO_RANKS = {
    "fsdp2_dp2_tensorwise": dict(dp=2, engine="fsdp2", float8="tensorwise"),
    "tp2_tensorwise": dict(tp=2, float8="tensorwise"),
    "tp2_rowwise_sp": dict(tp=2, float8="rowwise", sequence_parallel=True),
    "pp2_rowwise": dict(pp=2, schedule="1F1B", microbatches=2, float8="rowwise"),
    "cp2_rowwise": dict(cp=2, float8="rowwise"),
}


def train_ranks(ctx, plans: dict) -> dict:
    tokens, out = _tokens(), {}
    for name, kwargs in plans.items():
        plan = ParallelPlan(**kwargs)
        plan.validate(ctx.world_size, CFG, BATCH // plan.dp, model_dtype=torch.float32)
        torch.manual_seed(0)
        mesh = build_mesh(plan, "cpu")
        parts = parallelize(lambda: GPT(CFG), plan, mesh, ctx.device, OPTIM, global_batch=BATCH,
                            spec=model_spec("gpt"))
        rows = BATCH // plan.dp
        mine = tokens[mesh.get_local_rank("dp") * rows:(mesh.get_local_rank("dp") + 1) * rows]
        losses = [parts.train_step(mine[:, :-1], mine[:, 1:], OPTIM.lr) for _ in range(STEPS)]
        modules = [m for part in parts.modules for m in part.modules()]
        styles = sorted({type(m).__name__ for m in modules} & {"Float8Linear", "Linear"})
        gathers = [m.config.enable_fsdp_float8_all_gather for m in modules if type(m).__name__ == "Float8Linear"]
        out[name] = {"losses": losses, "modules": styles, "float8_all_gather": sorted(set(gathers))}
    return out


@pytest.mark.slow
def test_float8_under_fsdp2_and_tp_follows_the_one_process_run(ray_cluster, tmp_path):
    reference = {r: one_process_losses(r) for r in ("tensorwise", "rowwise")}
    for records in run_ranks(train_ranks, 2, TWO_RANKS, run_dir=tmp_path):
        for name, r in records.items():
            recipe = TWO_RANKS[name]["float8"]
            print(f"{name}: gap to one process {_gap(r['losses'], reference[recipe]):.5f}")
            assert "Float8Linear" in r["modules"], (name, r)  # (a first pipeline stage has no head Linear)
            plan = TWO_RANKS[name]
            pieces = plan.get("pp", 1) > 1 or plan.get("cp", 1) > 1  # microbatches / sequence pieces
            split = plan.get("dp", 1) > 1 or (pieces and recipe == "tensorwise")
            bound = CLOSE_SPLIT_BATCH if split else CLOSE_SAME_SCALES
            assert _gap(r["losses"], reference[recipe]) < bound, (name, r, reference[recipe])
            assert r["losses"][-1] < r["losses"][0] - 1.0, (name, r)
        assert records["fsdp2_dp2_tensorwise"]["float8_all_gather"] == [True]
        assert records["tp2_tensorwise"]["float8_all_gather"] == [False]


def test_plan_estimate_says_float8_keeps_the_stored_bytes():
    from plait.lm.lm_config import Config, ModelSection, TrainConfig
    from plait.lm.lm_job import estimate

    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    plain = estimate(Config(model=ModelSection(**shape), train=TrainConfig(global_batch=4, seq_len=SEQ),
                            plan=ParallelPlan(dp=2, engine="fsdp2")), 2)
    f8 = estimate(Config(model=ModelSection(**shape), train=TrainConfig(global_batch=4, seq_len=SEQ),
                         plan=ParallelPlan(dp=2, engine="fsdp2", float8="tensorwise")), 2)
    assert "float8(tensorwise)" in f8 and "float8 changes no stored tensor" in f8
    table = [line for line in plain.splitlines() if line[:1].isdigit()]
    assert table == [line for line in f8.splitlines() if line[:1].isdigit()]
    with pytest.raises(PlanError, match="engine='zero1'"):
        estimate(Config(model=ModelSection(**shape), train=TrainConfig(global_batch=4, seq_len=SEQ),
                        plan=ParallelPlan(dp=2, engine="zero1", float8="rowwise")), 2)


def test_gpu_check_dry_run_has_a_float8_row():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "float8 (tensorwise) (torchao's CPU emulation" in out
    result = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].removeprefix("RESULT ").split())
    assert list(result)[:10] == ["mfu", "tokens_per_s", "peak_mem_gib", "estimate_gib", "mem_vs_estimate",
                                 "h2d_pinned_gbps", "h2d_pageable_gbps", "pinned_vs_pageable", "flash", "device"]
    assert result["float8"] == "tensorwise" and float(result["float8_tokens_per_s"]) > 0


def test_a_gpu_without_float8_is_refused_by_name(monkeypatch):
    """No GPU here: the capability query is stood in for (the only thing not real in this file)."""
    from plait.parallel.float8 import device_refusal

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "NVIDIA A100-SXM4-80GB")
    msg = device_refusal("tensorwise", "cuda:0")
    assert "NVIDIA A100-SXM4-80GB is 8.0" in msg and "compute capability >= 8.9" in msg
    assert 'plan.float8="off"' in msg
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (9, 0))
    assert device_refusal("rowwise", "cuda:0") is None and device_refusal("off", "cuda:0") is None
