"""AdamW with 8-bit / bf16 moments (parallel/low_bit_optim.py): the code, the blocks, the bytes, and that the
state is the same sharded or not — DDP, FSDP2 and TP equal one process, and a checkpoint saved under one plan
resumes under another dp or tp degree with the same continuation.

Distributed runs use float64 models: ranks differ from the single process only by reduction order (~1e-16),
which can move a moment across a rounding boundary of the 8-bit code only by luck; 1e-9 on losses after a few
steps holds with room (a wrong block scale or a moment from another shard moves losses by 1e-4 or more).
"""

import math

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.models.registry import estimate_for
from plait.parallel.low_bit_optim import (
    MIN_8BIT_SIZE,
    Code,
    LowBitAdamW,
    RowPiece,
    dequantize,
    dynamic_code,
    quantize,
    state_bytes,
)
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, make_optimizer, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks
from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
from plait.runtime.cli import main
from plait.runtime.config import ConfigError
from plait.runtime.spec import load_spec

CFG = GPTConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=16)  # 64x64 blocks: 8-bit moments
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=0.5, states="8bit")
STEPS, BATCH, SEQ = 3, 8, 16
TOL = 1e-9


def test_dynamic_codes():
    signed, unsigned = dynamic_code(True), dynamic_code(False)
    for code in (signed, unsigned):
        assert code.numel() == 256 and torch.all(code[1:] >= code[:-1])
        assert 0.0 in code.tolist() and code.max() == 1.0
    assert signed.min() < -0.99 and unsigned.min() == 0.0
    assert signed.unique().numel() == 256 and unsigned.unique().numel() == 256
    tiny = unsigned[unsigned > 0].min()
    assert tiny < 1e-6  # the dynamic range: 7 decades below a block's absmax


def test_code_lookup_is_the_nearest_code():
    """Code.nearest (a table of float bit patterns + one comparison) equals bucketize's binary search over the
    midpoints, on values spanning every decade of the code, the midpoints themselves and their float neighbours."""
    g = torch.Generator().manual_seed(0)
    for signed in (True, False):
        code = Code.make(signed)
        mids = (code.values[1:] + code.values[:-1]) / 2
        x = torch.randn(200_000, generator=g) * 10.0 ** -torch.randint(0, 9, (200_000,), generator=g)
        x = torch.cat([x.clamp(-1, 1), mids, torch.nextafter(mids, torch.tensor(2.0)),
                       torch.nextafter(mids, torch.tensor(-2.0)), code.values, torch.tensor([0.0, -0.0, 1.0, -1.0])])
        if not signed:
            x = x.abs()
        assert torch.equal(code.nearest(x), torch.bucketize(x, mids).to(torch.uint8)), signed


def test_quantize_round_trip_and_blocks():
    torch.manual_seed(0)
    code = Code.make(True)
    x = torch.randn(8, 5000) * torch.logspace(-3, 0, 5000)  # a row with 3 decades of magnitude
    q, scales = quantize(x, code)
    assert q.dtype == torch.uint8 and q.shape == x.shape and scales.shape == (8, 3)  # 2048 + 2048 + 904
    assert torch.equal(scales[:, 0], x[:, :2048].abs().amax(1))
    y = dequantize(q, scales, code)
    big = x.abs() > 0.01 * scales.repeat_interleave(2048, dim=1)[:, :5000]
    rel = ((y - x).abs() / x.abs())[big]
    # nearest of 256 codes: a decade [0.01, 0.1) of absmax holds 32 linear steps, so <= 14% there, ~1% typical
    assert rel.max() < 0.15 and rel.median() < 0.02, (rel.max(), rel.median())
    # a piece of each row (a tensor-parallel shard) with the whole block's scales gives the same codes
    piece = RowPiece(offset=1000, cols=3000, total=5000, blen=2048)
    assert piece.span == (0, 2, 1000, 96) and piece.blocks == 3
    assert torch.equal(dequantize(q[:, 1000:4000], scales, code, piece), y[:, 1000:4000])


