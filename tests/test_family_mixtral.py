"""Mixtral and Qwen3-MoE (models/mixtral.py, models/qwen3_moe.py), float64 against transformers' own model.

One process: tp_loss(model(x), y) is HF's loss with labels (cross-entropy + router_aux_loss_coef x the balance
loss over every layer's router logits), and its gradients; a HF folder round trip. Two gloo ranks (one spawn):
tp2 (plain, SP, SP + loss parallel) and FSDP2 dp2 equal the unsharded model (logits, loss with the aux term,
every gradient), Plait's GPT-MoE under tp2 too; each rank loads only its experts (a Shard(0) DTensor over the
expert dim) from a folder that ``save_pretrained`` wrote, and the export from those shards is what
``from_pretrained`` reads equal.
"""

import pytest
import torch
import torch.nn.functional as F
from family_checks import build, full, grads_of, tokens
from plait.models.hf.tiny import tiny_mixtral_config, tiny_qwen3_moe_config
from plait.parallel.loss import aux_loss_of, tp_loss


def tiny_mixtral():
    return tiny_mixtral_config()


def tiny_qwen3_moe():  # layer 1 dense (mlp_only_layers), top-k probabilities not renormalised
    return tiny_qwen3_moe_config()


def tiny_qwen3_moe_sparse_step():  # every second layer sparse, renormalised top-k
    return tiny_qwen3_moe_config(layers=4, mlp_only_layers=(), decoder_sparse_step=2, norm_topk_prob=True)


FAMILIES = [tiny_mixtral, tiny_qwen3_moe, tiny_qwen3_moe_sparse_step]


def _grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("make_config", FAMILIES)
def test_tp_loss_is_transformers_loss_with_its_balance_term(make_config):
    model, spec, cfg = build(make_config)
    assert spec.experts == ("mlp.experts",) and "ep" in spec.supports() and "pp" not in spec.shape(cfg).supports
    x, y = tokens(cfg.vocab_size)
    out = model(input_ids=x, use_cache=False)
    coef = cfg.router_aux_loss_coef
    assert torch.equal(aux_loss_of(out), coef * out.aux_loss) and out.aux_loss > 0
    ours = tp_loss(out, y, False)
    # exact against the same sum in float64 (HF's own loss rounds the cross-entropy through float32)
    exact = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + coef * out.aux_loss
    assert abs(ours.item() - exact.item()) < 1e-12
    # HF shifts its labels itself: labels = the inputs, our targets = the next tokens (the last one unseen)
    seen = y.clone()
    seen[:, -1] = -100
    hf = model(input_ids=x, labels=x, use_cache=False).loss
    mine = tp_loss(model(input_ids=x, use_cache=False), seen, False)
    assert abs(hf.item() - mine.item()) < 2e-6  # HF's cross-entropy runs in float32
    for a, b in zip(_grads(model, hf), _grads(model, mine), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make_config", FAMILIES)
def test_a_folder_round_trip_keeps_transformers_per_expert_layout(make_config, tmp_path):
    from plait.models.hf.export import export_hf_folder
    from plait.models.hf.weights import load_hf_folder
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, spec, cfg = build(make_config)
    export_hf_folder(model, tmp_path / "hf", cfg, spec=spec)
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64, experts_implementation="eager")
    native.save_pretrained(tmp_path / "native")  # what transformers itself writes: the same tensor names
    with safe_open(tmp_path / "native" / "model.safetensors", framework="pt") as f:
        assert names == set(f.keys()) and not any(n.endswith("gate_up_proj") for n in names)
    x, _ = tokens(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(native(input_ids=x).logits, model(input_ids=x).logits)
        fresh, _, _ = build(make_config)
        for p in fresh.parameters():
            p.zero_()
    load_hf_folder(fresh, tmp_path / "native", spec)
    for (n, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_qwen3_moe_dense_layers_and_sparse_step_have_no_experts():
    model, _, _ = build(tiny_qwen3_moe)
    kinds = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert kinds == [True, False, True]
    model, _, _ = build(tiny_qwen3_moe_sparse_step)
    assert [hasattr(layer.mlp, "experts") for layer in model.model.layers] == [False, True, False, True]


def gpt_moe():
    from plait.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_experts=4, n_shared_experts=1,
                         max_seq_len=32)).double()


