"""Tensor parallelism (+ sequence parallel, + loss parallel) on 2 gloo ranks equals one process.

Each worker group start costs seconds, so one rank function per model runs every variant and the
driver checks the results against a single-process reference trained here. float64 throughout,
except where the model itself rounds to float32 (tolerances stated at each assert).
"""

import warnings

import pytest
import torch
from plait.models import model_spec
from plait.models.gpt import GPT, GPTConfig, lm_loss
from plait.parallel.loss import tp_loss
from plait.parallel.tensor_parallel import apply_tensor_parallel
from plait.runtime import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

GPT_SPEC, LLAMA = model_spec("gpt"), model_spec("llama")

CFG = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
STEPS, BATCH, SEQ, LR = 3, 4, 16, 1e-2
# (sequence_parallel, loss_parallel)
VARIANTS = [(False, False), (True, False), (True, True), (False, True)]
VARIANT_IDS = ["tp", "tp+sp", "tp+sp+lp", "tp+lp"]


def batches(vocab: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, vocab, (steps, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(123))
    return data[..., :-1], data[..., 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train_gpt(model: torch.nn.Module, loss_parallel: bool) -> list[float]:
    """STEPS of AdamW with gradient clipping (clip_grad_norm_ over DTensors included)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
    inputs, targets = batches(CFG.vocab_size, STEPS)
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = tp_loss(model(inputs[s]), targets[s], loss_parallel)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def gpt_stage_rank(mesh, rank: int) -> dict:
    """A middle pipeline stage (layer "1" only, no embeddings/norm/output) under TP+SP: the missing
    modules are skipped silently and the stage maps seq-sharded hidden states like the full stage."""
    torch.manual_seed(0)
    stage = GPT(CFG).double()
    del stage.layers["0"]
    stage.tok_embeddings = stage.norm = stage.output = None
    hidden = torch.randn(BATCH, SEQ, CFG.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_tensor_parallel(stage, mesh, GPT_SPEC, sequence_parallel=True)
    half = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2)
    return {"out": stage(hidden[:, half]).detach(), "hidden": hidden, "half": half,
            "warnings": [str(w.message) for w in caught if "could not be resolved" in str(w.message)]}


def record_input_seq(module: torch.nn.Module, seen: list) -> None:
    """Record the (local) sequence length of the first positional input: seq/tp when SP is on."""

    def hook(_module, args):
        seen.append(args[0].shape[1])

    module.register_forward_pre_hook(hook)


def gpt_rank(ctx) -> dict:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {}
    for sp, lp in VARIANTS:
        torch.manual_seed(0)
        model = apply_tensor_parallel(GPT(CFG).double(), mesh, GPT_SPEC, sequence_parallel=sp, loss_parallel=lp)
        block_seq = []
        record_input_seq(model.layers["1"], block_seq)
        logits = model(batches(CFG.vocab_size, 1)[0][0])
        losses = train_gpt(model, lp)
        out[(sp, lp)] = {
            "losses": losses,
            "params": {n: full(p) for n, p in model.named_parameters()},
            "placements": {n: repr(p.placements[0]) if isinstance(p, DTensor) else "plain"
                           for n, p in model.named_parameters()},
            "local_wq_rows": model.layers["0"].attention.wq.weight.to_local().shape[0],
            "block_seq": block_seq[0],
            "logits": "DTensor " + repr(logits.placements[0]) if isinstance(logits, DTensor) else "Tensor",
        }
    out["stage"] = gpt_stage_rank(mesh, ctx.rank)
    bad = GPTConfig(vocab_size=64, d_model=36, n_layers=1, n_heads=3, max_seq_len=16)
    sp_model = apply_tensor_parallel(GPT(CFG), mesh, GPT_SPEC, sequence_parallel=True)
    out["errors"] = {
        "heads": error_of(lambda: apply_tensor_parallel(GPT(bad), mesh, GPT_SPEC)),
        "seq": error_of(lambda: sp_model(torch.zeros(2, 15, dtype=torch.long))),
        "loss": error_of(lambda: tp_loss(torch.zeros(2, 4, 8), torch.zeros(2, 4, dtype=torch.long), True)),
    }
    return out


def error_of(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no ValueError"


@pytest.fixture(scope="module")
def gpt_results(ray_cluster, tmp_path_factory):
    return run_ranks(gpt_rank, 2, run_dir=tmp_path_factory.mktemp("tp_gpt"))


@pytest.fixture(scope="module")
def gpt_reference():
    torch.manual_seed(0)
    model = GPT(CFG).double()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
    inputs, targets = batches(CFG.vocab_size, STEPS)
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        loss = lm_loss(model(inputs[s]), targets[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_gpt_tp_matches_single_process(gpt_results, gpt_reference, variant):
    ref_losses, ref_params = gpt_reference
    sp, lp = variant
    # Without loss parallel everything is float64 (differences are reduction order, ~1e-14). lm_loss and
    # tp_loss both take the cross-entropy in float32; split over the vocab its sums round differently.
    atol = 2e-6 if lp else 1e-10
    for rank, result in enumerate(gpt_results):
        got = result[variant]
        assert torch.allclose(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=0, atol=atol), rank
        assert got["params"].keys() == ref_params.keys()
        for name, ref in ref_params.items():
            assert torch.allclose(got["params"][name], ref, rtol=0, atol=atol), (rank, name)
        # every parameter is a DTensor on the tp mesh, sharded as the plan says
        placements = got["placements"]
        assert "plain" not in placements.values()
        assert placements["tok_embeddings.weight"] == placements["output.weight"] == "Shard(dim=0)"
        assert placements["layers.0.attention.wq.weight"] == "Shard(dim=0)"
        assert placements["layers.1.feed_forward.w2.weight"] == "Shard(dim=1)"
        assert placements["layers.0.attention_norm.weight"] == placements["norm.weight"] == "Replicate()"
        assert got["local_wq_rows"] == CFG.d_model // 2
        assert got["block_seq"] == (SEQ // 2 if sp else SEQ)  # the residual stream is seq-sharded under SP
        assert got["logits"] == ("DTensor Shard(dim=2)" if lp else "Tensor")
    torch.manual_seed(0)
    init = GPT(CFG).double()  # training moved every weight, so the comparison is not vacuous
    assert all((p - ref_params[n]).abs().max() > 1e-4 for n, p in init.named_parameters())


def test_gpt_pipeline_stage_with_sequence_parallel(gpt_results):
    torch.manual_seed(0)
    ref = GPT(CFG).double()
    hidden = gpt_results[0]["stage"]["hidden"]
    h, cos, sin = hidden, ref.rope_cos[:SEQ], ref.rope_sin[:SEQ]
    expected = ref.layers["1"](h, cos, sin).detach()
    for result in gpt_results:
        stage = result["stage"]
        assert stage["warnings"] == []
        assert torch.allclose(stage["out"], expected[:, stage["half"]], rtol=0, atol=1e-12)


def test_tp_errors_name_the_problem_and_fix(gpt_results):
    for result in gpt_results:
        errors = result["errors"]
        assert "model.n_heads=3 across tp=2" in errors["heads"] and "choose tp from [1, 3]" in errors["heads"]
        assert "sequence (15 positions) across tp=2" in errors["seq"]
        assert "use a sequence length divisible by 2 or sequence_parallel=False" in errors["seq"]
        assert "needs vocab-sharded DTensor logits" in errors["loss"]


# (attention implementation, sequence_parallel, loss_parallel, tie_word_embeddings)
LLAMA_VARIANTS = [("sdpa", False, False, False), ("sdpa", True, False, False), ("sdpa", True, True, False),
                  ("eager", True, False, False), ("sdpa", True, True, True)]


def build_llama(attn: str, tied: bool = False, heads: int = 4, kv_heads: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      attn_implementation=attn, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).double()


def llama_step(model, loss_parallel: bool) -> tuple[torch.Tensor, float]:
    """Logits of one forward, then one SGD step on its loss."""
    tokens = torch.randint(0, 128, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    loss = tp_loss(logits, tokens[:, 1:], loss_parallel)
    loss.backward()
    opt.step()
    return full(logits), loss.item()


def llama_rank(ctx) -> dict:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {}
    for attn, sp, lp, tied in LLAMA_VARIANTS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = apply_tensor_parallel(build_llama(attn, tied), mesh, LLAMA, sequence_parallel=sp, loss_parallel=lp)
        block_seq = []
        record_input_seq(model.model.layers[1], block_seq)
        logits, loss = llama_step(model, lp)
        out[(attn, sp, lp, tied)] = {
            "logits": logits, "loss": loss, "params": {n: full(p) for n, p in model.named_parameters()},
            "q_rows": model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0],
            "block_seq": block_seq[0],
            "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
            "still_tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "unresolved": [str(w.message) for w in caught if "could not be resolved" in str(w.message)],
        }
    out["error"] = error_of(lambda: apply_tensor_parallel(build_llama("sdpa", heads=6, kv_heads=3, hidden=48), mesh,
                                                          LLAMA))
    return out


def test_hf_llama_tp_matches_unsharded(ray_cluster, tmp_path):
    results = run_ranks(llama_rank, 2, run_dir=tmp_path)
    refs = {}
    for attn, tied in {(v[0], v[3]) for v in LLAMA_VARIANTS}:
        model = build_llama(attn, tied)
        logits, loss = llama_step(model, False)
        refs[attn, tied] = logits, loss, {n: p.detach() for n, p in model.named_parameters()}
    for result in results:
        assert "num_key_value_heads=3 across tp=2" in result.pop("error")
        for variant, got in result.items():
            ref_logits, ref_loss, ref_params = refs[variant[0], variant[3]]
            assert torch.allclose(got["logits"], ref_logits, rtol=0, atol=1e-12), variant
            # lm_loss/tp_loss take the cross-entropy in float32 (loss parallel splits its sums)
            assert abs(got["loss"] - ref_loss) < 2e-6, variant
            assert got["q_rows"] == 2 * 16  # 2 of the 4 query heads (head_dim 16) per rank
            assert got["block_seq"] == (SEQ // 2 if variant[1] else SEQ), variant
            assert got["all_dtensor"] and got["unresolved"] == [], variant
            assert got["still_tied"] == variant[3]
            for name, ref in ref_params.items():
                # LlamaRMSNorm computes in float32: its gradient rounds to float32 (lr 0.1 * ~1e-8)
                assert torch.allclose(got["params"][name], ref, rtol=0, atol=1e-8), (variant, name)


def test_tp_loss_without_loss_parallel_is_lm_loss():
    logits = torch.randn(2, 4, 8, dtype=torch.float64)
    targets = torch.randint(0, 8, (2, 4))
    assert torch.equal(tp_loss(logits, targets, False), lm_loss(logits, targets))