def _train(states: str, steps: int = 20) -> tuple[float, torch.optim.Optimizer, torch.nn.Module]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_seq_len=32))
    opt = make_optimizer(model.parameters(), OptimConfig(lr=3e-3, weight_decay=0.1, states=states))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (steps, 4, 33), generator=g)
    for s in range(steps):
        opt.zero_grad()
        loss = lm_loss(model(data[s, :, :-1]), data[s, :, 1:])
        loss.backward()
        opt.step()
    return loss.item(), opt, model


def test_fp32_bf16_8bit_states_bytes_and_loss():
    """The demo GPT's shape (d_model 128): 8-bit moments cost 2.1 bytes per parameter or less (codes 2, scales
    8/128 per row, norms' fp32 moments), the estimator counts exactly what the optimizer holds, and 20 steps
    land near fp32's loss."""
    losses, per_param = {}, {}
    for states in ("fp32", "bf16", "8bit"):
        loss, opt, model = _train(states)
        n = sum(p.numel() for p in model.parameters())
        held = state_bytes(opt) - 4 * len(opt.state)  # moments only, without the step counters
        per_param[states], losses[states] = held / n, loss
        est = estimate_for(model.cfg, ParallelPlan(), global_batch=4, seq_len=32, optim_states=states)[0]
        assert est.optim == state_bytes(opt), states
    assert per_param["fp32"] == 8.0 and per_param["bf16"] == 4.0
    assert per_param["8bit"] <= 2.1, per_param
    assert isinstance(make_optimizer(model.parameters(), OptimConfig()), torch.optim.AdamW)  # fp32: torch's own
    assert abs(losses["8bit"] - losses["fp32"]) / losses["fp32"] < 0.02, losses
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.02, losses


def test_low_bit_fp32_states_equal_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Linear(80, 96).double()
    b = torch.nn.Linear(80, 96).double()
    b.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ob = LowBitAdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, states="fp32")
    x = torch.randn(16, 80, dtype=torch.float64)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    # fp32 moments (torch's are in the parameter dtype, float64 here): equal to float32 precision
    assert torch.allclose(a.weight, b.weight, rtol=0, atol=1e-6)


def test_states_refused_with_deepspeed_and_unknown_names(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"train.optim.states = '4bit': choose one of fp32, bf16, 8bit"):
        load_spec("examples/gpt_dp2.toml", ["train.optim.states=4bit"])
    run_dir = tmp_path / "never"
    assert main(["run", "examples/gpt_dp2.toml", "plan.engine=zero2", "train.optim.states=8bit",
                 f"run_dir={run_dir}"]) == 2
    assert "a DeepSpeed ZeRO engine owns its optimizer" in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["plan", "estimate", "examples/gpt_dp2.toml", "train.optim.states=8bit"]) == 0
    assert "optimizer states 8bit" in capsys.readouterr().out


def batches():
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, CFG.vocab_size, (STEPS * 2, BATCH, SEQ + 1), generator=g)
    return data[..., :-1], data[..., 1:]