def moe_ranks(ctx, src, dst) -> dict:
    """On 2 gloo ranks: tp2 variants, FSDP2 dp2, per-shard expert loading and export (module docstring)."""
    import torch.distributed as dist
    from plait.models.hf.export import export_hf_folder
    from plait.models.hf.weights import load_hf_folder
    from plait.models.registry import spec_for_model
    from plait.parallel.data_parallel import apply_fsdp2
    from plait.parallel.tensor_parallel import apply_tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    out: dict = {}
    for make_config in (tiny_mixtral, tiny_qwen3_moe):
        name = make_config.__name__
        for sp, lp in ((False, False), (True, False), (True, True)):
            model, spec, cfg = build(make_config)
            apply_tensor_parallel(model, mesh, spec, sequence_parallel=sp, loss_parallel=lp)
            x, y = tokens(cfg.vocab_size)
            o = model(input_ids=x, use_cache=False)
            loss = tp_loss(o, y, lp)
            loss.backward()
            out[name, "tp", sp, lp] = {"logits": full(o.logits), "loss": loss.item(), "grads": grads_of([model])}
        model, spec, cfg = build(make_config)
        apply_fsdp2(model, mesh)
        x, y = tokens(cfg.vocab_size)
        half = slice(ctx.rank * 2, ctx.rank * 2 + 2)
        loss = tp_loss(model(input_ids=x[half], use_cache=False), y[half], False)
        loss.backward()
        avg = loss.detach().clone()
        dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        out[name, "fsdp"] = {"loss": avg.item(), "grads": grads_of([model])}
    for sp in (False, True):  # Plait's GPT-MoE: the same replicated MoE block under tp2
        model = gpt_moe()
        apply_tensor_parallel(model, mesh, spec_for_model(model), sequence_parallel=sp, loss_parallel=sp)
        x, y = tokens(64)
        o = model(x)
        loss = tp_loss(o, y, sp)
        loss.backward()
        out["gpt", sp] = {"logits": full(o), "loss": loss.item(), "grads": grads_of([model])}
    # each rank holds experts [2r, 2r+2) of every layer: it reads only those (and exports them back)
    model, spec, cfg = build(tiny_mixtral)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for layer in model.model.layers:
        for pname in ("gate_up_proj", "down_proj"):
            sharded = torch.nn.Parameter(distribute_tensor(getattr(layer.mlp.experts, pname).data, mesh, [Shard(0)]))
            setattr(layer.mlp.experts, pname, sharded)
    load_hf_folder(model, src, spec)
    local = {n: p.to_local().clone() for n, p in model.named_parameters() if hasattr(p, "to_local")}
    export_hf_folder(model, dst, cfg, spec=spec, source=src)
    out["local_experts"] = local
    return out


@pytest.mark.slow
def test_moe_families_under_tp_and_fsdp_and_per_shard_expert_loading(ray_cluster, tmp_path):
    from plait.models.hf.export import export_hf_folder
    from plait.runtime import run_ranks
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    refs, dp_refs = {}, {}
    for make_config in (tiny_mixtral, tiny_qwen3_moe):
        model, _, cfg = build(make_config)
        x, y = tokens(cfg.vocab_size)
        o = model(input_ids=x, use_cache=False)
        loss = tp_loss(o, y, False)
        loss.backward()
        refs[make_config.__name__] = {"logits": o.logits.detach(), "loss": loss.item(),
                                      "grads": {n: p.grad for n, p in model.named_parameters()}}
        model, _, _ = build(make_config)  # data parallelism: the mean of the two halves' losses (aux per half)
        halves = [tp_loss(model(input_ids=x[h], use_cache=False), y[h], False) for h in (slice(0, 2), slice(2, 4))]
        loss = sum(halves) / 2
        loss.backward()
        dp_refs[make_config.__name__] = {"loss": loss.item(), "grads": {n: p.grad for n, p in model.named_parameters()}}
    gpt = gpt_moe()
    x, y = tokens(64)
    o = gpt(x)
    loss = tp_loss(o, y, False)
    loss.backward()
    refs["gpt"] = {"logits": o.detach(), "loss": loss.item(), "grads": {n: p.grad for n, p in gpt.named_parameters()}}
    # the source folder as transformers writes it (per-expert w1/w2/w3), float64
    source, _, cfg = build(tiny_mixtral)
    source.save_pretrained(tmp_path / "src")
    assert isinstance(source, MixtralForCausalLM)
    got = run_ranks(moe_ranks, 2, tmp_path / "src", tmp_path / "out", run_dir=tmp_path / "ranks")
    for rank, result in enumerate(got):
        for sp in (False, True):
            r, ref = result["gpt", sp], refs["gpt"]
            assert torch.allclose(r["logits"], ref["logits"], rtol=0, atol=1e-10), ("gpt-moe tp2", sp)
            assert abs(r["loss"] - ref["loss"]) < 1e-9, ("gpt-moe tp2", sp)
            for n, g in ref["grads"].items():
                assert torch.allclose(r["grads"][n], g, rtol=1e-6, atol=1e-10), ("gpt-moe tp2", sp, n)
        for name, ref in ((n, r) for n, r in refs.items() if n != "gpt"):
            for sp, lp in ((False, False), (True, False), (True, True)):
                r = result[name, "tp", sp, lp]
                what = f"{name} tp2 sp={sp} lp={lp}"
                assert torch.allclose(r["logits"], ref["logits"], rtol=0, atol=1e-10), what
                assert abs(r["loss"] - ref["loss"]) < 2e-6, what  # the vocab-parallel cross-entropy: float32 parts
                for n, g in ref["grads"].items():
                    assert torch.allclose(r["grads"][n], g, rtol=1e-6, atol=1e-8), (what, n)
            f, want = result[name, "fsdp"], dp_refs[name]  # each rank's balance loss is over its own tokens
            assert abs(f["loss"] - want["loss"]) < 1e-9, name
            for n, g in want["grads"].items():
                assert torch.allclose(f["grads"][n], g, rtol=1e-6, atol=1e-8), (name, "fsdp2", n)
        state = source.state_dict()
        for n, local in result["local_experts"].items():
            assert torch.equal(local, state[n][2 * rank:2 * rank + 2]), n
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64,
                                                    experts_implementation="eager")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float64,
                                                  experts_implementation="eager")
    probe = tokens(cfg.vocab_size, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(exported(input_ids=probe).logits, native(input_ids=probe).logits)
    export_hf_folder(source, tmp_path / "single", cfg)  # a plain model exports the same layout
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "single", dtype=torch.float64,
                                                 experts_implementation="eager")
    with torch.no_grad():
        assert torch.equal(again(input_ids=probe).logits, native(input_ids=probe).logits)
