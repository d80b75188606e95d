"""How a question becomes the prompt a model sees: the prompt templates.

Shared by the template stage (training rows), the evaluate stage (probes are phrased like the training
prompts) and `finetune ask`. Templates: `qa` (the default, `### Question:` / `### Answer:`), `alpaca`
(the Stanford Alpaca prompt, with and without its input block), `chat` (the tokenizer's own chat
template) and `custom` (a string with {question}, {input} and {answer} placeholders, checked when the
config loads).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pipeline.config import TemplateConfig

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
