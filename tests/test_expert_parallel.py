"""Expert parallelism: a tiny float64 Mixtral and Qwen3-MoE under ep2, ep2 x FSDP2 (dp4), tp2, ep2 x tp2 and
ep2 + activation checkpointing equal the unsharded model (logits, loss with the router's auxiliary term, every
gradient, the global gradient norm); DCP checkpoints reshard ep2 <-> ep1; impossible plans are refused
(with a plan that works).

Under data parallelism the reference is the MEAN over dp ranks of each rank's local-batch loss and gradients
(HF's auxiliary loss is a statistic of the batch it sees). The models are transformers' own classes, split through
the families' specs (models/mixtral.py, models/qwen3_moe.py).
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from plait.models import model_spec
from plait.parallel.estimate import ModelParams, ParamInfo, estimate_memory, estimate_report
from plait.parallel.expert_parallel import expert_parameters
from plait.parallel.mesh import Layout, build_mesh
from plait.parallel.names import clean_fqn
from plait.parallel.parallelize import OptimConfig, parallelize
from plait.parallel.plan import ParallelPlan, PlanError
from plait.parallel.shape import DecoderShape
from plait.runtime import run_ranks
from torch.distributed.tensor import DTensor

TOL = 1e-10
ROWS, SEQ, VOCAB = 2, 8, 64  # sequences per dp rank, tokens per sequence


def build(kind: str, seed: int = 0, norm_topk: bool = True) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02,
                 max_position_embeddings=64, experts_implementation="eager")  # grouped_mm has no float64
    torch.manual_seed(seed)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**sizes, intermediate_size=16, num_local_experts=4))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**sizes, head_dim=8, intermediate_size=16,
                                                   moe_intermediate_size=16, num_experts=4, norm_topk_prob=norm_topk))
    with torch.no_grad():  # HF leaves the 3-D expert tensors as torch.empty: draw them
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.1)
    return model.double()


def batch(dp_rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + dp_rank)
    x = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    return {"input_ids": x, "labels": x, "output_router_logits": True}


def reference(kind: str, dp: int, dp_rank: int, **model_kw) -> dict:
    """The unsharded model: this rank's logits, the mean loss over dp ranks and the mean gradients."""
    model = build(kind, **model_kw)
    losses = []
    for r in range(dp):
        out = model(**batch(r))
        (out.loss / dp).backward()
        losses.append(out.loss.item())
        if r == dp_rank:
            logits = out.logits.detach()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.cat([g.reshape(-1) for g in grads.values()]).norm().item()
    return {"logits": logits, "loss": sum(losses) / dp, "local_loss": losses[dp_rank], "grads": grads, "norm": norm}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def compare(ctx, kind: str, plan: ParallelPlan, **model_kw) -> dict:
    """Max |difference| to the reference of logits, loss, every gradient and the clipping norm under ``plan``."""
    mesh = build_mesh(plan, "cpu")
    dp_rank = mesh.get_local_rank("dp")
    ref = reference(kind, plan.dp, dp_rank, **model_kw)
    parts = parallelize(lambda: build(kind, **model_kw), plan, mesh, ctx.device, OptimConfig(lr=0.0, grad_clip=1e9),
                        loss_fn=lambda out, _targets: out.loss, spec=model_spec(kind))
    model = parts.modules[0]
    out = model(**batch(dp_rank))
    out.loss.backward()
    diffs = {"logits": (out.logits.detach() - ref["logits"]).abs().max().item(),
             "local_loss": abs(out.loss.item() - ref["local_loss"])}
    seen, worst, where = 0, 0.0, ""
    for name, p in model.named_parameters():
        d = (_full(p.grad) - ref["grads"][clean_fqn(name)]).abs().max().item()
        worst, where = max((worst, where), (d, clean_fqn(name)))
        seen += 1
    diffs["grads"], diffs["worst_grad"], diffs["params_seen"] = worst, where, seen
    diffs["expert_params_dtensor"] = all(isinstance(p, DTensor) for p in expert_parameters(model)) and \
        len(expert_parameters(model)) == (4 if plan.ep > 1 else 0)
    loss = parts.train_step(batch(dp_rank), None, 0.0)  # the train step: loss mean over dp, global grad norm
    diffs["step_loss"] = abs(loss - ref["loss"])
    diffs["grad_norm"] = abs(parts.grad_norm.item() - ref["norm"])
    local = [_local(p) for p in model.parameters()]  # what this rank holds, for the estimator's check
    diffs["held"] = {"params": sum(t.numel() * t.element_size() for t in local),
                     "optim": sum(_local(v).numel() * _local(v).element_size()
                                  for st in parts.optimizers[0].state.values() for v in st.values())}
    return diffs


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def dcp_roundtrip(ctx, folder: str, save_ep: int, load_ep: int) -> float:
    """Train one step under ep=save_ep, save (DCP), load under ep=load_ep into another init: max |param diff|."""
    from plait.runtime.checkpoint import ModelOptimizer

    plans = {ep: ParallelPlan(dp=2, ep=ep, engine="fsdp2") for ep in (save_ep, load_ep)}
    mesh = build_mesh(plans[save_ep], "cpu")
    a = parallelize(lambda: build("mixtral"), plans[save_ep], mesh, ctx.device, OptimConfig(lr=1e-2),
                    loss_fn=lambda out, _t: out.loss, spec=model_spec("mixtral"))
    a.train_step(batch(mesh.get_local_rank("dp")), None, 1e-2)
    ModelOptimizer(a.modules, a.optimizers).save_to(folder)
    saved = {clean_fqn(n): _full(p.detach()) for n, p in a.modules[0].named_parameters()}
    mesh = build_mesh(plans[load_ep], "cpu")
    b = parallelize(lambda: build("mixtral", seed=1), plans[load_ep], mesh, ctx.device, OptimConfig(lr=1e-2),
                    loss_fn=lambda out, _t: out.loss, spec=model_spec("mixtral"))
    ModelOptimizer(b.modules, b.optimizers).load_from(folder)
    return max((_full(p.detach()) - saved[clean_fqn(n)]).abs().max().item() for n, p in b.modules[0].named_parameters())


