"""How a question becomes the prompt a model sees: the prompt templates.

Shared by the template stage (training rows), the evaluate stage (probes are phrased like the training
prompts) and `finetune ask`. Templates: `qa` (the default, `### Question:` / `### Answer:`), `alpaca`
(the Stanford Alpaca prompt, with and without its input block), `chat` (the tokenizer's own chat
template) and `custom` (a string with {question}, {input} and {answer} placeholders, checked when the
config loads).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pipeline.config import TemplateConfig

if TYPE_CHECKING:  # only annotations: rendering a prompt needs no transformers import
    from transformers import PreTrainedTokenizerBase

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


def chat_messages(
    question: str, input: str = "", history: list[dict] | None = None, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The turns a chat template renders before the answer: system prompt, earlier turns, the question."""
    if history:
        turns = [dict(turn) for turn in history]
    else:
        turns = [{"role": "user", "content": f"{question}\n\n{input}" if input else question}]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def render_prompt(
    question: str,
    config: TemplateConfig,
    *,
    input: str = "",
    history: list[dict] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
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


# --------------------------------------------------------------------------- the template a trained model carries

_QUESTION_MARK = "\x00question\x00"  # stands in for the question while a prompt is turned into Jinja
CHAT_TEMPLATE_SUPPORTS = (
    "this model was fine-tuned on single questions: its chat template renders one user message "
    "(optionally followed by the assistant's answer, for training data); "
)
"""The start of every error the `qa`, `alpaca` and `custom` chat templates raise, saying what they render."""


def _jinja_literal(text: str) -> str:
    """`text` as a Jinja string expression that renders exactly `text` (quotes, backslashes, braces, any Unicode)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _jinja_text(text: str) -> str:
    """Jinja that renders `text` with the first message's content wherever `_QUESTION_MARK` stands."""
    pieces = text.split(_QUESTION_MARK)
    out = [_jinja_literal(pieces[0])] if pieces[0] else []
    for piece in pieces[1:]:
        out.append("{{ messages[0]['content'] }}")
        if piece:
            out.append(_jinja_literal(piece))
    return "".join(out)


def _raise(message: str, expression: str = "") -> str:
    """Jinja that stops rendering with `CHAT_TEMPLATE_SUPPORTS + message` (+ the value of a Jinja `expression`)."""
    text = json.dumps(CHAT_TEMPLATE_SUPPORTS + message, ensure_ascii=False)
    return "{{- raise_exception(" + text + (f" ~ ({expression})" if expression else "") + ") -}}"


def prompt_chat_template(config: TemplateConfig) -> str:
    """A Jinja chat template that renders a user message exactly as `render_prompt` renders that question.

    For `qa`, `alpaca` and `custom`: `[{"role": "user", "content": q}]` renders `render_prompt(q, config)`
    (the prompt already ends with the answer cue, so it is the same with or without
    `add_generation_prompt`); `[user, assistant]` renders the whole training text, prompt + answer (+ the text
    after `{answer}` of a custom template) + EOS, as the tokenize stage builds it. Anything else (a system
    message, several turns, no message, content that is not a string) raises an error naming what is
    supported: these templates were trained on single questions, and a silently different prompt would
    give answers the evaluation never measured.
    """
    if config.name == "chat":
        raise ValueError("template.name: chat keeps the tokenizer's own chat template (see chat_template_for)")
    prompt = render_prompt(_QUESTION_MARK, config)
    suffix = custom_parts(config.custom or "", _QUESTION_MARK)[1] if config.name == "custom" else ""
    return "".join(
        [
            f"{{#- finetune-pipeline: the {config.name!r} training template. -#}}",
            "{%- if messages | length == 0 or messages | length > 2 -%}",
            _raise("expected 1 or 2 messages, found ", "messages | length"),
            "{%- endif -%}",
            "{%- for message in messages -%}",
            "{%- if message['role'] == 'system' -%}",
            _raise("system messages are not supported (found one); put any instruction into the user message"),
            "{%- elif loop.index0 == 0 and message['role'] != 'user' -%}",
            _raise("the first message must be the user's question"),
            "{%- elif loop.index0 == 1 and message['role'] != 'assistant' -%}",
            _raise("multi-turn conversations are not supported; send one user message"),
            "{%- elif message['content'] is not string -%}",
            _raise("message content must be a string"),
            "{%- endif -%}",
            "{%- endfor -%}",
            _jinja_text(prompt),
            "{%- if messages | length == 2 -%}",
            "{{ messages[1]['content'] }}",
            _jinja_text(suffix),
            "{{ eos_token }}",
            "{%- endif -%}",
        ]
    )


def chat_template_for(config: TemplateConfig, tokenizer: PreTrainedTokenizerBase) -> str | dict[str, str] | None:
    """The chat template a model trained with `config` carries in its tokenizer files.

    `qa`, `alpaca`, `custom`: `prompt_chat_template(config)`. `chat`: the tokenizer's own template, with
    `template.system_prompt` (when set) placed first whenever a conversation has no system message of its
    own, as training rendered it; None when the tokenizer has none.
    """
    if config.name != "chat":
        return prompt_chat_template(config)
    own = tokenizer.chat_template
    if not own or not config.system_prompt:
        return own
    system = json.dumps({"role": "system", "content": config.system_prompt}, ensure_ascii=False)
    prefix = (
        "{%- if messages and messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{system}] + messages -%}}"
        "{%- endif -%}"
    )
    if isinstance(own, dict):
        return {name: prefix + text for name, text in own.items()}
    return prefix + own
