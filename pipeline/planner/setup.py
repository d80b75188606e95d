"""How a model is trained, as far as memory goes: `TrainingSetup` and the methods, precisions and optimizers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
