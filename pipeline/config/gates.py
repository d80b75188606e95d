"""Deciding on a run and looping back: `gates` (one `Gate` each), `elo` (the gate's tournament judge) and `refine`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section
from pipeline.config.evaluation import BENCHMARK_METRICS, EVAL_METRICS, OFFTOPIC_PROBE_CATEGORIES

ELO_METRIC_JUDGES = ("similarity", "rouge_l", "token_f1", "exact_match")
"""Per-answer metrics an Elo game can be judged by (columns of the evaluate stage's answers)."""


class EloConfig(Section):
    """How the gate's Elo tournament judges two model versions' answers to one question (tasks/gate/ranking.py)."""

    judge: str = Field(
        "similarity",
        description=f"One of {', '.join(ELO_METRIC_JUDGES)}: the answer scoring higher against the target by more "
        "than draw_margin wins. Or 'package.module:function', called with two answer rows (question, target, "
        "answer and the metrics above) and returning 1.0, 0.5 or 0.0 for the first; e.g. an LLM judge.",
    )
    draw_margin: float = Field(0.02, ge=0, description="Metric difference at or below which a game is a draw.")

    @field_validator("judge")
    @classmethod
    def _judge_exists(cls, value: str) -> str:
        """A metric name, or an importable callable: found now rather than after training."""
        if ":" not in value:
            if value not in ELO_METRIC_JUDGES:
                raise ValueError(
                    f"expected one of {list(ELO_METRIC_JUDGES)} or 'package.module:function', found {value!r}"
                )
            return value
        import_function(value)
        return value


def import_function(spec: str) -> Callable[..., Any]:
    """The function 'package.module:function' names, imported; ValueError saying what is wrong otherwise."""
    import importlib

    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"expected an importable 'package.module:function', found {spec!r}: {error}") from None
    if not callable(function):
        raise ValueError(f"expected {spec!r} to name a function, found a {type(function).__name__}")
    return function


class Gate(Section):
    """One check on the run's metrics, decided on evidence (tasks/gate/decisions.py, pipeline/stats.py).

    Absolute: `metric op value` on the fine-tuned model, decided by the interval of its
    value. With `relative_to_base`, the check is on `fine-tuned - base`, paired item by
    item on the same questions (e.g. ARC may drop by at most 0.03: metric
    benchmark.arc_easy.acc_norm, op >=, value -0.03, relative_to_base true; a
    non-inferiority test). The gate passes when the whole interval is on the passing
    side of `value`, fails when it is all on the failing side, and is inconclusive otherwise.
    """

    metric: str = Field(
        description="eval.<one of EVAL_METRICS>, eval.refusal_rate.<probe category> or benchmark.<task>.<acc|acc_norm>."
    )
    op: Literal[">=", "<="] = ">="
    value: float
    relative_to_base: bool = False

    @model_validator(mode="after")
    def _known_metric(self) -> Gate:
        parts = self.metric.split(".")
        ok = (
            (parts[0] == "eval" and len(parts) == 2 and parts[1] in EVAL_METRICS)
            or (parts[:2] == ["eval", "refusal_rate"] and len(parts) == 3 and parts[2] in OFFTOPIC_PROBE_CATEGORIES)
            or (parts[0] == "benchmark" and len(parts) == 3 and parts[2] in BENCHMARK_METRICS)
        )
        if not ok:
            raise ValueError(
                f"expected eval.<{'|'.join(EVAL_METRICS)}>, eval.refusal_rate.<{'|'.join(OFFTOPIC_PROBE_CATEGORIES)}> "
                f"or benchmark.<task>.<{'|'.join(BENCHMARK_METRICS)}>, found {self.metric!r}"
            )
        return self

    def describe(self) -> str:
        """Human-readable form, e.g. 'eval.similarity_mean - base >= 0.05'."""
        lhs = f"{self.metric} - base" if self.relative_to_base else self.metric
        return f"{lhs} {self.op} {self.value:g}"


REFINE_CHANGES = (
    "augment_phrasings",
    "more_data",
    "more_refusals",
    "more_near_domain_refusals",
    "fewer_near_domain_refusals",
    "cap_answer_length",
    "replay_general",
)


DEFAULT_REFINE_ACTIONS: dict[str, list[str]] = {
    "eval.similarity_mean": ["augment_phrasings", "more_data"],
    "eval.exact_match": ["augment_phrasings", "more_data"],
    "eval.rouge_l": ["augment_phrasings", "more_data"],
    "eval.token_f1": ["augment_phrasings", "more_data"],
    "eval.repetition_rate": ["cap_answer_length"],
    "eval.repetition_mean": ["cap_answer_length"],
    "eval.too_long_rate": ["cap_answer_length"],
    "eval.length_ratio_mean": ["cap_answer_length"],
    "eval.refusal_rate": ["more_refusals"],
    # Answering other software's questions is cured by refusing more of them, not by more ARC refusals.
    "eval.refusal_rate.near_domain": ["more_near_domain_refusals"],
    "eval.refusal_rate.*": ["more_refusals"],
    "eval.not_declined_rate": ["more_refusals"],
    # Not augment_phrasings: at a fixed step budget more documentation rows made false refusals worse in every
    # run (0.33 -> 0.67, 0.25 -> 0.65). Fewer near-domain refusal rows is the remaining lever, but unproven: the
    # one run that tried it (150 -> 112) went from 0.25 to 0.56 (README, "The default run, measured").
    "eval.false_refusal_rate": ["fewer_near_domain_refusals"],
    "eval.off_topic_rate": ["augment_phrasings"],
    "benchmark.*": ["replay_general"],
}


class RefineConfig(Section):
    """The bounded loop back into data preparation when gates fail (tasks/refine.py)."""

    max_rounds: int = Field(1, ge=1, le=10, description="Rounds of collect..gate at most; 1 means no loop.")
    actions: dict[str, list[Literal[REFINE_CHANGES]]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_REFINE_ACTIONS.items()},
        description="Failing gate metric (or a prefix such as 'eval.refusal_rate.*' or '<section>.*'; the longest "
        "matching entry wins) -> data changes to make next round, in order. "
        "Changes: " + ", ".join(REFINE_CHANGES) + ".",
    )
