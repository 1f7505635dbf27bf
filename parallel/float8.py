"""Float8 linears (``plan.float8``): the transformer blocks' ``nn.Linear`` layers trained in float8 through
torchao's float8 training (``torchao.float8``), the way torchtitan applies it.

    model = build_model()
    convert_model(model, "tensorwise", device, fsdp=True)   # before tensor parallelism and FSDP2
    ...                                                     # TP (float8 styles), FSDP2, optimizer
    after_optimizer_step(modules, plan)                     # float8 all-gather's scales (FSDP2 + tensorwise)

Recipes (torchao's names): ``tensorwise`` (one dynamic scale per tensor) and ``rowwise`` (one per row, scales
rounded to powers of two). Which linears: those inside the blocks (an FQN with a ``layers`` part) whose in
and out features are both divisible by 16 (the float8 matmul's tile rule); the embeddings and the output head
stay as they are (torchtitan's filter). Each converted linear keeps float32 (or bf16) master weights: float8
is the matmuls' input format, so the parameters, gradients and optimizer states keep their bytes.

Where it runs: an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell), or the CPU in
torchao's emulation mode (``emulate=True``: the float8 casts and scales are real, the matmul is done in high
precision), which is what the tests use. Anything else is refused before the model is built.

Composition (torchtitan's): the conversion happens right after the model is built, before pipeline cuts,
tensor parallelism and FSDP2. FSDP2 with ``tensorwise`` all-gathers the weights in float8
(``enable_fsdp_float8_all_gather``) and the scales are precomputed for the next step after each optimizer step
(``precompute_float8_dynamic_scale_for_fsdp``). Tensor parallelism with ``tensorwise`` uses torchao's
``Float8ColwiseParallel`` / ``Float8RowwiseParallel`` in place of the ordinary styles for converted linears
(``float8_styles``); ``rowwise`` keeps the ordinary styles (as torchtitan does). DeepSpeed ZeRO (which keeps
its own module copies and knows no Float8Linear) and float64 models are refused (``float8_violations``).

torchao is imported only when a recipe other than ``off`` is used.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

RECIPES = ("off", "tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell
ALIGN = 16  # torch._scaled_mm needs both matmul dims divisible by 16
DTYPES = ("float32", "bfloat16")  # master weights torchao's Float8Linear trains


def converts(module: nn.Module, fqn: str) -> bool:
    """torchao's ``module_filter_fn``: a Linear inside the blocks, both dims divisible by ALIGN."""
    inside = fqn.startswith("layers.") or ".layers." in fqn
    return (isinstance(module, nn.Linear) and inside and module.in_features % ALIGN == 0
            and module.out_features % ALIGN == 0)


def device_refusal(recipe: str, device: torch.device | str) -> str | None:
    """Why ``recipe`` cannot run on ``device`` (a message naming the device and the fix), or None."""
    device = torch.device(device)
    if recipe == "off" or device.type == "cpu":
        return None
    if device.type != "cuda":
        return (f"plan.float8={recipe!r} runs on an NVIDIA GPU of compute capability >= 8.9 or on the CPU (torchao's "
                f"emulation mode), not on {device.type!r}: use plan.float8=\"off\"")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"plan.float8={recipe!r}: float8 matmuls need an NVIDIA GPU of compute capability >= 8.9 (Ada, "
                f"Hopper, Blackwell), and {name} is {capability[0]}.{capability[1]}: use plan.float8=\"off\" "
                "(mixed_precision=\"bf16\" is the fast path on this GPU)")
    return None


def float8_violations(recipe: str, engine: str, model_dtype: Any = None) -> list[str]:
    """What float8 training cannot compose with (plan.py turns each into a PlanError)."""
    if recipe == "off":
        return []
    out = []
    if engine.startswith("zero"):
        out.append(f"plan.float8={recipe!r} with plan.engine={engine!r}: DeepSpeed ZeRO keeps its own copies of the "
                   "module's weights and knows nothing of torchao's Float8Linear; use engine=\"fsdp2\" (float8 "
                   "all-gather with tensorwise) or \"ddp\", or plan.float8=\"off\"")
    if model_dtype is not None:
        name = str(model_dtype).removeprefix("torch.")
        name = "float32" if name == "float" else name
        if name not in DTYPES:
            out.append(f"plan.float8={recipe!r} trains float32 or bfloat16 master weights through float8 matmuls, "
                       f"but the model is {name}: build it in float32 (train.dtype=float32) or use "
                       "plan.float8=\"off\"")
    return out


