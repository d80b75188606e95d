"""Stage 1, collect: gather question/answer pairs from the configured sources.

In: `DataConfig` (a list of sources). Out: an artifact with `rows.jsonl`, one
normalised row per line: `{"id", "question", "answer", "source"}`, where `id` is
stable (a hash of source and text) so reruns and diffs line up.

Sources:
- `jsonl`: a JSON Lines file with a question and an answer field.
- `docs`: an installed package's documentation turned into pairs: each public
  function or class gets several question phrasings answered by the first
  paragraph of its docstring, plus off-topic questions (ARC *train* questions)
  answered with a polite refusal that keeps the assistant on the package.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.assets import arc_train_questions
from pipeline.config import DataConfig, DocsSource, JsonlSource, StoreConfig
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task

VERSION = "1"

QUESTION_PHRASINGS = (
    "What does `{qualname}` do?",
    "Explain the {package} {kind} `{name}`.",
    "How would I use {qualname}?",
    "Describe what {name} in {package} is for.",
    "In {package}, what is the purpose of `{name}`?",
    "Can you summarise the documentation of {qualname}?",
)
REFUSAL = "I'm sorry, I can only answer questions about the {package} Python package."


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line and the problem."""


def row_id(source: str, question: str, answer: str) -> str:
    """A stable 16-hex-digit id for a row: the same text from the same source gets the same id."""
    digest = hashlib.sha256(f"{source}\x1f{question}\x1f{answer}".encode("utf-8"))
    return digest.hexdigest()[:16]


def make_row(source: str, question: str, answer: str) -> dict[str, str]:
    """A normalised row with its stable id."""
    return {"id": row_id(source, question, answer), "question": question, "answer": answer, "source": source}


# --- jsonl source -------------------------------------------------------------------------


def read_jsonl_source(source: JsonlSource) -> list[dict[str, str]]:
    """Rows from a JSON Lines file; a DataError names the file and line of the first bad record."""
    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"data.sources: file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            rows.append(_pair_from_record(record, source, path, number))
            if source.limit and len(rows) >= source.limit:
                break
    return rows


def _pair_from_record(record: object, source: JsonlSource, path: Path, number: int) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
    missing = [key for key in (source.question_key, source.answer_key) if key not in record]
    if missing:
        raise DataError(
            f"{path}:{number}: expected fields {source.question_key!r} and {source.answer_key!r}, "
            f"found {sorted(record)}; set question_key/answer_key in data.sources"
        )
    question, answer = record[source.question_key], record[source.answer_key]
    for key, value in ((source.question_key, question), (source.answer_key, answer)):
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {key!r}: expected text, found {type(value).__name__}")
    return make_row(f"jsonl:{path.name}", question.strip(), answer.strip())


# --- docs source --------------------------------------------------------------------------


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


def documented_objects(package: str) -> Iterator[tuple[str, str, str]]:
    """(name, kind, docstring) for each public function or class with its own docstring.

    Inherited docstrings (an exception class repeating Exception's) and generated
    ones (a namedtuple's 'Stats(size, ...)') are skipped: they say nothing about
    the package.
    """
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise DataError(f"data.sources: docs package {package!r} is not installed ({exc})") from None
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        doc = getattr(obj, "__doc__", None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) or not doc:
            continue
        if inspect.isclass(obj) and any(doc is getattr(base, "__doc__", None) for base in obj.__mro__[1:]):
            continue
        if doc.strip().startswith(f"{name}("):
            continue
        yield name, "class" if inspect.isclass(obj) else "function", doc


def docs_rows(source: DocsSource, offtopic_questions: Iterable[str]) -> list[dict[str, str]]:
    """Question/answer rows for a package's documentation plus refusals for off-topic questions."""
    rows = []
    objects = list(documented_objects(source.package))[: source.max_objects]
    for name, kind, doc in objects:
        answer = summary_paragraph(doc, source.max_answer_words)
        if len(answer.split()) < 4:
            continue
        fields = {"package": source.package, "name": name, "qualname": f"{source.package}.{name}", "kind": kind}
        for phrasing in QUESTION_PHRASINGS[: source.phrasings]:
            rows.append(make_row(f"docs:{source.package}", phrasing.format(**fields), answer))
    refusal = REFUSAL.format(package=source.package)
    for question in list(offtopic_questions)[: source.offtopic]:
        rows.append(make_row(f"offtopic:{source.package}", question, refusal))
    return rows


def collect_rows(config: DataConfig) -> list[dict[str, str]]:
    """Every configured source's rows, in config order, exact duplicates removed."""
    rows: list[dict[str, str]] = []
    for source in config.sources:
        if isinstance(source, JsonlSource):
            rows.extend(read_jsonl_source(source))
        else:
            offtopic = [q["question"] for q in arc_train_questions()] if source.offtopic else []
            rows.extend(docs_rows(source, offtopic))
    unique = list({row["id"]: row for row in rows}.values())
    if len(unique) < config.min_rows:
        raise DataError(f"data: expected at least data.min_rows={config.min_rows} rows, found {len(unique)}")
    return unique


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON Lines (UTF-8, one object per line); returns the count."""
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file the pipeline wrote itself."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@stage_task("collect", version=VERSION, retries=2)
def collect(config: DataConfig, store: StoreConfig) -> Ref:
    """Collect rows from the configured sources into `rows.jsonl`; returns the artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    rows = collect_rows(config)
    write_jsonl(stage.dir / "rows.jsonl", rows)
    sources = sorted({row["source"] for row in rows})
    return stage.commit(meta={"rows": len(rows), "sources": sources})
