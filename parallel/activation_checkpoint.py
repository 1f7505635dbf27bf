"""Activation checkpointing for models whose repeated blocks live in ``model.layers`` (or, for a Hugging
Face decoder and its pipeline stages, ``model.model.layers``).

    apply_activation_checkpointing(model, "full")        # or "selective" / "off"

``full`` wraps every block, ``selective`` every other block (those whose index is even: the
ModuleDict key, i.e. the *global* layer index for a pipeline stage cut from a GPT, or the position
in a ModuleList), with torch's ``checkpoint_wrapper`` (non-reentrant, RNG state preserved, so
recomputation reproduces dropout-style randomness and the gradients equal the unwrapped model's).
A wrapped block keeps only its inputs during forward and recomputes its activations in backward.

Names. The wrapper is set back under the same key (``layers.3`` stays ``layers.3``), but the block's
own submodules move one level down: ``named_parameters()`` reports
``layers.3._checkpoint_wrapped_module.attention.wq.weight``. ``state_dict()`` / ``load_state_dict()``
strip and re-add that prefix (hooks registered by ``checkpoint_wrapper``), so checkpoint keys are
unchanged; code that keys on ``named_parameters()`` FQNs should strip ``_CHECKPOINT_PREFIX`` (see
``clean_fqn``). Apply it after tensor parallelism and before FSDP2, as torchtitan does.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

MODES = ("off", "full", "selective")


def wrapped_indices(keys: list[str], mode: str) -> list[str]:
    """Which block keys ``mode`` checkpoints: all for "full", even indices for "selective", none for "off"."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return []
    if mode == "full":
        return list(keys)
    return [k for k in keys if int(k) % 2 == 0]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Wrap ``model.layers`` blocks in place according to ``mode``; returns ``model``.

    Idempotent: blocks that are already wrapped are left alone."""
    wrapped_indices([], mode)  # raises on an unknown mode
    if mode == "off":
        return model
    layers, keys = block_container(model, "activation checkpointing", "activation_checkpointing='off'")
    for key in wrapped_indices(keys, mode):
        block = layers[key] if isinstance(layers, nn.ModuleDict) else layers[int(key)]
        if isinstance(block, CheckpointWrapper) or not any(True for _ in block.parameters()):
            continue  # already wrapped, or a layer another pipeline stage owns (nothing to recompute)
        wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True)
        if isinstance(layers, nn.ModuleDict):
            layers[key] = wrapped
        else:
            layers[int(key)] = wrapped
    return model


def block_container(model: nn.Module, what: str, instead: str) -> tuple[nn.Module, list[str]]:
    """(the container of a model's repeated blocks, their keys): ``model.layers`` or, for a HF decoder causal LM
    and its pipeline stages, ``model.model.layers`` (a ModuleDict or ModuleList). ``what`` needs them; ``instead``
    is the setting that does without (both name the fix in the error)."""
    layers = getattr(model, "layers", None)
    if layers is None and isinstance(getattr(model, "model", None), nn.Module):
        layers = getattr(model.model, "layers", None)  # a HF decoder causal LM: model.model.layers
    if isinstance(layers, nn.ModuleDict):
        return layers, list(layers.keys())
    if isinstance(layers, nn.ModuleList):
        return layers, [str(i) for i in range(len(layers))]
    raise TypeError(f"{what} needs the blocks in model.layers or model.model.layers (a ModuleDict or ModuleList); "
                    f"{type(model).__name__}.layers is {type(layers).__name__}: put the repeated blocks there, "
                    f"or set {instead}")


def clean_fqn(name: str) -> str:
    """A parameter name without checkpoint_wrapper's ``_checkpoint_wrapped_module.`` component."""
    return name.replace(_CHECKPOINT_PREFIX, "")
