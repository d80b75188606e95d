"""LoRA's targets: which modules to adapt per architecture, and the check that the configured ones exist.

Shared by the train stage (it wraps the model with adapters on these modules) and the memory planner
(it counts their parameters), so both agree on what LoRA trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import LoraConfig

if TYPE_CHECKING:  # only annotations: the train stage imports this module before any model is built
    import torch

# LoRA targets per architecture (config.model_type): every attention projection, which
# adapts better than peft's default of q and v only at the same small cost.
ARCHITECTURE_LORA_TARGETS: dict[str, list[str]] = {
    **{
        name: ["q_proj", "k_proj", "v_proj", "o_proj"]
        for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "smollm3")
    },
    **{name: ["query_key_value"] for name in ("gpt_neox", "falcon", "bloom")},
    "gpt2": ["c_attn"],
    "phi3": ["qkv_proj", "o_proj"],
}


class LoraTargetError(ValueError):
    """`train.lora.target_modules` names modules the model does not have; the message lists the ones it has."""


def lora_targets(model_type: str, config: LoraConfig) -> list[str]:
    """The module names LoRA adapts: the configured ones, else the architecture's default.

    Raises LoraTargetError when neither this module nor peft knows the architecture.
    """
    if config.target_modules:
        return list(config.target_modules)
    if model_type in ARCHITECTURE_LORA_TARGETS:
        return ARCHITECTURE_LORA_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise LoraTargetError(
        f"train.lora.target_modules: no default for model type {model_type!r}; set the names of the "
        "modules to adapt (e.g. [q_proj, v_proj])"
    )


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the modules LoRA can adapt (linear, 1-D convolution and embedding layers)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return [
        name
        for name, module in model.named_modules()
        if name and (isinstance(module, kinds) or type(module).__name__ == "Conv1D")
    ]


def check_lora_targets(targets: list[str], module_names: list[str], model_type: str) -> None:
    """Raise LoraTargetError naming the model's module names when a target matches none of them.

    A target matches a module whose full name equals it or ends with '.<target>', as in peft.
    """
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in module_names)]
    if missing:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in module_names})
        raise LoraTargetError(
            f"train.lora.target_modules: {missing} not found in this {model_type} model; "
            f"its adaptable modules are {leaves}"
        )