def skewed_routing(ctx) -> float:
    """Every token routed to rank 0's experts (rank 1 receives no row): forward and backward still run the same
    collectives on both ranks (no hang) and equal the unsharded experts. Max |difference|."""
    from plait.parallel.expert_parallel import apply_expert_parallel
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    mesh = build_mesh(ParallelPlan(dp=2, ep=2, engine="fsdp2"), "cpu")
    cfg = MixtralConfig(hidden_size=8, intermediate_size=4, num_local_experts=4)
    torch.manual_seed(0)
    whole = MixtralExperts(cfg).double()
    with torch.no_grad():
        for p in whole.parameters():
            p.normal_(0, 0.3)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].experts = copy.deepcopy(whole)
    apply_expert_parallel(model, mesh["ep"], ("experts",))
    g = torch.Generator().manual_seed(mesh.get_local_rank("dp"))
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    index = torch.randint(0, 2, (6, 2), generator=g)  # experts 0 and 1: rank 0's
    weights = torch.rand(6, 2, generator=g, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model.layers[0].experts(xa, index, weights), whole(xb, index, weights)
    (ya.square().sum()).backward()
    (yb.square().sum()).backward()
    return max((ya - yb).abs().max().item(), (xa.grad - xb.grad).abs().max().item())


def hf_folder_under_ep2(ctx, src: str, dst: str) -> float:
    """A Mixtral folder (transformers' per-expert tensors) loaded by parallelize(weights=...) under dp2 x ep2
    FSDP2 (meta build, each rank reading only its experts) gives transformers' own logits; the export from those
    shards goes to ``dst``. Max |logit difference| on this rank's batch."""
    from plait.models.hf.export import export_hf_folder
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    spec = model_spec("mixtral")
    plan = ParallelPlan(dp=2, ep=2, engine="fsdp2")
    mesh = build_mesh(plan, "cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        parts = parallelize(lambda: spec.build(cfg), plan, mesh, ctx.device, OptimConfig(), weights=src, spec=spec)
    finally:
        torch.set_default_dtype(previous)
    native = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64, experts_implementation="eager")
    x = batch(mesh.get_local_rank("dp"))["input_ids"]
    with torch.no_grad():
        diff = (parts.modules[0](input_ids=x).logits - native(input_ids=x).logits).abs().max().item()
    export_hf_folder(parts.modules[0], dst, cfg, spec=spec)
    return diff


def gpt_moe_ep2(ctx) -> float:
    """Plait's GPT-MoE (its own experts module and DeepSeek balance + z-loss) under dp2 x ep2 FSDP2 against the
    unsharded model: loss and every gradient (the mean over the two ranks' batches). Max |difference|."""
    from plait.models.gpt import GPT, GPTConfig
    from plait.parallel.loss import tp_loss

    cfg = GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_experts=4, n_shared_experts=1,
                    max_seq_len=32)

    def make():
        torch.manual_seed(0)
        return GPT(cfg).double()

    def tokens(r: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(200 + r))

    ref = make()
    losses = [tp_loss(ref(tokens(r)[:, :-1]), tokens(r)[:, 1:], False) for r in range(2)]
    (sum(losses) / 2).backward()
    plan = ParallelPlan(dp=2, ep=2, engine="fsdp2")
    mesh = build_mesh(plan, "cpu")
    rank = mesh.get_local_rank("dp")
    parts = parallelize(make, plan, mesh, ctx.device, OptimConfig(), spec=model_spec("gpt"))
    model = parts.modules[0]
    loss = tp_loss(model(tokens(rank)[:, :-1]), tokens(rank)[:, 1:], False)
    loss.backward()
    worst = abs(loss.item() - losses[rank].item())
    grads = {clean_fqn(n): p.grad for n, p in ref.named_parameters()}
    assert len(expert_parameters(model)) == 2 * cfg.n_layers  # gate_up_proj and down_proj of each layer
    for name, p in model.named_parameters():
        worst = max(worst, (_full(p.grad) - grads[clean_fqn(name)]).abs().max().item())
    return worst


