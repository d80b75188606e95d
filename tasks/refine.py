"""Stage 9, refine: choose data-preparation changes from the gates that failed.

In: the gate artifact's verdicts, the round's `DataConfig` and `RefineConfig`.
Out: `changes.json`, a list of changes, each with the failing gate that asked for
it, why, and the config overrides (`data.sources.0.phrasings=4`) that make it. The
flow adds those overrides to the next round's config, so the round history reads
as plain config edits, and every stage whose inputs did not change comes back
`Cached`.

The default table (`refine.actions`, configurable):

| failing metric | changes |
| --- | --- |
| eval.similarity_mean, eval.exact_match, eval.rouge_l, eval.token_f1 | augment_phrasings, more_data |
| eval.repetition_rate, eval.repetition_mean, eval.too_long_rate, eval.length_ratio_mean | cap_answer_length |
| eval.refusal_rate, eval.refusal_rate.* (a probe category), eval.not_declined_rate | more_refusals |
| eval.refusal_rate.near_domain (other software's questions answered) | more_near_domain_refusals |
| eval.false_refusal_rate | fewer_near_domain_refusals, augment_phrasings |
| eval.off_topic_rate | augment_phrasings |
| benchmark.* (forgetting) | replay_general |

A metric finds its exact entry first, then the longest `<prefix>.*` entry that matches
(`eval.refusal_rate.chit_chat` -> `eval.refusal_rate.*` -> `eval.*`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, DocsSource, JsonlSource, RefineConfig
from pipeline.docs_source import QUESTION_PHRASINGS
from pipeline.stage import stage_task

MAX_PHRASINGS = len(QUESTION_PHRASINGS)


def augment_phrasings(data: DataConfig) -> tuple[list[str], str]:
    """One more question phrasing per documented object (more ways of asking the same thing)."""
    overrides = [
        f"data.sources.{i}.phrasings={s.phrasings + 1}"
        for i, s in enumerate(data.sources)
        if isinstance(s, DocsSource) and s.phrasings < MAX_PHRASINGS
    ]
    return overrides, "more question phrasings per documented object, so answers generalise across wordings"


def more_data(data: DataConfig) -> tuple[list[str], str]:
    """Double every source's row cap (documented objects, file row limits) where one is set."""
    overrides = []
    for i, source in enumerate(data.sources):
        if isinstance(source, DocsSource) and source.max_objects:
            overrides.append(f"data.sources.{i}.max_objects={source.max_objects * 2}")
        if isinstance(source, JsonlSource) and source.limit:
            overrides.append(f"data.sources.{i}.limit={source.limit * 2}")
    return overrides, "raise the collect caps: more training rows"


def more_refusals(data: DataConfig) -> tuple[list[str], str]:
    """Double the off-topic refusal examples (at least 30 more)."""
    overrides = [
        f"data.sources.{i}.offtopic={max(s.offtopic * 2, s.offtopic + 30)}"
        for i, s in enumerate(data.sources)
        if isinstance(s, DocsSource)
    ]
    return overrides, "more off-topic questions answered with a refusal, so the model learns to decline"


def more_near_domain_refusals(data: DataConfig) -> tuple[list[str], str]:
    """Half as many near-domain refusal examples again (questions about other packages; at least 30 more).

    Not twice as many: doubling 150 to 300 took the default model from declining 0.57 of other software's
    questions and 0.20 of its own to 1.00 and 0.83.
    """
    overrides = [
        f"data.sources.{i}.near_domain={max(s.near_domain * 3 // 2, s.near_domain + 30)}"
        for i, s in enumerate(data.sources)
        if isinstance(s, DocsSource)
    ]
    return overrides, "more questions about other packages answered with a refusal, so the model tells them apart"


