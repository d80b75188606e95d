"""Will it fit? Memory estimates for inference and fine-tuning from a model's config alone, plus a probe for time.

In: a model (an alias such as `smollm2-135m-instruct`, a hub id, a local folder, a
`config.json` path or a transformers config object) and a `TrainingSetup` (method,
batch size, sequence length, optimizer, precision, gradient checkpointing, LoRA rank).
Out: a `Plan`: bytes per component for inference and for training, whether each fits a
device, and, when training does not, what each change would give and the fewest changes
that make it fit. No weights are loaded: the model is built on PyTorch's meta device
(shapes, no storage), so a laptop answers for a 7B model in seconds.

The estimates (all in bytes; P = parameters, T = trainable parameters, n = batch x
sequence tokens, L = layers, h = hidden size, I = MLP intermediate size, a = heads,
s = sequence length, V = vocabulary):

* weights: P x 4 (float32 and mixed precision keep float32 weights; mixed adds the
  16-bit copies autocast makes, 2 more bytes per parameter) or P x 2 (16-bit weights);
* gradients: T x the weight bytes (float32 for mixed precision);
* optimizer state: AdamW two moments (8 bytes per trainable parameter in float32, 4 when
  the weights themselves are 16-bit, because torch keeps the moments in the parameter's
  dtype; 2 for 8-bit AdamW); Adafactor a factored second moment, rows + columns per
  matrix (computed from the real parameter shapes); SGD none (4 bytes with momentum);
* activations: what autograd saves for the backward pass, per layer and token
  `9h + 4I` values for a gated MLP (SwiGLU: Llama, Mistral, Qwen, Gemma) or `9h + 2I`
  for a plain one (GPT-2, GPT-NeoX), plus `2as` with eager (non-fused) attention; times
  L x n x 2 bytes (16-bit compute) or 4 (float32). For a GPT block (I = 4h) in 16-bit
  this is `34 s b h` bytes per layer, the estimate of Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models"), whose `5 a s^2 b`
  term only applies to eager attention. The counts were checked against the tensors
  autograd saves (torch.autograd.graph.saved_tensors_hooks) for Llama and GPT-NeoX:
  within 6% (tests/unit/test_planner.py). Gradient checkpointing keeps each layer's input (L x n x h) plus
  one layer's full activations while it is recomputed;
* logits: n x V x 4 x 3: the loss runs in float32 and, at the start of the backward
  pass, the logits, their log-softmax and its gradient are alive together (measured:
  3.0 copies per token on the tiny model, where logits dominate).

Training peaks at one of two moments, and the estimate is the larger: the start of the
backward pass (weights + optimizer state + activations + logits + the output layer's
gradient, the first one computed) or the optimizer step (weights + gradients + optimizer
state + its temporaries: torch's multi-tensor AdamW makes one more state-sized copy). In
between, each layer's activations are freed as its gradients are allocated. Inference = weights +
KV cache (2 x L x kv-heads x head-dim x s x b) + one layer's working activations + the last
position's logits. `reserve` (default 10%) of the device stays free for the CUDA context, the
caching allocator and fragmentation.

Time: `finetune.probe.probe_training` trains the model for a few steps on this machine
through the pipeline's own training code (tasks/train/) on fixed-length random rows and
reports the measured peak memory and non-padding tokens per second; it lives with the
entry points, above the stages it runs, so this module stays below them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Method = Literal["full", "lora"]
Precision = Literal["float32", "mixed", "bfloat16", "float16"]
Optimizer = Literal["adamw", "adamw_8bit", "adafactor", "sgd", "sgd_momentum"]
Attention = Literal["sdpa", "eager"]

PRECISIONS: tuple[str, ...] = ("float32", "mixed", "bfloat16", "float16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit", "adafactor", "sgd", "sgd_momentum")
# The Trainer's optimizer names (train.optim) and their family here.
OPTIMIZER_ALIASES: dict[str, str] = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adam": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    **{name: name for name in OPTIMIZERS},
}
LOGIT_COPIES = 3
"""Float32 copies of the logits alive at the start of the backward pass: logits, log-softmax, its gradient."""
DEFAULT_RESERVE = 0.1
"""Share of the device's memory kept free (CUDA context, caching allocator, fragmentation)."""

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


class PlannerError(ValueError):
    """A planner input that cannot be used (a memory size, a model without the needed sizes); says what was found."""


# --------------------------------------------------------------------------- sizes


