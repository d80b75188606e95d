"""The model's shape: the sizes the estimates need, read from the model built on the meta device (no weights).

`model_shape` counts the parameters of the skeleton itself and lists the modules LoRA can adapt; layers, hidden
size, heads, MLP size and vocabulary come from the transformers config (`load_model_config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.planner.errors import PlannerError


@dataclass(frozen=True)
class LinearShape:
    """A module LoRA can adapt: its full name and its input and output sizes."""

    name: str
    fan_in: int
    fan_out: int


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimates need, read from a model built on the meta device."""

    name: str
    model_type: str
    parameters: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    adaptable: tuple[LinearShape, ...] = field(repr=False)
    factored_state_values: int = field(repr=False)
    """Values in Adafactor's factored second moment for every parameter (rows + columns per matrix)."""

    def describe(self) -> str:
        """One line: name, type and sizes."""
        kv = f" (kv {self.kv_heads})" if self.kv_heads != self.heads else ""
        return (
            f"{self.name} ({self.model_type}): {self.parameters / 1e6:,.1f}M parameters, {self.layers} layers, "
            f"hidden {self.hidden}, heads {self.heads}{kv}, intermediate {self.intermediate}"
            f"{' (gated)' if self.gated_mlp else ''}, vocab {self.vocab:,}"
        )


def load_model_config(model: Any, trust_remote_code: bool = False) -> Any:
    """A transformers config for `model`: a config object (returned as is), a config.json path, or a spec.

    A spec is resolved like the pipeline's `model.name` (pipeline.assets.resolve_model:
    aliases, local folders, hub ids from the local cache when offline); only config.json
    is read.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    path = Path(str(model)).expanduser()
    if path.is_file():
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    from pipeline.assets import resolve_model

    return AutoConfig.from_pretrained(resolve_model(str(model)), trust_remote_code=trust_remote_code)


def model_shape(model: Any, trust_remote_code: bool = False, name: str | None = None) -> ModelShape:
    """Build `model` (see load_model_config) on the meta device and read its sizes; no weights, no memory.

    Parameters are counted from the skeleton itself (tied weights once), so the count is
    exact for any architecture transformers knows. Raises PlannerError for a config
    without a layer count, hidden size or vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(model, trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    sizes = _config_sizes(config)
    parameters = list(skeleton.parameters())  # shared (tied) parameters are listed once
    adaptable = tuple(_adaptable_shapes(skeleton))
    gated = _has_gated_mlp(adaptable, sizes["hidden"], sizes["intermediate"], sizes["layers"])
    label = name or (
        str(model) if not hasattr(model, "model_type") else getattr(model, "name_or_path", "") or config.model_type
    )
    return ModelShape(
        name=label,
        model_type=config.model_type,
        parameters=sum(p.numel() for p in parameters),
        gated_mlp=gated,
        adaptable=adaptable,
        factored_state_values=sum(_factored_values(p.shape) for p in parameters),
        **sizes,
    )


def _config_sizes(config: Any) -> dict[str, int]:
    """layers, hidden, heads, kv_heads, head_dim, intermediate and vocab from a transformers config."""

    def first(*names: str) -> int | None:
        for attribute in names:
            value = getattr(config, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    hidden = first("hidden_size", "n_embd", "d_model")
    vocab = first("vocab_size")
    missing = [
        label
        for label, value in (("num_hidden_layers", layers), ("hidden_size", hidden), ("vocab_size", vocab))
        if not value
    ]
    if missing:
        raise PlannerError(
            f"model config ({getattr(config, 'model_type', '?')}): expected {missing}, found none of them"
        )
    heads = first("num_attention_heads", "n_head") or 1
    head_dim = first("head_dim") or hidden // heads
    return {
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": first("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "intermediate": first("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        "vocab": vocab,
    }


def _adaptable_shapes(skeleton: Any) -> list[LinearShape]:
    """Linear, GPT-2 Conv1D and embedding modules with their sizes (what LoRA can adapt)."""
    import torch

    shapes = []
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes.append(LinearShape(name, module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Embedding):
            shapes.append(LinearShape(name, module.num_embeddings, module.embedding_dim))
        elif type(module).__name__ == "Conv1D":  # GPT-2 keeps its weight as (in, out)
            shapes.append(LinearShape(name, module.weight.shape[0], module.weight.shape[1]))
    return shapes


def _has_gated_mlp(adaptable: tuple[LinearShape, ...], hidden: int, intermediate: int, layers: int) -> bool:
    """True when each layer has two hidden -> intermediate projections (gate and up) or one fused into 2I."""
    up = sum(1 for s in adaptable if s.fan_in == hidden and s.fan_out == intermediate)
    fused = sum(1 for s in adaptable if s.fan_in == hidden and s.fan_out == 2 * intermediate)
    return up >= 2 * layers or fused >= layers


def _factored_values(shape: Any) -> int:
    """Adafactor's second-moment values for one parameter: rows + columns for a matrix, every value otherwise."""
    dims = list(shape)
    if len(dims) >= 2:
        return math.prod(dims[:-2]) * (dims[-2] + dims[-1])
    return math.prod(dims) if dims else 1
