"""torch.compile applied to a model part from outside, as torchtitan does it.

    apply_compile(part, "blocks")     # each repeated block compiled on its own (model.layers / model.model.layers)
    apply_compile(part, "model")      # the whole part as one compiled region
    compile_violations(plan)          # the refusals, each naming why and a plan that works

``blocks`` compiles every transformer block separately, in place (the module's ``_call_impl``, as
``nn.Module.compile`` does: parameter names, checkpoints and hooks are unchanged); blocks of the same structure
share one graph, so the compile time is that of one block, not of the model (activation checkpointing
``selective`` makes two structures: two graphs). It is applied after tensor, context parallelism and activation
checkpointing and before FSDP2 / DDP (torchtitan's order: the compiled region holds the block's DTensor ops and
its checkpoint; FSDP2's all-gathers and DDP's bucket all-reduces stay outside, as hooks dynamo skips). ``model``
compiles the whole part (a model or a pipeline stage) once.

Shapes are static (``dynamic=False``): a training step always sees the same batch and sequence shape, and a
changed shape is then a visible recompilation (``graphs_compiled`` counts them) rather than a slower
dynamic-shape graph.

What does not trace, and what is done instead:
  * ring attention (cp > 1) sends and receives inside an autograd.Function, which dynamo refuses ("P2P
    compilation disabled"): its core is ``torch.compiler.disable``d (context_parallel.RingCore) and the blocks
    of a part with ring attention are compiled without ``fullgraph``: projections, norms, RoPE and the
    feed-forward compile, each attention core is a graph break that runs eagerly.
  * a block whose input is an ``AsyncCollectiveTensor`` (tensor parallelism: the vocab-parallel embedding's
    all-reduce or reduce-scatter is issued async_op=True and returned as one) gets a gradient from the compiled
    backward that torch 2.13 hands to the DTensor redistribute's backward as a plain tensor (AttributeError
    '_local_tensor'). Such inputs are waited for and copied (``clone``, one activation per step) before the
    compiled region is entered, so its inputs are plain tensors; the copy keeps the autograd edge.
  * refused (``compile_violations``): DeepSpeed ZeRO engines (they build the model their own way: the compile
    step never runs); ``model`` under FSDP2 (its per-block hooks are compiler-disabled: no full graph); cp with
    activation checkpointing (a graph break inside a checkpoint: dynamo leaves the whole block eager); a
    mixture-of-experts model (dropless routing reads per-expert counts on the host: a graph break per layer).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from plait.parallel.activation_checkpoint import block_container
from plait.parallel.context_parallel import uses_ring_attention
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor

MODES = ("off", "blocks", "model")


def compile_violations(plan: Any, experts: int = 0) -> list[str]:
    """Why ``plan.compile`` cannot run with the rest of ``plan`` (a ParallelPlan; empty: it can). Meant for the
    plan's ``check()``; an unknown mode is the plan's own one-of check. ``experts``: the model's experts per
    mixture-of-experts layer (0: dense, or unknown)."""
    mode = plan.compile
    if mode == "off" or mode not in MODES:
        return []
    out = []
    if experts:
        out.append(f"plan.compile={mode!r} with a mixture-of-experts model ({experts} experts per layer): dropless "
                   f"routing sizes each expert's token group, and the expert-parallel all-to-all its splits, from "
                   f"counts read on the host (.tolist(), a graph break; transformers' MoE blocks also read a "
                   f"ContextVar dynamo cannot trace), so no block would compile whole; use compile=\"off\" for MoE "
                   f"models")
    if plan.engine.startswith("zero"):
        out.append(f"plan.compile={mode!r} with engine={plan.engine!r}: a DeepSpeed ZeRO engine wraps the model "
                   f"itself and Plait's compile step never runs there (it would be silently eager); use "
                   f"engine=\"fsdp2\" (ZeRO-3's sharding) or \"ddp\" with compile={mode!r}, or compile=\"off\" with "
                   f"{plan.engine}")
    if mode == "model" and plan.engine == "fsdp2" and plan.dp * plan.cp > 1:
        out.append("plan.compile='model' with engine='fsdp2' (dp*cp > 1): FSDP2's per-block hooks are "
                   "torch.compiler.disable'd, so one graph for the whole model cannot hold them (dynamo stops at "
                   "'Attempted to call function marked as skipped'); use compile=\"blocks\" (each block compiled "
                   "inside its FSDP2 unit, as torchtitan does), or engine=\"ddp\" with compile=\"model\"")
    if plan.cp > 1 and plan.activation_checkpointing != "off":
        out.append(f"plan.compile={mode!r} with cp={plan.cp} and activation_checkpointing="
                   f"{plan.activation_checkpointing!r}: ring attention is a graph break, and dynamo cannot compile a "
                   f"checkpointed region with a graph break inside, so every checkpointed block would run eagerly "
                   f"(nothing compiled); use activation_checkpointing=\"off\" with cp and compile, or compile=\"off\"")
    return out


def apply_compile(part: nn.Module, mode: str, *, fullgraph: bool | None = None) -> nn.Module:
    """Compile ``part`` in place according to ``mode``; returns ``part``. ``fullgraph`` None: True, except where
    context parallelism made the attention cores ring attention (they stay eager: a graph break each)."""
    if mode not in MODES:
        raise ValueError(f"plan.compile={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return part
    if fullgraph is None:
        fullgraph = not uses_ring_attention(part)
    if mode == "model":
        compile_in_place(part, fullgraph)
        return part
    layers, keys = block_container(part, "plan.compile='blocks'", "plan.compile='model' or 'off'")
    for key in keys:
        block = layers[key] if isinstance(layers, nn.ModuleDict) else layers[int(key)]
        if any(True for _ in block.parameters()):  # a layer another pipeline stage holds has nothing to run
            compile_in_place(block, fullgraph)
    return part


def compile_in_place(module: nn.Module, fullgraph: bool) -> None:
    """``module.compile(fullgraph=..., dynamic=False)``, with AsyncCollectiveTensor inputs waited for first."""
    compiled = torch.compile(module._call_impl, fullgraph=fullgraph, dynamic=False)
    module._compiled_call_impl = _plain_inputs(compiled)  # what nn.Module.compile sets; __call__ runs it


def _plain_inputs(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})

    return call


def _plain(x: Any) -> Any:
    return x.clone() if isinstance(x, AsyncCollectiveTensor) else x


def compile_loss(loss_fn: Callable, mode: str) -> Callable:
    """parallelize's default loss (next-token cross-entropy), compiled when ``mode`` compiles anything: inductor
    fuses the log-softmax, the gather and their backward into one pass over the logits. Measured on this CPU (one
    process, forward + backward of the loss alone, CPU time): 24.8 -> 2.5 ms at vocab 256 (16 x 128 tokens) and
    260 -> 174 ms at vocab 32000 (4 x 256 tokens). Not under loss parallelism (vocab-sharded DTensor logits go
    through torch's loss_parallel), nor a caller's own loss, which is left as given."""
    if mode == "off":
        return loss_fn
    return torch.compile(loss_fn, dynamic=False)


def graphs_compiled() -> int:
    """How many graphs dynamo has captured in this process so far (a recompilation is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
