"""Parameter names as the unwrapped model has them: what checkpoints, weight files and init seeds key on.

    clean_fqn("layers.3._checkpoint_wrapped_module.attention.wq.weight") == "layers.3.attention.wq.weight"

Wrappers insert a segment into ``named_parameters()`` names: activation checkpointing's
``_checkpoint_wrapped_module.``, torch.compile's ``_orig_mod.``, DDP's leading ``module.``. Every mechanism that
keys on a parameter's name strips them here, so a name is the same under every plan.
"""

from __future__ import annotations

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_fqn(fqn: str) -> str:
    """A parameter's name without wrapper segments and without DDP's leading ``module.``."""
    for segment in WRAPPER_SEGMENTS:
        fqn = fqn.replace(segment, "")
    return fqn.removeprefix("module.")
