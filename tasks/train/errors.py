"""Why training did not finish: the train stage's errors, and how a training process hands one to the task.

The process writes a known error (`KNOWN_ERRORS`) by name and message to `ERROR_FILE` and exits with
`EXIT_KNOWN_ERROR`; the task raises the same type again (`tasks.train.launch.training_failure`).
"""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.lora import LoraTargetError
from pipeline.models import MissingRequirement, UnsupportedPrecision

ERROR_FILE = "error.json"


EXIT_KNOWN_ERROR = 3


class TrainingError(RuntimeError):
    """Training did not finish; the message says why and ends with the training process's last lines."""


class TrainingOutOfMemory(TrainingError):
    """The device ran out of memory; the message suggests LoRA, a smaller batch, gradient checkpointing."""


# Errors the training process reports by name (in error.json) so the task re-raises the same type.
KNOWN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (TrainingOutOfMemory, LoraTargetError, MissingRequirement, UnsupportedPrecision, TrainingError)
}


def out_of_memory_error(
    config: TrainConfig, device: str, cause: BaseException, weights: str = "float32"
) -> TrainingOutOfMemory:
    """The TrainingOutOfMemory for a run with `config` over `weights` (model.dtype) on `device`, with what to
    change."""
    hints = []
    if weights == "float32":
        hints.append(
            "model.dtype=bfloat16 (16-bit weights: half the memory for weights, and for full fine-tuning "
            "for gradients and AdamW's moments too)"
        )
    if config.method == "full":
        hints.append(
            "train.method=lora (only small adapters train: no gradients or optimizer state for the base weights)"
        )
    if config.batch_size > 1:
        hints.append(
            f"a smaller train.batch_size (now {config.batch_size}) with a larger train.gradient_accumulation_steps "
            f"(now {config.gradient_accumulation_steps}): the same examples per optimizer step in less memory"
        )
    if not config.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true (recomputes activations: less memory, about 30% slower)")
    if device == "cuda" and config.dtype in ("auto", "float32"):
        hints.append("train.dtype=bfloat16")
    tried = "; ".join(hints) or "a smaller model, or a device with more memory"
    return TrainingOutOfMemory(f"out of memory on {device} while training ({config.method}): {cause}. Try: {tried}.")


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for the RuntimeErrors other backends raise when memory runs out."""
    import torch  # called in the training process, which has it loaded; the stage that imports this module has not

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )
