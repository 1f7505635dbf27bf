"""torch.compile applied to a model part from outside, as torchtitan does it.

    apply_compile(part, "blocks")     # each repeated block compiled on its own (model.layers / model.model.layers)
    apply_compile(part, "model")      # the whole part as one compiled region

``blocks`` compiles every transformer block separately (``nn.Module.compile``: in place, so parameter names,
checkpoints and hooks are unchanged); one block's graph is reused by every block of the same structure, so the
compile time is that of one block, not of the model. It is applied after tensor, context parallelism and
activation checkpointing and before FSDP2 / DDP (torchtitan's order: the compiled region then contains the
block's DTensor ops and its checkpoint, and FSDP2's all-gathers stay outside it). ``model`` compiles the whole
part (a model or a pipeline stage) once.

Shapes are static (``dynamic=False``): a training step always sees the same batch and sequence shape, and a
changed shape is then a visible recompilation rather than a slower dynamic-shape graph.
"""

from __future__ import annotations

from plait.parallel.activation_checkpoint import block_container
from torch import nn

MODES = ("off", "blocks", "model")


def apply_compile(part: nn.Module, mode: str, *, fullgraph: bool = True) -> nn.Module:
    """Compile ``part`` in place according to ``mode``; returns ``part``."""
    if mode not in MODES:
        raise ValueError(f"plan.compile={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return part
    if mode == "model":
        part.compile(fullgraph=fullgraph, dynamic=False)
        return part
    layers, keys = block_container(part, "plan.compile='blocks'", "plan.compile='model' or 'off'")
    for key in keys:
        block = layers[key] if isinstance(layers, nn.ModuleDict) else layers[int(key)]
        if any(True for _ in block.parameters()):  # a layer another pipeline stage holds has nothing to run
            block.compile(fullgraph=fullgraph, dynamic=False)
    return part
