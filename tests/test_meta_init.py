"""Random init on the meta device, shard by shard (parallel/meta_init.py, parallelize(init_seed=...)).

Under tp2 and under FSDP2 dp2 every rank allocates only its shards, and the gathered model equals the one a
single process makes with the same seed; the first training step's loss agrees too. GPT.init_weights keeps its
seeded values (the rule moved into init_value)."""

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig
from plait.models.hf.weights import materialize
from plait.parallel.meta_init import init_shards, param_seed
from plait.parallel.names import clean_fqn
from plait.runtime import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
SEED = 7
GPT_SPEC = model_spec("gpt")


def one_process() -> GPT:
    with torch.device("meta"):
        model = GPT(GPTConfig(**CFG))
    materialize(model, "cpu", GPT_SPEC)
    init_shards(model, SEED, GPT_SPEC.init_value)
    return model


def batch():
    t = torch.randint(0, CFG["vocab_size"], (4, 17), generator=torch.Generator().manual_seed(3))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def meta_rank(ctx) -> dict:
    from plait.parallel.parallelize import OptimConfig, parallelize
    from plait.parallel.plan import ParallelPlan

    out = {}
    for label, plan, shape in [("tp2", ParallelPlan(tp=2), (1, 1, 2)),
                               ("fsdp2", ParallelPlan(dp=2, engine="fsdp2"), (2, 1, 1))]:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "pp", "tp"))
        parts = parallelize(lambda: GPT(GPTConfig(**CFG)), plan, mesh, torch.device("cpu"),
                            OptimConfig(lr=1e-3, warmup_steps=0), init_seed=SEED, spec=GPT_SPEC)
        model = parts.modules[0]
        params = {clean_fqn(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                  for n, p in model.named_parameters()}
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
        inputs, targets = batch()
        if label == "fsdp2":  # each dp rank its half of the batch
            inputs, targets = inputs[2 * ctx.rank: 2 * ctx.rank + 2], targets[2 * ctx.rank: 2 * ctx.rank + 2]
        out[label] = {"params": params, "local": local, "loss": parts.train_step(inputs, targets, 1e-3)}
    return out


def test_gpt_init_weights_is_unchanged_by_the_per_parameter_rule():
    torch.manual_seed(0)
    a = GPT(GPTConfig(**CFG))
    gen = torch.Generator().manual_seed(0)
    b = GPT(GPTConfig(**CFG))
    b.init_weights(seed=0)
    expected = {}
    for name, p in b.named_parameters():  # the rule the loop used before init_value existed
        if p.ndim == 1:
            expected[name] = torch.ones(p.shape)
        else:
            std = 0.02 / (2 * CFG["n_layers"]) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02
            expected[name] = torch.randn(p.shape, generator=gen) * std
    assert all(torch.equal(p, expected[n]) for n, p in b.named_parameters())
    assert not torch.equal(a.output.weight, b.output.weight)  # the global RNG and seed 0 differ


def test_per_parameter_seeds_do_not_depend_on_anything_but_seed_and_name():
    assert param_seed(7, "a") == 8104344808565692802  # fixed: no per-process hashing (Python's hash() would vary)
    assert param_seed(7, "layers.0.attention.wq.weight") != param_seed(7, "layers.1.attention.wq.weight")
    assert param_seed(7, "a") != param_seed(8, "a")


@pytest.mark.slow
def test_meta_init_under_tp2_and_fsdp2_allocates_shards_and_equals_one_process(ray_cluster, tmp_path):
    ref = one_process()
    total = sum(p.numel() for p in ref.parameters())
    inputs, targets = batch()
    from plait.models.gpt import lm_loss

    ref_loss = lm_loss(ref(inputs), targets).item()
    for result in run_ranks(meta_rank, 2, run_dir=tmp_path):
        for label in ("tp2", "fsdp2"):
            got = result[label]
            assert got["local"] < 0.75 * total, label  # only this rank's shards were allocated
            for name, p in ref.named_parameters():
                assert torch.equal(got["params"][name], p.detach()), (label, name)
            assert got["loss"] == pytest.approx(ref_loss, rel=1e-5), label
