"""The chat template a trained model carries (pipeline/prompts.py): rendered by transformers' own
`apply_chat_template`, one user message gives exactly `render_prompt`'s text for every template kind, with
questions full of characters Jinja and str.format treat specially; anything else raises a clear error.

The whole model folder (train, export, serve) is covered in tests/integration/test_model_template.py and
tests/integration/test_serve.py; this is the template itself, on the tiny tokenizer.
"""

from __future__ import annotations

import copy

import pytest
from jinja2.exceptions import TemplateError

from pipeline.config import TemplateConfig
from pipeline.prompts import CHAT_TEMPLATE_SUPPORTS, chat_template_for, custom_parts, render_prompt

QUESTIONS = [
    "What does more_itertools.chunked do?",
    "Quotes \" and ' and a back\\slash, {braces} and {{double}}, {% a block %}, {# a comment #}",
    "Ünïcödé, emoji 😀, and a\nnewline\tand a tab",
    "{question} {input} {answer}",
    "",
]
TEMPLATES = {
    "qa": TemplateConfig(),
    "alpaca": TemplateConfig(name="alpaca"),
    "custom": TemplateConfig(name="custom", custom='Q "{question}" ({{literal}}) é\\n\n{answer}</a> re: {question}'),
    "custom-no-answer": TemplateConfig(name="custom", custom="[INST] {question} [/INST]"),
}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pipeline.assets import resolve_model
    from pipeline.models import load_tokenizer

    return load_tokenizer(resolve_model("tiny-neox"))


def _carrying(tokenizer, config: TemplateConfig):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = chat_template_for(config, tokenizer)
    return tokenizer


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_one_user_message_renders_the_training_prompt(tiny_tokenizer, name):
    config = TEMPLATES[name]
    tokenizer = _carrying(tiny_tokenizer, config)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        for generation_prompt in (True, False):  # the prompt already ends with the answer cue
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            assert text == render_prompt(question, config), (name, question)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert list(ids) == tokenizer(render_prompt(question, config), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_question_and_its_answer_render_the_training_text_and_eos(tiny_tokenizer, name):
    config = TEMPLATES[name]
    tokenizer = _carrying(tiny_tokenizer, config)
    question, answer = QUESTIONS[1], 'It {does} "this".'
    suffix = custom_parts(config.custom or "", question)[1] if config.name == "custom" else ""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == render_prompt(question, config) + answer + suffix + tokenizer.eos_token


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}], "system messages are not"),
        ([{"role": "user", "content": "Q?"}, {"role": "user", "content": "Again?"}], "multi-turn conversations"),
        (
            [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."},
                {"role": "user", "content": "B?"},
            ],
            "expected 1 or 2 messages, found 3",
        ),
        ([{"role": "assistant", "content": "A."}], "the first message must be the user's question"),
        ([{"role": "user", "content": [{"type": "text", "text": "Q?"}]}], "message content must be a string"),
    ],
)
def test_other_conversations_raise_what_is_supported(tiny_tokenizer, messages, message):
    tokenizer = _carrying(tiny_tokenizer, TemplateConfig())
    with pytest.raises(TemplateError, match=message) as error:
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert str(error.value).startswith(CHAT_TEMPLATE_SUPPORTS)


def test_chat_keeps_the_tokenizers_template_and_adds_the_system_prompt(tiny_tokenizer):
    own = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = own
    assert chat_template_for(TemplateConfig(name="chat"), base) == own
    config = TemplateConfig(name="chat", system_prompt='Answer "only" from the docs %} }}.')
    tokenizer = _carrying(base, config)
    user = [{"role": "user", "content": "What is X?"}]
    text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert text == render_prompt("What is X?", config, tokenizer=base)
    assert text == '<system>Answer "only" from the docs %} }}.\n<user>What is X?\n<assistant>'
    own_system = [{"role": "system", "content": "Mine."}, *user]
    assert tokenizer.apply_chat_template(own_system, add_generation_prompt=True, tokenize=False).startswith(
        "<system>Mine.\n<user>"
    )
    assert chat_template_for(TemplateConfig(name="chat"), tiny_tokenizer) is None  # no template to keep
