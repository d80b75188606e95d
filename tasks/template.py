"""Stage 2, template: turn each row into a prompt and a completion.

In: the collect artifact (`rows.jsonl`) and `TemplateConfig` (plus the model, whose
tokenizer renders the `chat` template). Out: `rows.jsonl` (written one row at a time as it is read, so memory
stays flat however many rows there are) with the collected fields
plus `prompt`, `completion` and `text`. The prompt and completion are kept apart
(evaluation generates from the prompt; the loss can be masked to the completion) and
joined in `text` (the text-only form). The EOS token is appended at tokenization,
where the tokenizer is known.

Templates (`pipeline.prompts`, shared with evaluation and `finetune ask`): `qa` (the default,
`### Question:` / `### Answer:`), `alpaca` (the Stanford Alpaca prompt, with and without its
input block), `chat` (the tokenizer's own chat template) and `custom` (a string or file with
{question}, {input} and {answer} placeholders, checked when the config loads). Rows of the
`text` schema have no question: every template leaves them as they are (empty prompt, the text
as completion).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ModelConfig, TemplateConfig
from pipeline.progress import Progress
from pipeline.prompts import custom_parts, render_prompt
from pipeline.rows import DataError, is_text_row
from pipeline.stage import stage_task

if TYPE_CHECKING:  # only annotations: the tokenizer is loaded (and transformers imported) when a chat template is used
    from transformers import PreTrainedTokenizerBase


def apply_template(row: dict, config: TemplateConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """A collected row plus its prompt, completion and the joined text (text rows: empty prompt)."""
    if is_text_row(row):
        return {**row, "prompt": "", "completion": row["text"], "text": row["text"]}
    question, input = row["question"], row.get("input", "")
    prompt = render_prompt(question, config, input=input, history=row.get("messages"), tokenizer=tokenizer)
    suffix = custom_parts(config.custom or "", question, input)[1] if config.name == "custom" else ""
    completion = row["answer"] + suffix
    return {**row, "prompt": prompt, "completion": completion, "text": prompt + completion}


def check_chat_template(tokenizer: PreTrainedTokenizerBase, model_name: str) -> None:
    """Raise DataError when the tokenizer has no chat template to render `template.name: chat` with."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"template.name: chat: expected a tokenizer with a chat template, found none in model "
            f"{model_name!r}; use template.name qa, alpaca or custom"
        )


def template_rows(
    rows: list[dict[str, Any]], config: TemplateConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> list[dict[str, Any]]:
    """Every row templated, in order."""
    return [apply_template(row, config, tokenizer) for row in rows]


def template_file(
    source: Path, target: Path, config: TemplateConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> int:
    """Template the JSON Lines rows of `source` into `target`, one row at a time; out: the rows written."""
    progress, count = Progress("template", unit="rows"), 0
    with source.open(encoding="utf-8") as rows, target.open("w", encoding="utf-8") as out:
        for line in rows:
            if line.strip():
                out.write(json.dumps(apply_template(json.loads(line), config, tokenizer), ensure_ascii=False) + "\n")
                count += 1
                progress.advance()
    progress.finish()
    return count


@stage_task("template")
def template(collected: Path, config: TemplateConfig, out: Path, model: ModelConfig | None = None) -> dict[str, Any]:
    """Apply the prompt template to every collected row (`collected/rows.jsonl` -> `out/rows.jsonl`); out: figures.

    `model` is needed by `template.name: chat` only (its tokenizer holds the chat template).
    """
    tokenizer = None
    if config.name == "chat":
        if model is None:
            raise DataError(
                "template.name: chat: expected the model whose chat template to use, found none "
                "(pass model= to the template task)"
            )
        from pipeline.assets import resolve_model
        from pipeline.models import load_tokenizer

        tokenizer = load_tokenizer(resolve_model(model.name), trust_remote_code=model.trust_remote_code)
        check_chat_template(tokenizer, model.name)
    count = template_file(collected / "rows.jsonl", out / "rows.jsonl", config, tokenizer)
    return {"rows": count, "template": config.name}