def reference(steps: int = STEPS) -> list[float]:
    torch.manual_seed(0)
    model = GPT(CFG).double()
    assert sum(p.numel() >= MIN_8BIT_SIZE and p.dim() == 2 for p in model.parameters()) >= 8  # 8-bit moments used
    opt = make_optimizer(model.parameters(), OPTIM)
    inputs, targets = batches()
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = lm_loss(model(inputs[s]), targets[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


def setup(ctx, plan_kwargs):
    plan = ParallelPlan(**plan_kwargs)
    torch.manual_seed(0)
    mesh = build_mesh(plan, "cpu")
    parts = parallelize(lambda: GPT(CFG).double(), plan, mesh, ctx.device, OPTIM, global_batch=BATCH,
                        spec=model_spec("gpt"))
    return plan, mesh, parts


def train_steps(parts, plan, mesh, start, stop):
    inputs, targets = batches()
    per = BATCH // plan.dp
    rows = slice(mesh.get_local_rank("dp") * per, (mesh.get_local_rank("dp") + 1) * per)
    return [parts.train_step(inputs[s, rows], targets[s, rows], OPTIM.lr) for s in range(start, stop)]


def plan_rank(ctx, plan_kwargs):
    plan, mesh, parts = setup(ctx, plan_kwargs)
    losses = train_steps(parts, plan, mesh, 0, STEPS)
    kinds = set()
    for opt in parts.optimizers:
        for state in opt.state.values():
            for key, value in state.items():
                kinds.add((key, str(value.dtype), type(value).__name__, getattr(value, "placements", None) and
                           str(value.placements)))
    return losses, sorted(kinds)


@pytest.mark.slow
@pytest.mark.parametrize("plan_kwargs", [dict(dp=2, engine="fsdp2"),
                                         dict(dp=2, tp=2, engine="fsdp2", sequence_parallel=True)],
                         ids=["fsdp2", "tp2xfsdp2"])  # DDP steps plain replicas: the single-process path
def test_8bit_states_sharded_equal_one_process(ray_cluster, tmp_path, plan_kwargs):
    ref = reference()
    world = ParallelPlan(**plan_kwargs).world_size
    for losses, kinds in run_ranks(plan_rank, world, plan_kwargs, run_dir=tmp_path):
        assert torch.allclose(torch.tensor(losses), torch.tensor(ref), rtol=0, atol=TOL), (losses, ref)
        assert any(k[0] == "exp_avg_q" and k[1] == "torch.uint8" for k in kinds), kinds
        if plan_kwargs.get("engine") == "fsdp2":
            assert any(k[0] == "exp_avg_q" and k[2] == "DTensor" for k in kinds), kinds
        if plan_kwargs.get("tp", 1) > 1:  # a row-wise linear's scales are replicated over tp
            assert any(k[0] == "exp_avg_scale" and "Replicate" in str(k[3]) for k in kinds), kinds


def save_rank(ctx, plan_kwargs, ckpt_dir):
    plan, mesh, parts = setup(ctx, plan_kwargs)
    losses = train_steps(parts, plan, mesh, 0, STEPS)
    Checkpointer(ckpt_dir).save(STEPS, ModelOptimizer(parts.modules, parts.optimizers))
    return losses + train_steps(parts, plan, mesh, STEPS, 2 * STEPS)  # the uninterrupted continuation


def resume_rank(ctx, plan_kwargs, ckpt_dir):
    plan, mesh, parts = setup(ctx, plan_kwargs)
    meta = Checkpointer(ckpt_dir).load("latest", ModelOptimizer(parts.modules, parts.optimizers))
    dtypes = {str(v.dtype) for opt in parts.optimizers for s in opt.state.values()
              for k, v in s.items() if k.endswith("_q")}
    return train_steps(parts, plan, mesh, meta["step"], 2 * STEPS), dtypes


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(dict(dp=2, engine="fsdp2"), dict(dp=4, engine="fsdp2")),
                                           (dict(dp=2, tp=2, engine="fsdp2"), dict(dp=1, tp=1))],
                         ids=["fsdp2_dp2_to_dp4", "tp2xdp2_to_one"])
def test_8bit_checkpoint_resumes_under_another_degree(ray_cluster, tmp_path, saved, resumed):
    saved_losses = run_ranks(save_rank, ParallelPlan(**saved).world_size, saved, tmp_path / "ckpt",
                             run_dir=tmp_path)[0]
    results = run_ranks(resume_rank, ParallelPlan(**resumed).world_size, resumed, tmp_path / "ckpt",
                        run_dir=tmp_path)
    for losses, dtypes in results:
        assert dtypes == {"torch.uint8"}  # the load did not leave codes as floats
        assert torch.allclose(torch.tensor(losses), torch.tensor(saved_losses[STEPS:]), rtol=0, atol=TOL)
    assert not math.isclose(saved_losses[-1], saved_losses[0])  # it trained

