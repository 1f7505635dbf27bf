"""Plait's GPT as a model family: its tensor-parallel plan, pipeline cut, HF (Llama) names, init and attention.

    spec = model_spec("gpt")          # registered on import; a spec's [model] table is its GPTConfig

The model is models/gpt.py (torchtitan's Llama names: ``tok_embeddings``, ``layers.<i>.attention.{wq,wk,wv,wo}``,
``layers.<i>.feed_forward.{w1,w2,w3}``, ``norm``, ``output``; layers in a ModuleDict keyed by global index).

Tensor parallelism (parallel/tensor_parallel.py's styles): per block the norms are ``norm_style``, attention and
feed-forward get their input Replicate (gathered under SP), wq wk wv w1 w3 are ColwiseParallel, wo w2 Rowwise to
the residual layout; top level: tok_embeddings Rowwise (vocab-sharded), norm, output ``output_style``. RoPE
under SP: the embedding output (or a middle stage's hidden input) holds seq/tp positions, so
``model.sequence_shards = tp`` makes the GPT build the tables for the gathered sequence, and a pre-hook on each
attention checks the lengths agree.

Weights in and out of HF folders: a GPT is a Llama (``LlamaForCausalLM``) with q/k rows permuted (the GPT
rotates interleaved pairs (2j, 2j+1), HF halves (j, j + head_dim/2)).

Mixture of experts (``n_experts > 0``): the block's ``moe`` (models/moe.py) is replicated over tp; ``experts``
names ``moe.experts`` for expert parallelism (a dense GPT has none); no HF layout (export and HF folders refused).

Attention: ``Attention.attend(q, k, v)`` is the core ring attention replaces; explicit positions come as
``positions``; ``model(tokens, start_pos=s, cache=c)`` runs tokens at positions s.. through a cache.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from plait.models.gpt import GPT, Attention, GPTConfig, rope_tables
from plait.models.hf.weights import WeightRef, load_hf_folder
from plait.models.moe import moe_block_style
from plait.models.spec import AttentionHooks, ModelSpec, register
from plait.parallel.float8 import float8_styles
from plait.parallel.kv_replication import check_divisible
from plait.parallel.names import clean_fqn
from plait.parallel.shape import DecoderShape
from plait.parallel.tensor_parallel import act_layout, norm_style, output_style, present, sequence_check
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module


def gpt_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False) -> tuple[dict, dict]:
    """(top-level plan for a GPT, plan for one ``layers.<i>`` block): FQN -> ParallelStyle."""
    sp, act = sequence_parallel, act_layout(sequence_parallel)
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
        "norm": norm_style(sp),
        "output": output_style(sp, loss_parallel),
    }
    block = {
        "attention_norm": norm_style(sp),
        "attention": PrepareModuleInput(input_layouts=(act, None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=act),
        "ffn_norm": norm_style(sp),
        "feed_forward": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=act),
        "feed_forward.w3": ColwiseParallel(),
        "moe": moe_block_style(sp),  # a mixture-of-experts block (n_experts > 0) is replicated over tp
    }
    return top, block


def _rope_length_check(_attention, args):
    """Under SP the GPT builds RoPE tables for the gathered sequence (``model.sequence_shards = tp``, set
    below), whatever its start position or positions; the attention input is gathered, so lengths match."""
    x, cos = args[0], args[1]
    if cos.shape[-2] != x.shape[1]:
        raise ValueError(f"RoPE tables cover {cos.shape[-2]} positions but the gathered attention input has "
                         f"{x.shape[1]}: under sequence parallelism call the GPT with the full sequence's tokens "
                         "or positions (model.sequence_shards says how many shards a hidden input is)")


def parallelize_gpt(model: GPT, mesh: DeviceMesh, sp: bool, lp: bool) -> None:
    """The GPT's tensor-parallel plan applied (in place) to a GPT or a pipeline stage of one."""
    cfg, tp = model.cfg, mesh.size()
    check_divisible({"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.kv_heads, "ffn hidden size": cfg.hidden}, tp)
    top, block_plan = gpt_tp_plan(sp, lp)
    if sp and model.tok_embeddings is not None:
        model.register_forward_pre_hook(sequence_check(tp))
    parallelize_module(model, mesh, present(model, top))
    if sp:
        model.sequence_shards = tp
    for block in model.layers.values():
        # float8 TP styles where converted; a dense or an MoE block keeps the entries of the modules it has
        parallelize_module(block, mesh, float8_styles(block, present(block, block_plan)))
        if sp:
            block.attention.register_forward_pre_hook(_rope_length_check)


def cut_gpt_stage(model: GPT, layers: tuple[int, int], is_first: bool, is_last: bool) -> GPT:
    """Keep layers [start, stop) of a GPT (in place) and drop the embedding / head it does not own: a stage
    whose forward passes hidden states through."""
    start, stop = layers
    for key in list(model.layers.keys()):
        if not start <= int(key) < stop:
            del model.layers[key]
    if not is_first:
        model.tok_embeddings = None
    if not is_last:
        model.norm = None
        model.output = None
    return model


# Plait GPT -> HF Llama names (``layers.<i>.`` becomes ``model.layers.<i>.``).
GPT_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
GPT_BLOCK = {"attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
             "attention.wk.weight": "self_attn.k_proj.weight", "attention.wv.weight": "self_attn.v_proj.weight",
             "attention.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight"}
ROPE_PERMUTED = ("attention.wq.weight", "attention.wk.weight")


def gpt_to_llama_name(name: str) -> str:
    """The HF Llama checkpoint name of a Plait GPT parameter."""
    if name in GPT_TOP:
        return GPT_TOP[name]
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    if head != "layers" or rest not in GPT_BLOCK:
        raise KeyError(f"{name!r} is not a Plait GPT parameter name (expected e.g. layers.0.attention.wq.weight)")
    return f"model.layers.{index}.{GPT_BLOCK[rest]}"


def rope_rows(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF rows of GPT q/k rows: the GPT rotates interleaved pairs (2j, 2j+1), HF halves (j, j + head_dim/2)."""
    i = rows % head_dim
    return rows - i + i // 2 + (i % 2) * (head_dim // 2)


def gpt_weight_names(module: nn.Module) -> dict[str, WeightRef]:
    """GPT parameter name -> its HF Llama tensor (q/k rows permuted to HF's RoPE layout)."""
    gpt = _gpt(module)
    if gpt.cfg.n_experts:
        raise ValueError("a mixture-of-experts GPT (model.n_experts > 0) has no Hugging Face layout (it is not a "
                         "Llama): save DCP checkpoints (train.checkpoint_every) instead of export.hf / model.path")
    out = {}
    for name, _ in module.named_parameters():
        name = clean_fqn(name)
        rows = functools.partial(rope_rows, head_dim=gpt.cfg.head_dim) if name.endswith(ROPE_PERMUTED) else None
        out[name] = WeightRef(gpt_to_llama_name(name), rows)
    return out


def llama_config(cfg: GPTConfig) -> dict:
    """A HF ``LlamaConfig`` dict for a Plait ``GPTConfig`` (the same model once q/k rows are permuted)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False}


def _gpt(module: nn.Module) -> GPT:
    for sub in module.modules():
        if isinstance(sub, GPT):
            return sub
    raise TypeError(f"{type(module).__name__} holds no Plait GPT")


def reset_gpt_buffers(module: nn.Module) -> None:
    """The RoPE tables of every GPT under ``module`` (non-persistent: lost by ``to_empty``)."""
    for sub in module.modules():
        if isinstance(sub, GPT):
            cos, sin = rope_tables(sub.cfg.head_dim, sub.cfg.max_seq_len, sub.cfg.rope_theta)
            sub.rope_cos.copy_(cos)
            sub.rope_sin.copy_(sin)


def set_attention_core(model: nn.Module, core) -> None:
    """Every Attention's ``attend`` becomes ``core`` (None: the GPT's own causal SDPA again)."""
    for sub in model.modules():
        if isinstance(sub, Attention):
            if core is None:
                sub.__dict__.pop("attend", None)
            else:
                sub.attend = core


def cache_forward(model: nn.Module, tokens: torch.Tensor, cache, start: int) -> torch.Tensor:
    return model(tokens, start_pos=start, cache=cache)


class KeyPaddingCore:
    """An attention core that is causal SDPA and also hides padded keys (``key_valid`` (B, kv_len)); a query may
    always see itself, so a padded query gets a finite, unused output instead of NaN. One mask per forward, shared
    by the layers."""

    def __init__(self, key_valid: torch.Tensor):
        self.key_valid, self.mask = key_valid, None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_kw) -> torch.Tensor:
        n, kv_len = q.shape[-2], k.shape[-2]
        if self.mask is None or self.mask.shape[-2:] != (n, kv_len):
            query_pos = torch.arange(kv_len - n, kv_len, device=q.device)[:, None]
            key_pos = torch.arange(kv_len, device=q.device)[None, :]
            valid = self.key_valid[:, :kv_len].to(q.device)
            allowed = (key_pos <= query_pos) & (valid[:, None, :] | (key_pos == query_pos))  # (B, n, kv_len)
            self.mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~allowed, float("-inf"))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1])


def padded_forward(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache,
                   key_valid: torch.Tensor) -> torch.Tensor:
    """Left-padded rows through a cache: the GPT's attention has no padding mask, so for this call every
    Attention's core hides the padded keys (rows without padding keep the GPT's own attention)."""
    if bool(key_valid.all()):
        return model(tokens, positions=positions, cache=cache)
    set_attention_core(model, KeyPaddingCore(key_valid))
    try:
        return model(tokens, positions=positions, cache=cache)
    finally:
        set_attention_core(model, None)


def gpt_shape(cfg: GPTConfig) -> DecoderShape:
    return cfg.decoder_shape()


SPEC = register(ModelSpec(
    name="gpt", config_class=GPTConfig, build=GPT, shape=gpt_shape,
    tensor_parallel=parallelize_gpt, tp_plan=gpt_tp_plan,
    cut_stage=cut_gpt_stage, num_layers=lambda model: len(_gpt(model).layers),
    load_weights=lambda model, folder: load_hf_folder(model, folder, SPEC),
    weight_names=gpt_weight_names, export_config=llama_config, reset_buffers=reset_gpt_buffers,
    init_value=lambda model, name, shape, gen: _gpt(model).init_value(name, shape, gen),
    attention=AttentionHooks(set_core=set_attention_core, positions_kwarg="positions", cache_forward=cache_forward,
                             padded_forward=padded_forward),
    kv_projections=("attention.wk", "attention.wv"), lora_targets=("wq", "wk", "wv", "wo"),
    experts=("moe.experts",), routers=("moe.router",),
))
