"""Record schemas of the collect stage: detecting a file's schema from its columns, and one record as a row.

`SCHEMAS` lists the known shapes (messages, question/answer, Alpaca, instruction/response, prompt/completion,
input/output, text) in detection order; a source may spell its columns out instead (`explicit_schema`).
`normalise_record` turns one record into a normalised row, or into the (reason, detail) of its drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.config import HFSource, JsonlSource
from pipeline.rows import DataError, make_row, make_text_row


@dataclass(frozen=True)
class Schema:
    """A known shape of records: the columns it needs and the optional input column it may use."""

    name: str
    kind: str  # 'qa', 'text' or 'messages'
    question: str = ""
    answer: str = ""
    inputs: tuple[str, ...] = ()
    text: str = ""
    messages: str = ""

    def required(self) -> tuple[str, ...]:
        """Columns a record must have."""
        return tuple(c for c in (self.question, self.answer, self.text, self.messages) if c)


SCHEMAS: tuple[Schema, ...] = (
    Schema("messages", "messages", messages="messages"),
    Schema("question/answer", "qa", question="question", answer="answer"),
    Schema("alpaca (instruction + input + output)", "qa", question="instruction", answer="output", inputs=("input",)),
    Schema("instruction/response", "qa", question="instruction", answer="response", inputs=("input", "context")),
    Schema("prompt/completion", "qa", question="prompt", answer="completion"),
    Schema("input/output", "qa", question="input", answer="output"),
    Schema("text", "text", text="text"),
)
"""Detection order: the first schema whose columns are all present wins (names match case-insensitively)."""


KNOWN_COLUMNS = frozenset(c for s in SCHEMAS for c in (s.question, s.answer, s.text, s.messages, *s.inputs) if c)


ACCEPTED_SCHEMAS = (
    "question+answer; instruction+output (+input, Alpaca); instruction+response (+input or context); "
    "prompt+completion; input+output; text; messages"
)


MAPPING_HINT = "or map your columns on the source with question_key/answer_key (+input_key), text_key or messages_key"


def explicit_schema(source: JsonlSource | HFSource) -> Schema | None:
    """The schema a source's column mapping spells out, or None when the schema is to be detected."""
    if source.text_key:
        return Schema(f"text (text_key={source.text_key})", "text", text=source.text_key)
    if source.messages_key:
        return Schema(f"messages (messages_key={source.messages_key})", "messages", messages=source.messages_key)
    if source.question_key or source.answer_key or source.input_key:
        question, answer = source.question_key or "question", source.answer_key or "answer"
        inputs = (source.input_key,) if source.input_key else ()
        return Schema(
            f"question_key={question}, answer_key={answer}", "qa", question=question, answer=answer, inputs=inputs
        )
    return None


def detect_schema(columns: Iterable[str], where: str) -> Schema:
    """The first schema of `SCHEMAS` whose columns are all among `columns`, bound to the columns' real names.

    Raises DataError naming `where`, the columns found and the accepted schemas.
    """
    columns = list(columns)
    by_lower = {str(c).strip().lower(): str(c) for c in columns}
    for schema in SCHEMAS:
        if all(c in by_lower for c in schema.required()):
            return Schema(
                schema.name,
                schema.kind,
                question=by_lower.get(schema.question, ""),
                answer=by_lower.get(schema.answer, ""),
                inputs=tuple(by_lower[c] for c in schema.inputs if c in by_lower),
                text=by_lower.get(schema.text, ""),
                messages=by_lower.get(schema.messages, ""),
            )
    raise DataError(
        f"{where}: expected the columns of an accepted schema ({ACCEPTED_SCHEMAS}), "
        f"found {sorted(map(str, columns))}; {MAPPING_HINT}"
    )


def check_columns(schema: Schema, columns: Iterable[str], where: str) -> None:
    """Raise DataError unless every column an explicit mapping names is among `columns`."""
    found = list(columns)
    missing = [c for c in schema.required() if c not in found]
    if missing:
        raise DataError(
            f"{where}: expected column(s) {', '.join(map(repr, missing))} ({schema.name}), "
            f"found {sorted(map(str, found))}"
        )


