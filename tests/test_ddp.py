"""Data parallelism on 2 ranks equals one process training on the full batch."""

import torch
from plait.parallel.mesh import build_mesh
from plait.parallel.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.parallelize import OptimConfig, make_optimizer, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime import run_ranks

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
STEPS, BATCH, SEQ = 3, 8, 16


def global_batches():
    g = torch.Generator().manual_seed(123)
    data = torch.randint(0, CFG.vocab_size, (STEPS, BATCH, SEQ + 1), generator=g)
    return data[..., :-1], data[..., 1:]


def ddp_rank(ctx):
    plan = ParallelPlan(dp=2)
    torch.manual_seed(0)
    parts = parallelize(lambda: GPT(CFG).double(), plan, build_mesh(plan, "cpu"), ctx.device, OPTIM)
    inputs, targets = global_batches()
    half = slice(ctx.rank * BATCH // 2, (ctx.rank + 1) * BATCH // 2)
    losses = [parts.train_step(inputs[s, half], targets[s, half], OPTIM.lr) for s in range(STEPS)]
    return losses, {k: v.detach().clone() for k, v in parts.modules[0].module.state_dict().items()}


def test_ddp_two_ranks_match_single_process_full_batch(ray_cluster, tmp_path):
    results = run_ranks(ddp_rank, 2, run_dir=tmp_path)
    torch.manual_seed(0)
    model = GPT(CFG).double()
    opt = make_optimizer(model.parameters(), OPTIM)
    inputs, targets = global_batches()
    ref_losses = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = lm_loss(model(inputs[s]), targets[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        ref_losses.append(loss.item())
    # float64 throughout: the only difference is the order of the gradient sum (1e-12 level).
    for losses, state in results:
        assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-10)
        for name, ref in model.state_dict().items():
            assert torch.allclose(state[name], ref, rtol=0, atol=1e-10), name
    assert ref_losses[-1] < ref_losses[0]
