"""Stage 2, template: turn each row into a prompt and a completion.

In: the collect artifact (`rows.jsonl`) and `TemplateConfig` (plus the model, whose
tokenizer renders the `chat` template). Out: `rows.jsonl` with the collected fields
plus `prompt`, `completion` and `text`. The prompt and completion are kept apart
(evaluation generates from the prompt; the loss can be masked to the completion) and
joined in `text` (the text-only form). The EOS token is appended at tokenization,
where the tokenizer is known.

Templates: `qa` (the default, `### Question:` / `### Answer:`), `alpaca` (the Stanford
Alpaca prompt, with and without its input block), `chat` (the tokenizer's own chat
template) and `custom` (a string or file with {question}, {input} and {answer}
placeholders, checked when the config loads). Rows of the `text` schema have no
question: every template leaves them as they are (empty prompt, the text as completion).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from pipeline.config import ModelConfig, StoreConfig, TemplateConfig
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task
from tasks.collect import DataError, is_text_row, read_jsonl, write_jsonl

VERSION = "2"

QA_PROMPT = "### Question:\n{question}\n\n### Answer:\n"
QA_INPUT_PROMPT = "### Question:\n{question}\n\n### Input:\n{input}\n\n### Answer:\n"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Response:\n"
)
_ANSWER_MARK = "\x00answer\x00"  # stands in for {answer} to split a custom template into prompt and suffix


def custom_parts(template: str, question: str, input: str = "") -> tuple[str, str]:
    """A custom template filled in: (prompt, text that follows the answer)."""
    filled = template.format(question=question, input=input, answer=_ANSWER_MARK)
    prompt, _, suffix = filled.partition(_ANSWER_MARK)
    return prompt, suffix


def chat_messages(question: str, input: str = "", history: list[dict] | None = None,
                  system_prompt: str | None = None) -> list[dict[str, str]]:
    """The turns a chat template renders before the answer: system prompt, earlier turns, the question."""
    if history:
        turns = [dict(turn) for turn in history]
    else:
        turns = [{"role": "user", "content": f"{question}\n\n{input}" if input else question}]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def render_prompt(question: str, config: TemplateConfig, *, input: str = "", history: list[dict] | None = None,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The prompt a model sees for `question` (also used at inference time).

    In: the question, the template config, an optional input (Alpaca), earlier chat
    turns (for `chat`) and the tokenizer (needed by `chat` only). Without a tokenizer,
    `chat` gives back the bare question: callers that only look for the question inside
    a prompt still work.
    """
    if config.name == "alpaca":
        return (ALPACA_PROMPT if input else ALPACA_NO_INPUT_PROMPT).format(question=question, input=input)
    if config.name == "custom":
        return custom_parts(config.custom or "", question, input)[0]
    if config.name == "chat":
        if tokenizer is None:
            return question
        messages = chat_messages(question, input, history, config.system_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (QA_INPUT_PROMPT if input else QA_PROMPT).format(question=question, input=input)


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
        raise DataError(f"template.name: chat: expected a tokenizer with a chat template, found none in model "
                        f"{model_name!r}; use template.name qa, alpaca or custom")


def template_rows(rows: list[dict[str, Any]], config: TemplateConfig,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> list[dict[str, Any]]:
    """Every row templated, in order."""
    return [apply_template(row, config, tokenizer) for row in rows]


@stage_task("template", version=VERSION)
def template(collected: Ref, config: TemplateConfig, store: StoreConfig, model: ModelConfig | None = None) -> Ref:
    """Apply the prompt template to every collected row; returns the artifact's Ref.

    `model` is needed by `template.name: chat` only (its tokenizer holds the chat template).
    """
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    tokenizer = None
    if config.name == "chat":
        if model is None:
            raise DataError("template.name: chat: expected the model whose chat template to use, found none "
                            "(pass model= to the template task)")
        from pipeline.assets import resolve_model
        from pipeline.models import load_tokenizer

        tokenizer = load_tokenizer(resolve_model(model.name), trust_remote_code=model.trust_remote_code)
        check_chat_template(tokenizer, model.name)
    rows = read_jsonl(stage.fetch(collected) / "rows.jsonl")
    count = write_jsonl(stage.dir / "rows.jsonl", template_rows(rows, config, tokenizer))
    return stage.commit(meta={"rows": count, "template": config.name})
