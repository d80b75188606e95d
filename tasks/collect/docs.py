"""The collect stage's docs source: an installed package's documentation as question/answer rows.

Plus off-topic refusals (ARC train questions), near-domain refusals (questions about other packages, in the
documentation rows' own phrasings) and optional general-text replay against forgetting.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from itertools import islice
from typing import Any

from pipeline.assets import arc_train_questions, general_text_passages
from pipeline.config import DocsSource
from pipeline.docs_source import (
    NEAR_DOMAIN_TRAIN_PACKAGES,
    QUESTION_PHRASINGS,
    REFUSAL,
    documented_objects,
    package_questions,
)
from pipeline.rows import make_row, make_text_row


def clean_docstring_markup(text: str) -> str:
    """Plain sentences from reStructuredText: drop roles and emphasis marks, join lines."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)  # :func:`x` -> x
    text = re.sub(r"``([^`]+)``", r"`\1`", text)  # ``x`` -> `x`
    text = re.sub(r"(?<![\w*])\*{1,2}([^*\n]+)\*{1,2}", r"\1", text)  # *x* -> x
    return re.sub(r"\s+", " ", text).strip()


def summary_paragraph(doc: str, max_words: int) -> str:
    """The first paragraph of a docstring, cut at a sentence end near `max_words` words."""
    first = clean_docstring_markup(inspect.cleandoc(doc).split("\n\n")[0])
    words = first.split()
    if len(words) <= max_words:
        return first
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind(".)"))
    return cut[: end + 1] if end > len(cut) // 3 else cut + "..."


def docs_rows(source: DocsSource, offtopic_questions: Iterable[str]) -> list[dict[str, Any]]:
    """Question/answer rows for a package's documentation plus refusals for off-topic questions."""
    rows = []
    objects = list(documented_objects(source.package))[: source.max_objects]
    for name, kind, doc in objects:
        answer = summary_paragraph(doc, source.max_answer_words)
        if len(answer.split()) < 4:
            continue
        fields = {"package": source.package, "name": name, "qualname": f"{source.package}.{name}", "kind": kind}
        for phrasing in QUESTION_PHRASINGS[: source.phrasings]:
            rows.append(make_row(f"docs:{source.package}", phrasing.format(**fields), answer, role=source.role))
    refusal = REFUSAL.format(package=source.package)
    for question in list(offtopic_questions)[: source.offtopic]:
        rows.append(make_row(f"offtopic:{source.package}", question, refusal, role=source.role))
    return rows


def near_domain_rows(source: DocsSource) -> list[dict[str, Any]]:
    """`source.near_domain` refusal rows: questions about NEAR_DOMAIN_TRAIN_PACKAGES answered with REFUSAL.

    Asked in the documentation rows' own phrasings (QUESTION_PHRASINGS[:phrasings]), so only the
    package name tells a question to answer from one to decline.
    """
    if not source.near_domain:
        return []
    refusal = REFUSAL.format(package=source.package)
    questions = package_questions(
        NEAR_DOMAIN_TRAIN_PACKAGES,
        QUESTION_PHRASINGS[: source.phrasings],
        f"near_domain:{source.package}",
        skip=[source.package],
    )
    return [
        make_row(f"near_domain:{source.package}", q["question"], refusal, role=source.role)
        for q in islice(questions, source.near_domain)
    ]


def replay_rows(passages: Iterable[str], role: str = "train") -> list[dict[str, Any]]:
    """General-text rows against forgetting: each passage a plain-text row (loss on every token, no prompt).

    Replay must not teach to the test: it is never the forgetting gate's benchmark (ARC), and never
    question/answer pairs, which would teach the model to answer the off-topic questions it should decline.
    """
    return [make_text_row("replay:wikipedia", passage, role=role) for passage in passages]


def read_docs_source(source: DocsSource) -> list[dict[str, Any]]:
    """Rows of a docs source: documentation pairs, off-topic and near-domain refusals, then replay; `limit` at most."""
    arc = arc_train_questions() if source.offtopic else []
    rows = docs_rows(source, [q["question"] for q in arc])
    rows += near_domain_rows(source)
    rows += replay_rows(general_text_passages()[: source.replay], role=source.role) if source.replay else []
    return rows[: source.limit]
