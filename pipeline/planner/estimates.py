"""The memory estimates: bytes per component for fine-tuning and for inference, from a model's shape and a setup.

Training: weights, gradients, optimizer state, the optimizer step's temporaries, activations and logits, peaking at
the start of the backward pass or at the optimizer step. Inference: weights, KV cache, one layer's activations and
the last position's logits. The formulas are in the package's docstring (`pipeline.planner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.planner.errors import PlannerError
from pipeline.planner.setup import TrainingSetup
from pipeline.planner.shape import LinearShape, ModelShape

LOGIT_COPIES = 3
"""Float32 copies of the logits alive at the start of the backward pass: logits, log-softmax, its gradient."""


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