def json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for 'expected text, found object' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def _text_field(
    record: dict, column: str, origin: str, max_chars: int, *, optional: bool = False
) -> str | tuple[str, str]:
    """The stripped text of one column, or a (reason, detail) pair saying why the row is dropped."""
    if column not in record:
        if optional:
            return ""
        return (
            "missing_field",
            f"{origin}: column {column!r}: expected text, found no such column (columns {sorted(record)})",
        )
    value = record[column]
    if value is None:  # JSON null, or a CSV row with fewer cells than the header
        return "" if optional else ("missing_field", f"{origin}: column {column!r}: expected text, found no value")
    if not isinstance(value, str):
        return "non_string", f"{origin}: column {column!r}: expected text, found {json_type(value)}"
    value = value.replace("\r\n", "\n").strip()  # Windows line ends inside a field (CSV) read as plain newlines
    if not value and not optional:
        return "empty", f"{origin}: column {column!r}: expected text, found an empty or whitespace-only value"
    if len(value) > max_chars:
        return "too_long", (
            f"{origin}: column {column!r}: expected at most data.max_chars={max_chars} characters, found {len(value):,}"
        )
    return value


def _chat_turns(value: Any, origin: str, column: str, max_chars: int) -> list[dict] | tuple[str, str]:
    """Validated chat turns [{role, content}, ...] ending with a non-empty assistant answer, or (reason, detail)."""
    where = f"{origin}: column {column!r}"
    if not isinstance(value, list) or not value:
        return "bad_messages", f"{where}: expected a list of {{role, content}} turns, found {json_type(value)}"
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            return "bad_messages", (
                f"{where}: turn {number}: expected {{role: system|user|assistant, content}}, found {turn!r:.80}"
            )
        content = turn.get("content")
        if not isinstance(content, str):
            return "non_string", f"{where}: turn {number}: content: expected text, found {json_type(content)}"
        if len(content) > max_chars:
            return "too_long", (
                f"{where}: turn {number}: expected at most data.max_chars={max_chars} characters, "
                f"found {len(content):,}"
            )
        turns.append({"role": turn["role"], "content": content.strip()})
    if turns[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in turns[:-1]):
        roles = [t["role"] for t in turns]
        return "bad_messages", f"{where}: expected user turn(s) then a final assistant answer, found roles {roles}"
    if not turns[-1]["content"] or not [t for t in turns if t["role"] == "user"][-1]["content"]:
        return "empty", f"{where}: expected text in the last question and the answer, found an empty turn"
    return turns


def normalise_record(
    record: dict, schema: Schema, source: str, origin: str, *, max_chars: int, role: str
) -> dict | tuple[str, str]:
    """One source record as a normalised row, or (reason, detail) when the row must be dropped.

    In: the record (column -> value), its file's schema, the source name for the row id,
    where it came from ('file:line') for messages, the character cap and the row's role.
    """
    if schema.kind == "text":
        text = _text_field(record, schema.text, origin, max_chars)
        return text if isinstance(text, tuple) else make_text_row(source, text, role=role)
    if schema.kind == "messages":
        if schema.messages not in record:
            return "missing_field", f"{origin}: column {schema.messages!r}: expected chat turns, found no such column"
        turns = _chat_turns(record[schema.messages], origin, schema.messages, max_chars)
        if isinstance(turns, tuple):
            return turns
        question = [t for t in turns if t["role"] == "user"][-1]["content"]
        return make_row(source, question, turns[-1]["content"], messages=turns[:-1], role=role)
    question = _text_field(record, schema.question, origin, max_chars)
    if isinstance(question, tuple):
        return question
    answer = _text_field(record, schema.answer, origin, max_chars)
    if isinstance(answer, tuple):
        return answer
    extra = ""
    for column in schema.inputs:
        extra = _text_field(record, column, origin, max_chars, optional=True)
        if isinstance(extra, tuple):
            return extra
        if extra:
            break
    return make_row(source, question, answer, input=extra, role=role)