def two_ranks(ctx, folder: str, hf_src: str) -> dict:
    fsdp = dict(dp=2, ep=2, engine="fsdp2")
    out = {
        "mixtral_ep2": compare(ctx, "mixtral", ParallelPlan(**fsdp)),
        "mixtral_ep2_ac": compare(ctx, "mixtral", ParallelPlan(**fsdp, activation_checkpointing="full")),
        "mixtral_tp2": compare(ctx, "mixtral", ParallelPlan(tp=2)),
        "qwen3_moe_ep2": compare(ctx, "qwen3_moe", ParallelPlan(**fsdp)),
        "qwen3_moe_ep2_no_norm_topk": compare(ctx, "qwen3_moe", ParallelPlan(**fsdp), norm_topk=False),
        "qwen3_moe_tp2": compare(ctx, "qwen3_moe", ParallelPlan(tp=2)),
    }
    out["skewed_routing"] = skewed_routing(ctx)
    out["gpt_moe_ep2"] = gpt_moe_ep2(ctx)
    out["hf_folder_ep2"] = hf_folder_under_ep2(ctx, hf_src, f"{folder}/hf_out")
    out["dcp_ep2_to_ep1"] = dcp_roundtrip(ctx, f"{folder}/ep2", 2, 1)
    out["dcp_ep1_to_ep2"] = dcp_roundtrip(ctx, f"{folder}/ep1", 1, 2)
    return out


def four_ranks(ctx) -> dict:
    plan = ParallelPlan(dp=4, ep=2, engine="fsdp2")
    both = ParallelPlan(dp=2, ep=2, tp=2, engine="fsdp2")  # attention split over tp, experts over ep, FSDP2 over dp
    return {"mixtral_dp4_ep2": compare(ctx, "mixtral", plan), "qwen3_moe_dp2_ep2_tp2": compare(ctx, "qwen3_moe", both)}


def _assert_equal(records: dict) -> None:
    for name, d in records.items():
        if not isinstance(d, dict):  # dcp round trips, skewed routing: one max |difference|
            assert d < TOL, (name, d)
            continue
        assert d["params_seen"] > 0 and d["expert_params_dtensor"], (name, d)
        for key in ("logits", "local_loss", "grads", "step_loss", "grad_norm"):
            assert d[key] < TOL, (name, key, d)


def moe_params(kind: str) -> ModelParams:
    """The estimator's view of the tiny model (the families' model_params will mark experts the same way)."""
    with torch.device("meta"):
        model = build(kind)
    params = {}
    for name, p in model.named_parameters():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        params[name] = ParamInfo(shape=tuple(p.shape), layer=int(layer.group(1)) if layer else None,
                                 end="" if layer else ("first" if "embed" in name else "last"),
                                 expert=".experts." in name)
    return ModelParams(params, n_layers=2)


