"""The data preparation sections: `template` (row -> prompt and completion), `tokenize` and `split`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section

TEMPLATE_FIELDS = ("question", "input", "answer")
"""Placeholders a custom template may use: {question}, {input} and, at most once, {answer}."""


class TemplateConfig(Section):
    """How a row becomes a prompt and a completion (kept apart, and joined in `text`).

    Rows of the `text` schema have no question: every template leaves them as they are
    (empty prompt, the text as completion). The EOS token is appended at tokenization.
    """

    name: Literal["qa", "alpaca", "chat", "custom"] = Field(
        "qa",
        description="'qa': '### Question:\\n{question}\\n\\n### Answer:\\n' then the answer; 'alpaca': the Stanford "
        "Alpaca prompt, with or without its input block; 'chat': the tokenizer's own chat template (user turn, then "
        "the answer as the assistant turn); 'custom': template.custom or template.file.",
    )
    custom: str | None = Field(
        None,
        description="Template string for name: custom, with {question}, {input} and optionally {answer} placeholders "
        "({{ and }} for literal braces). The prompt is the text before {answer} (all of it when there is no {answer}); "
        "text after {answer} ends the completion.",
    )
    file: str | None = Field(
        None,
        description="File holding the custom template; read when the config is loaded "
        "(so its text is part of the key).",
    )
    system_prompt: str | None = Field(
        None, description="System message placed first by the chat template (name: chat)."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_template_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("file"):
            return data
        path = Path(str(data["file"])).expanduser()
        if not path.is_file():
            raise ValueError(f"template.file: expected a readable file, found no file at {str(path)!r}")
        text = path.read_text(encoding="utf-8")
        if data.get("custom") not in (None, text):
            raise ValueError("expected template.custom or template.file, found both with different text")
        return {**data, "custom": text}

    @field_validator("custom")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import string

        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"expected a template with {{field}} placeholders, found a format error: {exc}") from None
        unknown = sorted({name for name in fields if name not in TEMPLATE_FIELDS})
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}: expected only "
                f"{', '.join('{' + n + '}' for n in TEMPLATE_FIELDS)}"
            )
        if fields.count("answer") > 1:
            raise ValueError(f"expected {{answer}} at most once, found it {fields.count('answer')} times")
        if "question" not in fields:
            raise ValueError("expected a {question} placeholder, found none")
        return value

    @model_validator(mode="after")
    def _custom_needs_text(self) -> TemplateConfig:
        if self.name == "custom" and self.custom is None:
            raise ValueError("name: custom needs template.custom or template.file, found neither")
        if self.name != "custom" and self.custom is not None:
            raise ValueError(f"template.custom/file is only used with name: custom, found name: {self.name}")
        return self


class TokenizeConfig(Section):
    """Turning text into token ids with the model's own tokenizer."""

    max_length: int = Field(256, ge=8, description="Token budget of one row (prompt + answer + EOS).")
    labels: Literal["all", "completion"] = Field(
        "completion", description="'completion': loss on the answer only; 'all': on every token."
    )
    truncation_side: Literal["left", "right"] = Field(
        "left",
        description="Where a row over max_length loses tokens. 'left': the prompt loses its start, so the answer "
        "survives (an answer longer than max_length on its own keeps its start); 'right': the row loses its end, "
        "answer first (a row whose answer is entirely cut away is dropped).",
    )
    overlength: Literal["truncate", "drop"] = Field(
        "truncate",
        description="'truncate': cut rows over max_length (see truncation_side); 'drop': drop them, counted.",
    )


class SplitConfig(Section):
    """Holding out a test set: a seeded random share, or the rows of the role: test sources."""

    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of rows held out for evaluation (unused when a source has role: test)."
    )
    seed: int = Field(123, description="Shuffle seed.")
    shuffle: bool = Field(True, description="Shuffle before holding out; false: the last rows are the test set.")
