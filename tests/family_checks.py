"""What every model family must pass, run against the unsharded model in float64 (a family's test file calls them).

    from family_checks import run_family_checks
    def tiny_config(): return transformers.Phi3Config(...)      # module-level: rank actors import it by name
    def test_phi3_under_every_plan(ray_cluster, tmp_path):
        run_family_checks(tiny_config, tmp_path)

The model is the family's own (``spec.build``), seeded, in float64, with every parameter nudged by a seeded
N(0, 0.02) so that norms, biases and zero-initialised weights all matter. On 2 gloo ranks it runs:

  tp2 (plain, + sequence parallel, + SP and loss parallel; and with one kv head replicated when the config
      allows), pp2 (GPipe, 2 microbatches), FSDP2 dp2, cp2 (ring attention, zigzag pieces), and a HF folder
      round trip (meta build under tp2, each rank loads its slices, one SGD step, export on every rank);
and in one process SeCO (chunk-wise, exact) against full back-propagation.

Each compares logits, the loss and every gradient with the single-process model (tolerances: HF norms compute in
float32 internally, so gradients through them agree to ~1e-8), and the export with ``from_pretrained`` after the
same step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from plait.models import spec_for_config
from plait.parallel.kv_replication import sync_replicated_kv_grads
from plait.parallel.loss import tp_loss
from plait.parallel.names import clean_fqn
from plait.runtime import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

BATCH, SEQ = 4, 16
LOGITS_TOL, GRAD_TOL = 1e-10, 1e-8


def tokens(vocab: int, seed: int = 5, batch: int = BATCH, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def build(make_config: Callable, kv_heads: int | None = None, on_meta: bool = False):
    """The family's model of ``make_config()`` in float64, seeded and nudged (see the module docstring)."""
    cfg = make_config()
    if kv_heads is not None:
        cfg.num_key_value_heads = kv_heads
    spec = spec_for_config(cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if on_meta:
            with torch.device("meta"):
                return spec.build(cfg), spec, cfg
        torch.manual_seed(0)
        model = spec.build(cfg)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    return model, spec, cfg


def vocab_of(cfg) -> int:
    return cfg.get_text_config(decoder=True).vocab_size


def forward_backward(model, inputs, targets, loss_parallel: bool = False):
    out = model(input_ids=inputs, use_cache=False)
    loss = tp_loss(out, targets, loss_parallel)
    loss.backward()
    return full(out.logits), loss.detach()


def reference(make_config: Callable, kv_heads: int | None = None) -> dict:
    model, _, cfg = build(make_config, kv_heads)
    logits, loss = forward_backward(model, *tokens(vocab_of(cfg)))
    return {"logits": logits, "loss": loss.item(), "grads": {n: p.grad.detach() for n, p in model.named_parameters()}}


def grads_of(modules) -> dict:
    return {clean_fqn(n): full(p.grad) for m in modules for n, p in m.named_parameters() if p.grad is not None}


def tp_variants(make_config: Callable) -> list[tuple]:
    cfg = make_config()
    variants = [(None, False, False), (None, True, False), (None, True, True)]
    if getattr(cfg, "num_attention_heads", 0) % 2 == 0:
        variants.append((1, True, False))  # one kv head over tp2: replicated
    return variants


def tp_rank(ctx, make_config: Callable) -> dict:
    from plait.parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {}
    for kv, sp, lp in tp_variants(make_config):
        model, spec, cfg = build(make_config, kv)
        apply_tensor_parallel(model, mesh, spec, sequence_parallel=sp, loss_parallel=lp)
        logits, loss = forward_backward(model, *tokens(vocab_of(cfg)), loss_parallel=lp)
        sync_replicated_kv_grads(model)
        out[kv, sp, lp] = {"logits": logits, "loss": loss.item(), "grads": grads_of([model]),
                           "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}
    return out


def pp_rank(ctx, make_config: Callable) -> dict:
    from plait.parallel.pipeline import build_pipeline

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    _, spec, cfg = build(make_config)
    pipe = build_pipeline(lambda: build(make_config)[0], mesh, spec, schedule="GPipe", microbatches=2,
                          loss_fn=lambda o, t: tp_loss(o, t, False), device="cpu")
    loss = pipe.step(*tokens(vocab_of(cfg)))
    return {"loss": None if loss is None else loss.item(), "grads": grads_of(pipe.modules)}


def fsdp_rank(ctx, make_config: Callable) -> dict:
    from plait.parallel.data_parallel import apply_fsdp2

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model, _, cfg = build(make_config)
    apply_fsdp2(model, mesh)
    inputs, targets = tokens(vocab_of(cfg))
    half = slice(ctx.rank * BATCH // 2, (ctx.rank + 1) * BATCH // 2)
    _, loss = forward_backward(model, inputs[half], targets[half])
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return {"loss": loss.item(), "grads": grads_of([model])}


def cp_rank(ctx, make_config: Callable) -> dict:
    from plait.parallel.context_parallel import apply_context_parallel, shard_batch

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    model, spec, cfg = build(make_config)
    apply_context_parallel(model, mesh, spec.attention)
    inputs, targets = shard_batch(*tokens(vocab_of(cfg)), ctx.rank, 2)
    _, loss = forward_backward(model, inputs, targets)
    flat = torch.cat([loss.reshape(1)] + [p.grad.reshape(-1) for p in model.parameters()])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    grads, at = {}, 1
    for name, p in model.named_parameters():
        grads[clean_fqn(name)] = flat[at:at + p.numel()].view_as(p)
        at += p.numel()
    return {"loss": flat[0].item(), "grads": grads}


def roundtrip_rank(ctx, make_config: Callable, src: Path, dst: Path) -> dict:
    """Meta build under tp2, each rank allocates and loads its slices, one SGD step, export on every rank."""
    from plait.models.hf.export import export_hf_folder
    from plait.models.hf.weights import load_hf_folder, materialize
    from plait.parallel.tensor_parallel import apply_tensor_parallel

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model, spec, cfg = build(make_config, on_meta=True)
    apply_tensor_parallel(model, mesh, spec)
    materialize(model, "cpu", spec)
    load_hf_folder(model, src, spec)
    inputs, targets = tokens(vocab_of(cfg))
    logits, _ = forward_backward(model, inputs, targets)
    sync_replicated_kv_grads(model)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    export_hf_folder(model, dst, cfg, spec=spec, source=src)
    return {"logits": logits}


def assert_grads(got: dict, ref: dict, what: str, head_dim: int | None = None, tol: float = GRAD_TOL) -> None:
    assert got.keys() == ref.keys(), (what, sorted(set(got) ^ set(ref)))
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape and head_dim:  # replicated kv-head copies: all equal, one is the head's gradient
            copies = g.unflatten(0, (r.shape[0] // head_dim, -1, head_dim))
            assert torch.allclose(copies[:, :1].expand_as(copies), copies, rtol=0, atol=1e-12), (what, name)
            g = copies[:, 0].flatten(0, 1)
        assert torch.allclose(g, r, rtol=1e-6, atol=tol), (what, name, (g - r).abs().max().item())


def run_family_checks(make_config: Callable, tmp_path: Path, *, cp: bool = True, seco: bool = True,
                      grad_tol: float = GRAD_TOL) -> dict:
    """Every check of the module docstring; returns what ran (for the caller's own extra assertions).
    ``grad_tol``: the absolute gradient tolerance (a family whose norms round through float32 more often, or
    scale the embedding, needs a little more than the default)."""
    from plait.models.hf.export import export_hf_folder
    from transformers import AutoModelForCausalLM

    cfg = make_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ref = reference(make_config)
    for result in run_ranks(tp_rank, 2, make_config, run_dir=tmp_path / "tp"):
        for (kv, sp, lp), got in result.items():
            want = reference(make_config, kv) if kv is not None else ref
            what = f"tp2 kv={kv} sp={sp} lp={lp}"
            assert got["all_dtensor"], what
            assert torch.allclose(got["logits"], want["logits"], rtol=0, atol=LOGITS_TOL), what
            assert abs(got["loss"] - want["loss"]) < 2e-6, what  # the cross-entropy runs in float32
            assert_grads(got["grads"], want["grads"], what, head_dim, grad_tol)
    first, last = run_ranks(pp_rank, 2, make_config, run_dir=tmp_path / "pp")
    assert first["loss"] is None and abs(last["loss"] - ref["loss"]) < 1e-9
    assert not first["grads"].keys() & last["grads"].keys()
    merged = {**first["grads"], **last["grads"]}
    if "lm_head.weight" in merged and "lm_head.weight" not in ref["grads"]:  # a tied head: a copy on the last stage
        head = merged.pop("lm_head.weight")  # that gets the embedding's whole gradient, as the one tensor does
        assert torch.allclose(head, merged["model.embed_tokens.weight"], rtol=0, atol=0), "pp2 tied copies"
    assert_grads(merged, ref["grads"], "pp2", tol=grad_tol)
    for got in run_ranks(fsdp_rank, 2, make_config, run_dir=tmp_path / "fsdp"):
        assert abs(got["loss"] - ref["loss"]) < 1e-9
        assert_grads(got["grads"], ref["grads"], "fsdp2", tol=grad_tol)
    if cp:
        for got in run_ranks(cp_rank, 2, make_config, run_dir=tmp_path / "cp"):
            assert abs(got["loss"] - ref["loss"]) < 1e-9
            assert_grads(got["grads"], ref["grads"], "cp2", tol=grad_tol)
    if seco:
        from plait.lm.chunkwise import seco_step

        model, spec, cfg = build(make_config)
        loss = seco_step(model, *tokens(vocab_of(cfg)), chunk_len=5, spec=spec)  # 4 chunks, the last short
        assert abs(loss.item() - ref["loss"]) < 1e-9
        assert_grads({n: p.grad for n, p in model.named_parameters()}, ref["grads"], "seco", tol=grad_tol)
    # The family's model written as a HF folder (single process), read by transformers' own class: the same model
    original, spec, cfg = build(make_config)
    export_hf_folder(original, tmp_path / "src", cfg, spec=spec, max_shard_bytes=64 * 1024)
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float64)
    probe = tokens(vocab_of(cfg), seed=9)[0]
    assert torch.allclose(native(input_ids=probe).logits, original(input_ids=probe).logits, rtol=0, atol=LOGITS_TOL)
    results = run_ranks(roundtrip_rank, 2, make_config, tmp_path / "src", tmp_path / "out", run_dir=tmp_path / "rt")
    for got in results:
        assert torch.allclose(got["logits"], ref["logits"], rtol=0, atol=LOGITS_TOL), "loaded under tp2"
    forward_backward(original, *tokens(vocab_of(cfg)))
    torch.optim.SGD(original.parameters(), lr=0.1).step()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64)
    assert type(exported) is type(native)
    with torch.no_grad():
        moved = (exported(input_ids=probe).logits - native(input_ids=probe).logits).abs().max().item()
        assert torch.allclose(exported(input_ids=probe).logits, original(input_ids=probe).logits, rtol=0, atol=1e-7)
    assert moved > 1e-4  # the step changed the model
    return {"native": type(native).__name__}