@pytest.mark.slow
def test_ep2_tp2_and_checkpointing_equal_the_unsharded_model_dcp_reshards_hf_folders_load(ray_cluster, tmp_path):
    from transformers import AutoModelForCausalLM

    source = build("mixtral")  # float64, the experts drawn
    source.save_pretrained(tmp_path / "hf_src")  # per-expert tensors, as transformers writes them
    for records in run_ranks(two_ranks, 2, str(tmp_path / "dcp"), str(tmp_path / "hf_src"), run_dir=tmp_path / "run"):
        _assert_equal(records)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dcp" / "hf_out", dtype=torch.float64,
                                                    experts_implementation="eager")
    x = batch(0)["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(input_ids=x).logits, source(input_ids=x).logits)


@pytest.mark.slow
def test_dp4_ep2_and_dp2_ep2_tp2_under_fsdp2_equal_the_unsharded_model_and_the_estimate(ray_cluster, tmp_path):
    plan = ParallelPlan(dp=4, ep=2, engine="fsdp2")
    rows = estimate_memory(moe_params("mixtral"), MOE, plan, global_batch=4 * ROWS, seq_len=SEQ, dtype="float64")
    for rank, records in enumerate(run_ranks(four_ranks, 4, run_dir=tmp_path, cpus_per_worker=0.5)):
        _assert_equal(records)
        held = records["mixtral_dp4_ep2"]["held"]
        assert (held["params"], held["optim"]) == (rows[rank].params, rows[rank].optim), (rank, held, rows[rank])


def test_the_layout_puts_ep_inside_dp():
    layout = Layout.of(ParallelPlan(dp=4, ep=2, tp=2, engine="fsdp2"))
    assert layout.world_size == 8 and layout.dp_mod_ep == 2
    assert [layout.coordinate(r, "ep") for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [layout.coordinate(r, "dp_mod_ep") for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


MOE = DecoderShape(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=16,
                   family="mixtral", supports=("tp", "ep"), n_experts=4, top_k=2)
DENSE = dataclasses.replace(MOE, family="llama", supports=("tp", "pp", "cp"), n_experts=0, top_k=0)


@pytest.mark.parametrize("kwargs, world, shape, says", [
    (dict(dp=2, ep=2, engine="ddp"), 2, MOE, "use engine='fsdp2'"),
    (dict(dp=2, ep=2, engine="zero2"), 2, MOE, "use engine='fsdp2'"),
    (dict(dp=3, ep=2, engine="fsdp2"), 3, MOE, "must divide plan.dp=3"),
    (dict(dp=2, ep=2, pp=2, engine="fsdp2"), 4, MOE, "use pp=1, e.g. dp=4,ep=2"),
    (dict(dp=2, ep=2, cp=2, engine="fsdp2"), 4, MOE, "use cp=1, e.g. dp=4,ep=2"),
    (dict(dp=2, ep=2, engine="fsdp2"), 2, DENSE, "no mixture-of-experts layers"),
    (dict(dp=8, ep=8, engine="fsdp2"), 8, MOE, "not divisible by plan.ep=8"),
    (dict(dp=2, ep=2, engine="fsdp2"), 4, MOE, "dp=4,ep=2"),
])
def test_impossible_ep_plans_are_refused_with_a_plan_that_works(kwargs, world, shape, says):
    with pytest.raises(PlanError, match=says.replace("(", r"\(").replace(")", r"\)")):
        ParallelPlan(**kwargs).validate(world, shape)


def test_the_estimate_counts_expert_shards_and_dispatch_buffers():
    model = moe_params("mixtral")
    one = estimate_memory(model, MOE, ParallelPlan(dp=4, engine="fsdp2"), global_batch=8, seq_len=SEQ)
    ep = estimate_memory(model, MOE, ParallelPlan(dp=4, ep=2, engine="fsdp2"), global_batch=8, seq_len=SEQ)
    assert [r.params for r in one] == [r.params for r in ep]  # E/2 experts over dp/ep = 2 ranks: same share
    assert all(r.activations > o.activations for r, o in zip(ep, one, strict=True))  # + the dispatch buffers
    report = estimate_report(model, MOE, ParallelPlan(dp=2, ep=2, engine="fsdp2"), 2, global_batch=4, seq_len=SEQ,
                             dtype="float32", title="tiny mixtral")
    assert "experts: 12,288 of the params" in report and "dispatch buffers" in report, report


def test_ep_without_experts_in_the_spec_is_refused_on_the_rank():
    from plait.parallel.parallelize import check_model

    with pytest.raises(PlanError, match="needs its experts modules"):
        check_model(torch.nn.Linear(2, 2), ParallelPlan(dp=2, ep=2, engine="fsdp2"), model_spec("llama"))
