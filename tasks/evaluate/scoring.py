"""Scoring one answer against its target: the per-answer metrics, refusal detection and the error categories.

Exact match, token F1, ROUGE-L, embedding similarity (all-MiniLM-L6-v2), length ratio and repetition; an answer
declines by keyword rules or by its embedding's cosine to a refusal sentence (`RefusalDetector`); `categorise`
names what is wrong with it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.answers import normalise_answer
from pipeline.assets import embedding_model_path
from pipeline.config import EvalConfig
from pipeline.docs_source import REFUSAL

if TYPE_CHECKING:  # only annotations: the encoder, loaded on first use, brings torch in
    import torch

GENERIC_REFUSAL = REFUSAL.format(package="requested")
"""The refusal sentence with a generic subject: a reference even when the split holds no refusal."""


# Phrases that open or carry a refusal. Apostrophes are normalised to ' before matching.
_REFUSAL_RULES = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry, (but )?i|i can only (answer|help|talk)|i can ?not (answer|help)|"
    r"i can't (answer|help)|i'?m (not able|unable) to|i am (not able|unable) to|(that|this) is outside|"
    r"outside (of )?(my|the) scope|i'?m not (allowed|designed|here) to|only answer questions)\b"
)


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


def mask_subjects(text: str, subjects: Sequence[str]) -> str:
    """`text` with every mention of a taught package (`pkg`, `pkg.name`, backticks kept) replaced by "it".

    Why: the trained refusal names the package ("...only answer questions about the more_itertools Python
    package"), so an on-topic answer that names it ("more_itertools.chunked breaks an iterable into lists")
    reaches a cosine of 0.6-0.7 to the refusal on the package name alone and would count as declining.
    """
    for subject in subjects:
        text = re.sub(rf"\b{re.escape(subject)}(\.\w+)*\b", "it", text)
    return text


@dataclass
class RefusalDetector:
    """Decides whether texts decline: keyword rules, or embedding cosine to a reference refusal >= threshold.

    `subjects`: the taught packages, masked in texts and references before embedding (`mask_subjects`),
    so the cosine measures declining, not naming the same package.
    """

    encoder: Any
    references: list[str]
    threshold: float
    subjects: Sequence[str] = ()

    def __call__(self, texts: Sequence[str]) -> tuple[list[bool], list[float]]:
        """(declined?, highest cosine to a reference refusal) for each text."""
        if not texts:
            return [], []
        masked_texts = [mask_subjects(t, self.subjects) for t in texts]
        masked_references = [mask_subjects(r, self.subjects) for r in self.references]
        cosine = embed(self.encoder, masked_texts) @ embed(self.encoder, masked_references).T
        best = [round(float(x), 6) for x in cosine.max(dim=1).values]
        return [refusal_by_rules(t) or b >= self.threshold for t, b in zip(texts, best)], best


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
