"""Model families: one spec per family (models/spec.py), found by name or by a Hugging Face config's model_type
(models/registry.py)."""

from plait.models.registry import (  # noqa: F401 - the package's API
    estimate_for,
    known_families,
    known_model_types,
    model_spec,
    spec_for_config,
    spec_for_model,
)
from plait.models.spec import AttentionHooks, ModelSpec, model_params, register  # noqa: F401
