"""plan.compile: each composition trains as the same plan in eager mode does, and compiles once.

Every check runs the plan twice in the same process, eager (compile="off") then compiled, on the same seed and
batch, and compares the losses; between the two ``torch._dynamo.reset()`` clears what an earlier plan compiled.
Recompilation is counted with dynamo's own counter of captured graphs (``graphs_compiled``): the graphs a plan
compiles all appear in its first step (one per distinct block structure, backward included), and steps 2..N
must add none. Shapes are static (compile.py), so a changed sequence length is a new graph, and the counter
shows it (``test_a_changed_shape_counts_as_a_recompile``).
"""

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig
from plait.parallel.compile import graphs_compiled
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0)
BATCH, SEQ, STEPS = 4, 16, 3
# float32 on both sides. Inductor fuses the block's pointwise ops and may reorder a reduction (RMSNorm's mean,
# softmax's sum, the matmul's K loop in its own C++ kernels), so a compiled step is not bit-identical to eager:
# a relative error of a few float32 ulps per op (~1e-7), which three Adam steps at lr 1e-2 on a tiny GPT carry to
# the loss at ~1e-6 relative. 1e-5 relative is ten times that and ~1e5 times smaller than the loss's fall per
# step (4.18 -> 3.79 -> 3.55): a wrong gradient, a block left out, a stale weight all miss it by far.
RTOL = 1e-5


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (BATCH, seq + 1), generator=torch.Generator().manual_seed(5))


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b, strict=True))


def train(ctx, kwargs: dict, steps: int = STEPS, seq: int = SEQ) -> dict:
    """``steps`` steps of ``kwargs``'s plan; the losses and the graphs compiled in step 1 and after it."""
    torch._dynamo.reset()
    plan = ParallelPlan(**kwargs)
    plan.validate(ctx.world_size, CFG, BATCH // plan.dp, model_dtype=torch.float32)
    torch.manual_seed(0)
    mesh = build_mesh(plan, "cpu")
    parts = parallelize(lambda: GPT(CFG), plan, mesh, ctx.device, OPTIM, global_batch=BATCH, spec=model_spec("gpt"))
    rows = BATCH // plan.dp
    dp_rank = mesh.get_local_rank("dp") if plan.dp > 1 else 0
    mine = _tokens(seq)[dp_rank * rows:(dp_rank + 1) * rows]
    start = graphs_compiled()
    losses = [parts.train_step(mine[:, :-1], mine[:, 1:], OPTIM.lr)]
    first = graphs_compiled()
    losses += [parts.train_step(mine[:, :-1], mine[:, 1:], OPTIM.lr) for _ in range(steps - 1)]
    return {"losses": losses, "first_step_graphs": first - start, "later_graphs": graphs_compiled() - first}


def eager_and_compiled(ctx, plans: dict) -> dict:
    out = {}
    for name, kwargs in plans.items():
        eager = train(ctx, {**kwargs, "compile": "off"})
        try:
            out[name] = {"eager": eager, "compiled": train(ctx, kwargs)}
        except Exception as e:  # noqa: BLE001 - reported with the plan's name, the test fails on it
            out[name] = {"eager": eager, "error": f"{type(e).__name__}: {e}"[:3000]}
    torch._dynamo.reset()
    return out


@pytest.fixture
def compile_in_this_thread():
    """Inductor compiles in a pool of threads it leaves running; one compile thread: none started, none left."""
    import torch._inductor.config

    with torch._inductor.config.patch(compile_threads=1):
        yield


def one_process(mode: str, seq: int = SEQ, model: GPT | None = None) -> tuple[GPT, dict]:
    """STEPS steps of the whole batch in this process (no process group), ``apply_compile(model, mode)``."""
    from plait.models.gpt import lm_loss
    from plait.parallel.compile import apply_compile

    if model is None:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = apply_compile(GPT(CFG), mode)
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, foreach=True)
    tokens, losses, start = _tokens(seq), [], graphs_compiled()
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step == 0:
            first = graphs_compiled()
    return model, {"losses": losses, "first_step_graphs": first - start, "later_graphs": graphs_compiled() - first}


def test_one_process_blocks_and_model_equal_eager_and_compile_once(compile_in_this_thread):
    eager = one_process("off")[1]
    for mode, graphs in (("blocks", 1), ("model", 1)):  # blocks: both blocks share one graph
        got = one_process(mode)[1]
        print(mode, got, eager["losses"])
        assert _close(got["losses"], eager["losses"]), (mode, got, eager)
        assert got["first_step_graphs"] == graphs and got["later_graphs"] == 0, (mode, got)
    torch._dynamo.reset()