def fewer_near_domain_refusals(data: DataConfig) -> tuple[list[str], str]:
    """A quarter fewer near-domain refusal examples (at least 10 fewer), where there are any."""
    overrides = [
        f"data.sources.{i}.near_domain={min(s.near_domain * 3 // 4, s.near_domain - 10)}"
        for i, s in enumerate(data.sources)
        if isinstance(s, DocsSource) and s.near_domain >= 10
    ]
    return overrides, "fewer refusal examples, so the model declines less of its own package's questions"


def cap_answer_length(data: DataConfig) -> tuple[list[str], str]:
    """Cut training answers to three quarters of their word budget (at least 10 words)."""
    overrides = [
        f"data.sources.{i}.max_answer_words={max(10, int(s.max_answer_words * 0.75))}"
        for i, s in enumerate(data.sources)
        if isinstance(s, DocsSource) and s.max_answer_words > 10
    ]
    return overrides, "shorter training answers against verbose, run-on generations"


def replay_general(data: DataConfig) -> tuple[list[str], str]:
    """Mix in (more) general-text replay rows: Wikipedia paragraphs trained on as plain text (collect's replay_rows)."""
    overrides = [
        f"data.sources.{i}.replay={max(s.replay * 2, 40)}"
        for i, s in enumerate(data.sources)
        if isinstance(s, DocsSource)
    ]
    return overrides, "replay general text (Wikipedia paragraphs, not the benchmark), against forgetting general skills"


CHANGES: dict[str, Callable[[DataConfig], tuple[list[str], str]]] = {
    "augment_phrasings": augment_phrasings,
    "more_data": more_data,
    "more_refusals": more_refusals,
    "more_near_domain_refusals": more_near_domain_refusals,
    "fewer_near_domain_refusals": fewer_near_domain_refusals,
    "cap_answer_length": cap_answer_length,
    "replay_general": replay_general,
}


def changes_for(metric: str, actions: dict[str, list[str]]) -> list[str]:
    """The change names configured for a failing metric: its exact entry, else the longest matching '<prefix>.*' entry.

    `eval.refusal_rate.near_domain` -> its own entry; `eval.refusal_rate.chit_chat` -> `eval.refusal_rate.*`;
    `benchmark.arc_easy.acc` -> `benchmark.arc_easy.*`, then `benchmark.*`. [] when nothing matches.
    """
    parts = metric.split(".")
    candidates = [metric] + [".".join(parts[:end]) + ".*" for end in range(len(parts) - 1, 0, -1)]
    return next((actions[key] for key in candidates if actions.get(key)), [])


def plan_changes(verdicts: list[dict], data: DataConfig, config: RefineConfig) -> list[dict]:
    """For each failed gate (decision 'fail'), the configured changes that still change something.

    Out: `[{"gate", "change", "why", "overrides"}]`; a change already chosen for an
    earlier gate is not repeated, one with nothing left to change is skipped, and so is one that
    would set a key an earlier change sets (gates that pull one setting both ways, such as too few
    near-domain refusals and too many false refusals, leave it to the first gate's change).
    """
    planned: list[dict] = []
    chosen: set[str] = set()
    keys_set: set[str] = set()
    for verdict in verdicts:
        if verdict["decision"] != "fail":  # only a failed gate changes data; an inconclusive one grows the sample
            continue
        for name in changes_for(verdict["metric"], config.actions):
            if name in chosen:
                continue
            overrides, why = CHANGES[name](data)
            keys = {override.split("=", 1)[0] for override in overrides}
            if overrides and not keys & keys_set:
                chosen.add(name)
                keys_set |= keys
                planned.append({"gate": verdict["gate"], "change": name, "why": why, "overrides": overrides})
    return planned


@stage_task("refine")
def refine(verdicts: Path, data: DataConfig, config: RefineConfig, out: Path) -> dict[str, Any]:
    """Plan the next round's data changes from the gate verdicts into `out/changes.json`; the figures list them."""
    result = json.loads((verdicts / "verdicts.json").read_text(encoding="utf-8"))
    planned = plan_changes(result["verdicts"], data, config)
    (out / "changes.json").write_text(json.dumps(planned, indent=2), encoding="utf-8")
    return {"changes": planned}
