"""Finding a model family: by name, by a Hugging Face config's ``model_type``, or from a built model.

    spec = model_spec("gpt")            # or "llama", "phi3" ... (a family name or a HF model_type)
    spec = spec_for_config(hf_config)   # an unknown model_type is refused with the list of known ones
    spec = spec_for_model(model)

The built-in families are imported here, each registering itself (models/spec.py's ``register``); a family of
your own registers the same way when its module is imported.
"""

from __future__ import annotations

from typing import Any

from plait.models.spec import _BY_MODEL_TYPE, _BY_NAME, ModelSpec, model_params
from torch import nn


def known_families() -> list[str]:
    _load_builtin()
    return sorted(_BY_NAME)


def known_model_types() -> list[str]:
    _load_builtin()
    return sorted(_BY_MODEL_TYPE)


def model_spec(name: str) -> ModelSpec:
    """The spec registered under ``name`` (a family name or a HF model_type); ValueError naming the known ones."""
    _load_builtin()
    spec = _BY_NAME.get(name) or _BY_MODEL_TYPE.get(name)
    if spec is None:
        raise ValueError(f"no model family {name!r}: known families {', '.join(known_families())}; Hugging Face "
                         f"model types {', '.join(known_model_types())}. A new family is one file in plait/models "
                         "that builds a ModelSpec and calls plait.models.spec.register")
    return spec


def spec_for_config(config: Any) -> ModelSpec:
    """The spec of a model config: a Hugging Face config by its ``model_type`` (refused with the list of known
    types), or a family's own config dataclass (Plait's GPTConfig)."""
    _load_builtin()
    for spec in _BY_NAME.values():
        if spec.config_class is not None and isinstance(config, spec.config_class):
            return spec
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    raise ValueError(f"model_type {model_type!r} ({arch}) has no Plait model spec; known Hugging Face model types: "
                     f"{', '.join(known_model_types())}. Add one as a file in plait/models (see models/llama.py), or "
                     "train it with data parallelism only through parallelize(..., spec=None)")


def spec_for_model(model: nn.Module) -> ModelSpec:
    """The spec of a built model: by its HF config, or its family's model class (Plait's GPT)."""
    _load_builtin()
    for spec in _BY_NAME.values():
        if spec.config_class is not None and isinstance(getattr(model, "cfg", None), spec.config_class):
            return spec
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not a model of a registered family (no HF config, not Plait's "
                         f"GPT); known: {', '.join(known_families())}")
    return spec_for_config(config)


def estimate_for(config: Any, plan: Any, *, global_batch: int, seq_len: int, dtype: str = "float32",
                 optim_states: str = "fp32") -> list:
    """``parallel.estimate.estimate_memory`` for a model config of a registered family (RankMemory per rank)."""
    from plait.parallel.estimate import estimate_memory

    spec = spec_for_config(config)
    return estimate_memory(model_params(spec, config), spec.shape(config), plan, global_batch=global_batch,
                           seq_len=seq_len, dtype=dtype, optim_states=optim_states)


def _load_builtin() -> None:
    """Import the built-in families (each registers itself on import)."""
    import plait.models.gemma3  # noqa: F401
    import plait.models.gpt_spec  # noqa: F401
    import plait.models.llama  # noqa: F401
    import plait.models.mixtral  # noqa: F401
    import plait.models.phi3  # noqa: F401
    import plait.models.qwen3_moe  # noqa: F401