def test_a_changed_shape_counts_as_a_recompile(compile_in_this_thread):
    """The counter the other tests rely on sees a recompilation: the same compiled blocks, a shorter sequence."""
    model, first = one_process("blocks")
    assert first["first_step_graphs"] == 1 and first["later_graphs"] == 0, first
    _, shorter = one_process("blocks", seq=SEQ // 2, model=model)
    assert shorter["first_step_graphs"] == 1 and shorter["later_graphs"] == 0, shorter  # static shapes: one more
    torch._dynamo.reset()


def test_refusals_name_the_fix():
    from plait.parallel.compile import apply_compile, compile_violations
    from plait.parallel.plan import PlanError

    with pytest.raises(PlanError, match=r"compile='fast' is not one of: off, blocks, model"):
        ParallelPlan(compile="fast").check()
    (msg,) = compile_violations(ParallelPlan(dp=2, engine="zero2", compile="blocks"))
    assert "DeepSpeed ZeRO engine" in msg and 'engine="fsdp2"' in msg and 'compile="off" with zero2' in msg
    (msg,) = compile_violations(ParallelPlan(dp=2, engine="fsdp2", compile="model"))
    assert "FSDP2's per-block hooks" in msg and 'use compile="blocks"' in msg
    (msg,) = compile_violations(ParallelPlan(cp=2, activation_checkpointing="full", compile="blocks"))
    assert "graph break inside" in msg and 'activation_checkpointing="off" with cp' in msg
    for fine in (dict(dp=2, engine="zero3"), dict(engine="fsdp2", compile="model"), dict(dp=2, compile="model"),
                 dict(cp=2, compile="blocks"), dict(dp=2, engine="fsdp2", activation_checkpointing="full",
                                                     compile="blocks")):
        assert compile_violations(ParallelPlan(**fine)) == [], fine
    # checked in plan.check() (a spec's [plan] is refused when read) and, with the model, in validate: an MoE model
    with pytest.raises(PlanError, match="ZeRO engine wraps the model itself"):
        ParallelPlan(dp=2, engine="zero2", compile="blocks").check()
    moe = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_experts=4)
    with pytest.raises(PlanError, match=r"mixture-of-experts model \(4 experts per layer\).*compile=\"off\""):
        ParallelPlan(dp=2, compile="blocks").validate(2, moe)
    with pytest.raises(ValueError, match=r"plan.compile='fast': choose one of off, blocks, model"):
        apply_compile(GPT(CFG), "fast")
    with pytest.raises(TypeError, match=r"plan.compile='blocks' needs the blocks in model.layers.*"
                                        r"plan.compile='model' or 'off'"):
        apply_compile(torch.nn.Sequential(torch.nn.Linear(4, 4)), "blocks")
    from plait.lm.lm_config import Config
    from plait.runtime.config import build

    assert build(Config, {"plan": {"compile": "blocks"}}).plan.compile == "blocks"  # a spec's [plan] table
    assert "compile(blocks)" in ParallelPlan(dp=2, compile="blocks").describe()


# torchtitan's order on 2 gloo ranks: TP -> CP -> AC -> compile -> FSDP2 / DDP; pipeline stages compile their blocks.
TWO_RANKS = {
    "tp2_sp_lossparallel": dict(tp=2, sequence_parallel=True, loss_parallel=True, compile="blocks"),
    "fsdp2_dp2_ac_full": dict(dp=2, engine="fsdp2", activation_checkpointing="full", compile="blocks"),
    "ddp_dp2_ac_selective": dict(dp=2, activation_checkpointing="selective", compile="blocks"),
    "pp2_1f1b": dict(pp=2, schedule="1F1B", microbatches=2, compile="blocks"),
    "cp2": dict(cp=2, compile="blocks"),
    "ddp_dp2_model": dict(dp=2, compile="model"),
}
# graphs in the first step: one per block structure (selective AC: wrapped and plain blocks); cp: each block
# is cut at its ring-attention core into pieces that dynamo compiles one by one (4 graphs, shared by both
# blocks); pp2: each stage compiles its one block. Plus one for the default loss, compiled unless loss_parallel
# (under pp only the last stage, rank 1, computes it).
BLOCK_GRAPHS = {"ddp_dp2_ac_selective": 2, "cp2": 4}


def first_step_graphs(name: str, rank: int) -> int:
    loss = 0 if TWO_RANKS[name].get("loss_parallel") else int(rank == 1 or not name.startswith("pp"))
    return BLOCK_GRAPHS.get(name, 1) + loss


@pytest.mark.slow
def test_compositions_equal_eager_and_compile_once(ray_cluster, tmp_path):
    for rank, records in enumerate(run_ranks(eager_and_compiled, 2, TWO_RANKS, run_dir=tmp_path)):
        for name, r in records.items():
            assert "error" not in r, (name, r)
            got, eager = r["compiled"], r["eager"]
            print(f"{name}: compiled {got['losses']} eager {eager['losses']} graphs {got['first_step_graphs']}")
            assert _close(got["losses"], eager["losses"]), (name, got, eager)
            assert got["first_step_graphs"] == first_step_graphs(name, rank), (name, rank, got)
            assert got["later_graphs"] == 0, (name, got)
            assert eager["first_step_graphs"] == 0, (name, eager)