def float8_config(recipe: str, *, emulate: bool, fsdp_all_gather: bool):
    """torchao's Float8LinearConfig for ``recipe``; the float8 all-gather only where torchao has it (tensorwise)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_all_gather and recipe == "tensorwise")


def convert_model(model: nn.Module, recipe: str, device: torch.device | str, *, fsdp: bool = False) -> int:
    """Swap the blocks' linears of ``model`` (in place) for torchao's Float8Linear; returns how many.
    ``fsdp``: FSDP2 will shard the model (tensorwise then all-gathers in float8). Raises ValueError for a
    device that cannot run it, a float64 linear, or a model with no linear to convert."""
    if recipe == "off":
        return 0
    if recipe not in RECIPES:
        raise ValueError(f"plan.float8={recipe!r} is not one of: {', '.join(RECIPES)}")
    refusal = device_refusal(recipe, device)
    if refusal:
        raise ValueError(refusal)
    targets = [fqn for fqn, m in model.named_modules() if converts(m, fqn)]
    if not targets:
        raise ValueError(f"plan.float8={recipe!r}: {type(model).__name__} has no Linear inside its blocks "
                         f"('layers.') with both dims divisible by {ALIGN}, so nothing would run in float8; use "
                         "plan.float8=\"off\"")
    wrong = sorted({str(model.get_submodule(f).weight.dtype).removeprefix("torch.") for f in targets} - set(DTYPES))
    if wrong:
        raise ValueError(float8_violations(recipe, "ddp", wrong[0])[0])
    from torchao.float8 import convert_to_float8_training

    config = float8_config(recipe, emulate=torch.device(device).type == "cpu", fsdp_all_gather=fsdp)
    convert_to_float8_training(model, config=config, module_filter_fn=converts)
    return len(targets)


def float8_linears(model: nn.Module) -> list[str]:
    """FQNs of the Float8Linear modules in ``model``."""
    from torchao.float8.float8_linear import Float8Linear

    return [fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)]


def _all_gathers_in_float8(module: nn.Module) -> bool:
    config = next((m.config for m in module.modules() if type(m).__name__ == "Float8Linear"), None)
    return bool(config is not None and config.enable_fsdp_float8_all_gather)


def after_optimizer_step(modules: list[nn.Module]) -> None:
    """FSDP2 + float8 all-gather: one all-reduce of every converted weight's amax, so the next forward's
    all-gather casts with a ready scale (torchao's ``precompute_float8_dynamic_scale_for_fsdp``)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for module in modules:
        if _all_gathers_in_float8(module):
            precompute_float8_dynamic_scale_for_fsdp(module)


def float8_styles(module: nn.Module, plan: dict) -> dict:
    """``plan`` (FQN -> ParallelStyle, relative to ``module``) with torchao's float8 TP styles in place of plain
    ColwiseParallel / RowwiseParallel wherever the target is a tensorwise Float8Linear (same layouts)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    swapped = dict(plan)
    for fqn, style in plan.items():
        target = module.get_submodule(fqn) if _has(module, fqn) else None
        if type(target).__name__ != "Float8Linear" or type(style) not in (ColwiseParallel, RowwiseParallel):
            continue
        if target.config.cast_config_weight.scaling_granularity.value != "tensorwise":
            continue  # rowwise: the ordinary styles (torchtitan)
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        cls = Float8ColwiseParallel if type(style) is ColwiseParallel else Float8RowwiseParallel
        swapped[fqn] = cls(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                           use_local_output=style.use_local_output)
    return swapped


def _has(module: nn.Module, fqn: str) -> bool:
    try:
        module.get_submodule(fqn)
    except AttributeError:
        return False
    return True
