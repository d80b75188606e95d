"""The plan: both estimates against a device, and when training does not fit, what each change gives and the
fewest changes that fit; as text (`format_plan`) or JSON (`plan_as_json`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.planner.estimates import MemoryEstimate, estimate_inference, estimate_training
from pipeline.planner.setup import TrainingSetup
from pipeline.planner.shape import ModelShape
from pipeline.planner.units import format_bytes

DEFAULT_RESERVE = 0.1
"""Share of the device's memory kept free (CUDA context, caching allocator, fragmentation)."""


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
        "model.dtype=bfloat16",
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
                "(FSDP/DeepSpeed through train.accelerate_config) or 4-bit base weights "
                "(train.method=qlora with model.dtype=bfloat16, on a CUDA GPU with the qlora extra)",
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