def parse_memory(text: str | int | float) -> int:
    """Bytes in a memory size: '16GB' (10^9), '16GiB' (2^30), '24G' (a bare letter is binary, as in `free -g`),
    '512MiB', 2048.

    Raises PlannerError naming the text and the accepted forms.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = _MEMORY.match(text)
    if not match:
        raise PlannerError(
            f"memory size: expected a number with an optional unit like 16GB, 16GiB, 24G or 512MiB, found {text!r}"
        )
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    # 'GiB' and a bare 'G' are powers of two; 'GB' is SI (a "16 GB" V100 holds 16 GiB: say 16GiB for it).
    if binary or (prefix and not byte):
        return int(float(number) * 1024 ** " kmgt".index(prefix))
    return int(float(number) * _UNITS[prefix])


def format_bytes(count: float) -> str:
    """'3.52 GiB' style (binary units), for people."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


# --------------------------------------------------------------------------- the model's shape


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


# --------------------------------------------------------------------------- setups and estimates


@dataclass(frozen=True)
class TrainingSetup:
    """How a model is trained, as far as memory goes."""

    method: Method = "full"
    batch_size: int = 1
    seq_len: int = 512
    optimizer: Optimizer = "adamw"
    precision: Precision = "float32"
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] | None = None
    attention: Attention = "sdpa"

    def describe(self) -> str:
        """E.g. 'full, adamw, float32, batch 8 x 128 tokens'."""
        extras = [f"LoRA r={self.lora_r}"] if self.method == "lora" else []
        extras += ["gradient checkpointing"] if self.gradient_checkpointing else []
        extras += ["eager attention"] if self.attention == "eager" else []
        return ", ".join(
            [self.method, self.optimizer, self.precision, f"batch {self.batch_size} x {self.seq_len} tokens", *extras]
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component (in order) with a one-line explanation each, and the peak.

    `phases` (name -> bytes) are the moments memory can peak at; `total` is the largest
    of them, or the sum of the components when there are no phases (inference).
    """

    what: str
    components: dict[str, int]
    notes: dict[str, str]
    trainable_parameters: int = 0
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The peak: the largest phase, else all components added."""
        return max(self.phases.values()) if self.phases else sum(self.components.values())


def weight_bytes(precision: str) -> int:
    """Bytes per stored weight: 2 for 16-bit weights, 4 for float32 (mixed precision keeps float32 weights)."""
    return 2 if precision in ("bfloat16", "float16") else 4


def compute_bytes(precision: str) -> int:
    """Bytes per saved activation: 4 in float32, 2 when matmuls run in 16-bit (mixed or 16-bit weights)."""
    return 4 if precision == "float32" else 2


def update_temporary_bytes(shape: ModelShape, setup: TrainingSetup, trainable: int) -> int:
    """Memory the optimizer step allocates on top of its state.

    torch's AdamW in its multi-tensor form (the default on GPUs) builds sqrt(second moment)
    for every parameter at once: one more state-sized copy. On a CPU torch loops over the
    parameters instead, so when the optimizer step is the peak the CPU measures about 10%
    less than this. Adafactor works one parameter at a time (two copies of the largest);
    SGD updates in place.
    """
    if setup.optimizer in ("adamw", "adamw_8bit"):
        return trainable * weight_bytes(setup.precision)
    if setup.optimizer == "adafactor":
        largest = max((s.fan_in * s.fan_out for s in shape.adaptable), default=0) if setup.method == "full" else 0
        return 2 * 4 * largest
    return 0


def optimizer_state_bytes(shape: ModelShape, setup: TrainingSetup, trainable: int, factored_values: int) -> int:
    """Optimizer state for `trainable` parameters (Adafactor: `factored_values` second-moment values)."""
    state = weight_bytes(setup.precision)  # torch keeps optimizer moments in the parameter's dtype
    if setup.optimizer == "adamw":
        return 2 * state * trainable
    if setup.optimizer == "adamw_8bit":
        return 2 * trainable
    if setup.optimizer == "adafactor":
        return 4 * factored_values  # Adafactor keeps its factored moments in float32
    if setup.optimizer == "sgd_momentum":
        return state * trainable
    return 0


def lora_modules(shape: ModelShape, setup: TrainingSetup) -> list[LinearShape]:
    """The modules LoRA adapts: `setup.lora_targets`, else the architecture's default (pipeline.lora, as in
    training)."""
    if setup.lora_targets:
        targets = list(setup.lora_targets)
    else:
        from pipeline.config import LoraConfig
        from pipeline.lora import lora_targets  # the one table of per-architecture targets, shared with training

        targets = lora_targets(shape.model_type, LoraConfig(r=setup.lora_r))
    # A target matches a module whose full name equals it or ends with '.<target>', as in peft.
    return [s for s in shape.adaptable if any(s.name == t or s.name.endswith(f".{t}") for t in targets)]


def trainable_parameters(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(trainable parameters, their Adafactor second-moment values): every weight, or LoRA's A and B matrices."""
    if setup.method == "full":
        return shape.parameters, shape.factored_state_values
    modules = lora_modules(shape, setup)
    if not modules:
        raise PlannerError(
            f"LoRA targets {list(setup.lora_targets or [])} match no module of this {shape.model_type} model"
        )
    r = setup.lora_r
    count = sum(r * (m.fan_in + m.fan_out) for m in modules)
    return count, sum((r + m.fan_in) + (m.fan_out + r) for m in modules)


def activation_values_per_token(shape: ModelShape, seq_len: int, attention: str = "sdpa") -> int:
    """Values autograd saves per token in one layer: 9h + 4I (gated MLP) or 9h + 2I, plus 2as for eager attention."""
    values = 9 * shape.hidden + (4 if shape.gated_mlp else 2) * shape.intermediate
    if attention == "eager":
        values += 2 * shape.heads * seq_len  # attention scores and probabilities, a x s per token
    return values


def estimate_training(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Bytes to fine-tune `shape` with `setup`: weights, gradients, optimizer state, activations, logits."""
    trainable, factored = trainable_parameters(shape, setup)
    wbytes, abytes = weight_bytes(setup.precision), compute_bytes(setup.precision)
    tokens = setup.batch_size * setup.seq_len
    per_layer = activation_values_per_token(shape, setup.seq_len, setup.attention)
    if setup.gradient_checkpointing:
        # Each layer's input stays; one layer's activations are rebuilt at a time in the backward pass.
        activations = (shape.layers * shape.hidden + per_layer) * tokens * abytes
        how = (
            f"{shape.layers} layer inputs x {shape.hidden} + one layer's {per_layer:,} values, "
            f"x {tokens:,} tokens x {abytes} bytes"
        )
    else:
        activations = shape.layers * per_layer * tokens * abytes
        how = f"{shape.layers} layers x {per_layer:,} values x {tokens:,} tokens x {abytes} bytes"
    weights = shape.parameters * wbytes + (2 * shape.parameters if setup.precision == "mixed" else 0)
    components = {
        "weights": weights,
        "gradients": trainable * wbytes,
        "optimizer state": optimizer_state_bytes(shape, setup, trainable, factored),
        "step temporaries": update_temporary_bytes(shape, setup, trainable),
        "activations": activations,
        "logits": tokens * shape.vocab * 4 * LOGIT_COPIES,
    }
    # The backward pass frees each layer's activations as it allocates that layer's gradients,
    # so memory peaks either as it starts (every activation, the logits and the output layer's
    # gradient, which comes first) or at the optimizer step (every gradient, state and temporary).
    output_gradient = shape.vocab * shape.hidden * wbytes if setup.method == "full" else 0
    steady = components["weights"] + components["optimizer state"]
    phases = {
        "backward start": steady + activations + components["logits"] + output_gradient,
        "optimizer step": steady + components["gradients"] + components["step temporaries"],
    }
    notes = {
        "weights": f"{shape.parameters:,} parameters x {wbytes} bytes"
        + (" + 16-bit copies (2 bytes)" if setup.precision == "mixed" else ""),
        "gradients": f"{trainable:,} trainable x {wbytes} bytes",
        "optimizer state": _optimizer_note(setup, trainable),
        "step temporaries": {
            "adafactor": "Adafactor: 2 x the largest matrix in float32",
            "sgd": "none",
            "sgd_momentum": "none",
        }.get(setup.optimizer, f"AdamW: one more state-sized copy ({trainable:,} x {wbytes} bytes)"),
        "activations": how,
        "logits": (
            f"{tokens:,} tokens x {shape.vocab:,} vocab x 4 bytes x {LOGIT_COPIES} (logits, log-softmax, its gradient)"
        ),
    }
    return MemoryEstimate(
        what="training", components=components, notes=notes, trainable_parameters=trainable, phases=phases
    )


def _optimizer_note(setup: TrainingSetup, trainable: int) -> str:
    state = weight_bytes(setup.precision)
    return {
        "adamw": f"AdamW: 2 moments x {state} bytes per trainable parameter",
        "adamw_8bit": "8-bit AdamW: 2 bytes per trainable parameter",
        "adafactor": "Adafactor: factored second moment (rows + columns per matrix) x 4 bytes",
        "sgd_momentum": f"SGD with momentum: {state} bytes per trainable parameter",
        "sgd": "SGD: no state",
    }[setup.optimizer]


def estimate_inference(shape: ModelShape, batch_size: int, seq_len: int, dtype: str = "float16") -> MemoryEstimate:
    """Bytes to generate with `shape` in `dtype` for `batch_size` sequences of up to `seq_len` tokens."""
    wbytes = 4 if dtype == "float32" else 2
    tokens = batch_size * seq_len
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * wbytes
    # One layer at a time on the whole prompt: its input, attention output and MLP intermediates.
    working = tokens * (4 * shape.hidden + (3 if shape.gated_mlp else 2) * shape.intermediate) * wbytes
    return MemoryEstimate(
        what="inference",
        components={
            "weights": shape.parameters * wbytes,
            "KV cache": kv,
            "activations": working,
            "logits": batch_size * shape.vocab * 4,
        },
        notes={
            "weights": f"{shape.parameters:,} parameters x {wbytes} bytes ({dtype})",
            "KV cache": (
                f"2 x {shape.layers} layers x {shape.kv_heads} kv-heads x {shape.head_dim} "
                f"x {tokens:,} tokens x {wbytes} bytes"
            ),
            "activations": "one layer's working values on the whole prompt",
            "logits": f"last position only: {batch_size} x {shape.vocab:,} x 4 bytes",
        },
    )


# --------------------------------------------------------------------------- fitting and advice


@dataclass(frozen=True)
class Change:
    """One thing to change when training does not fit, with the pipeline setting that does it."""

    name: str
    setting: str
    applies: Callable[[TrainingSetup], bool] = field(repr=False)
    apply: Callable[[TrainingSetup], TrainingSetup] = field(repr=False)


CHANGES: tuple[Change, ...] = (
    Change(
        "gradient checkpointing",
        "train.gradient_checkpointing=true",
        lambda s: not s.gradient_checkpointing,
        lambda s: replace(s, gradient_checkpointing=True),
    ),
    Change(
        "batch size 1 (accumulate gradients instead)",
        "train.batch_size=1 + train.gradient_accumulation_steps=<old batch size>",
        lambda s: s.batch_size > 1,
        lambda s: replace(s, batch_size=1),
    ),
    Change(
        "bf16 mixed precision (16-bit activations)",
        "train.dtype=bfloat16 (on a GPU)",
        lambda s: s.precision == "float32",
        lambda s: replace(s, precision="mixed"),
    ),
    Change(
        "Adafactor instead of AdamW",
        "train.optim=adafactor",
        lambda s: s.optimizer in ("adamw", "adamw_8bit"),
        lambda s: replace(s, optimizer="adafactor"),
    ),
    Change("LoRA", "train.method=lora", lambda s: s.method == "full", lambda s: replace(s, method="lora")),
    Change(
        "bf16 weights (load and train the model in 16-bit)",
        "not a pipeline setting: load the model with dtype=bfloat16",
        lambda s: s.precision in ("float32", "mixed"),
        lambda s: replace(s, precision="bfloat16"),
    ),
)


@dataclass(frozen=True)
class Option:
    """A setup reached by some changes, its training estimate and whether it fits."""

    changes: tuple[Change, ...]
    setup: TrainingSetup
    estimate: MemoryEstimate
    fits: bool


@dataclass(frozen=True)
class Plan:
    """The planner's answer for one model and setup on one device."""

    shape: ModelShape
    setup: TrainingSetup
    device_bytes: int | None
    reserve: float
    inference_dtype: str
    inference: MemoryEstimate
    training: MemoryEstimate
    single_changes: tuple[Option, ...]
    fewest_changes: Option | None

    @property
    def usable_bytes(self) -> int | None:
        """Device bytes left after the reserve (None when no device size was given)."""
        return None if self.device_bytes is None else int(self.device_bytes * (1 - self.reserve))

    @property
    def inference_fits(self) -> bool | None:
        """Whether inference fits (None without a device size)."""
        return None if self.usable_bytes is None else self.inference.total <= self.usable_bytes

    @property
    def training_fits(self) -> bool | None:
        """Whether training as set up fits (None without a device size)."""
        return None if self.usable_bytes is None else self.training.total <= self.usable_bytes


def make_plan(
    shape: ModelShape,
    setup: TrainingSetup,
    device_bytes: int | None = None,
    reserve: float = DEFAULT_RESERVE,
    inference_dtype: str = "float16",
) -> Plan:
    """Estimate inference and training for `shape` and, when training does not fit `device_bytes`, what would.

    Every change in CHANGES that applies is tried alone, and every combination is tried
    for the fewest changes that fit (ties: the smallest estimate).
    """
    training = estimate_training(shape, setup)
    inference = estimate_inference(shape, setup.batch_size, setup.seq_len, inference_dtype)
    usable = None if device_bytes is None else int(device_bytes * (1 - reserve))
    singles: tuple[Option, ...] = ()
    fewest = None
    if usable is not None and training.total > usable:
        candidates = [c for c in CHANGES if c.applies(setup)]
        singles = tuple(_option(shape, setup, (c,), usable) for c in candidates)
        for size in range(1, len(candidates) + 1):
            fitting = [
                o
                for combo in itertools.combinations(candidates, size)
                if (o := _option(shape, setup, combo, usable)).fits
            ]
            if fitting:
                fewest = min(fitting, key=lambda o: o.estimate.total)
                break
    return Plan(
        shape=shape,
        setup=setup,
        device_bytes=device_bytes,
        reserve=reserve,
        inference_dtype=inference_dtype,
        inference=inference,
        training=training,
        single_changes=singles,
        fewest_changes=fewest,
    )


def _option(shape: ModelShape, setup: TrainingSetup, changes: tuple[Change, ...], usable: int) -> Option:
    changed = setup
    for change in changes:
        changed = change.apply(changed)
    estimate = estimate_training(shape, changed)
    return Option(changes=changes, setup=changed, estimate=estimate, fits=estimate.total <= usable)


def format_plan(plan: Plan) -> str:
    """The plan as text: the model, each estimate by component, fits or not, and what to change."""
    lines = [f"model   {plan.shape.describe()}"]
    if plan.device_bytes is not None:
        lines.append(
            f"device  {format_bytes(plan.device_bytes)} ({plan.device_bytes / 1e9:.2f} GB), "
            f"{plan.reserve:.0%} kept free -> {format_bytes(plan.usable_bytes or 0)} usable"
        )
    for estimate, fits, what in (
        (
            plan.inference,
            plan.inference_fits,
            f"{plan.inference_dtype}, batch {plan.setup.batch_size} x {plan.setup.seq_len} tokens",
        ),
        (plan.training, plan.training_fits, plan.setup.describe()),
    ):
        verdict = "" if fits is None else ("  fits" if fits else "  DOES NOT FIT")
        lines += ["", f"{estimate.what} ({what}): {format_bytes(estimate.total)}{verdict}"]
        lines += [
            f"  {name:<16} {format_bytes(size):>11}   {estimate.notes[name]}"
            for name, size in estimate.components.items()
        ]
        if estimate.phases:
            lines.append(
                "  peak = the larger of "
                + " and ".join(f"{name} {format_bytes(size)}" for name, size in estimate.phases.items())
            )
    if plan.single_changes:
        lines += ["", "training does not fit; each change alone:"]
        for option in plan.single_changes:
            lines.append(
                f"  {option.changes[0].name:<52} {format_bytes(option.estimate.total):>11}  "
                f"{'fits' if option.fits else 'does not fit'}   ({option.changes[0].setting})"
            )
        if plan.fewest_changes:
            names = " + ".join(c.name for c in plan.fewest_changes.changes)
            lines += ["", f"fewest changes that fit: {names} -> {format_bytes(plan.fewest_changes.estimate.total)}"]
            lines += [f"  {c.setting}" for c in plan.fewest_changes.changes]
        else:
            lines += [
                "",
                "no combination of these changes fits: use a smaller model, a larger device, several devices "
                "(FSDP/DeepSpeed through train.accelerate_config) or 4-bit weights (QLoRA)",
            ]
    return "\n".join(lines)


def plan_as_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON values (bytes as integers)."""

    def estimate(e: MemoryEstimate) -> dict[str, Any]:
        return {
            "total": e.total,
            "components": e.components,
            "phases": e.phases,
            "trainable_parameters": e.trainable_parameters,
        }

    return {
        "model": {k: v for k, v in plan.shape.__dict__.items() if k not in ("adaptable", "factored_state_values")},
        "setup": plan.setup.__dict__ | {"lora_targets": list(plan.setup.lora_targets or [])},
        "device_bytes": plan.device_bytes,
        "usable_bytes": plan.usable_bytes,
        "inference": estimate(plan.inference) | {"dtype": plan.inference_dtype, "fits": plan.inference_fits},
        "training": estimate(plan.training) | {"fits": plan.training_fits},
        "single_changes": [
            {"change": o.changes[0].name, "setting": o.changes[0].setting, "total": o.estimate.total, "fits": o.fits}
            for o in plan.single_changes
        ],
        "fewest_changes": None
        if plan.fewest_changes is None
        else {"changes": [c.name for c in plan.fewest_changes.changes], "total": plan.fewest_changes.estimate.total},
    }
