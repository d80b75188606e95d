"""Choosing the moderation probes: candidates per category, seeded, none equal or near a split question.

Categories (`PROBE_CATEGORIES`): general_knowledge (TriviaQA), chit_chat (chatterbot-corpus), near_domain
(other packages' functions) and on_topic (the taught package in phrasings training never uses), plus the
hand-picked `eval.probe_questions`. `NearDuplicates` finds a probe near (token Jaccard >= 0.8) a question seen.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice

from pipeline.assets import chit_chat_prompts, trivia_qa_questions
from pipeline.config import HAND_PICKED_PROBES, PROBE_CATEGORIES, EvalConfig
from pipeline.docs_source import (
    NEAR_DOMAIN_PROBE_PACKAGES,
    PROBE_PHRASINGS,
    QUESTION_PHRASINGS,
    documented_objects,
    package_questions,
)
from pipeline.rows import DataError, normalise_text

log = logging.getLogger(__name__)


NEAR_DUPLICATE_JACCARD = 0.8
"""A probe whose word set overlaps a split question's (or an earlier probe's) this much counts as the same question."""


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Shared words over all words of two word sets (0.0 when both are empty)."""
    return len(a & b) / len(a | b) if a or b else 0.0


class NearDuplicates:
    """Texts seen so far; `matches(text)` says whether a text equals one after `normalise_text` or is near one.

    Near: token Jaccard >= `threshold`. Lookups use prefix filtering, so a large index stays cheap:
    two word sets with Jaccard >= t share at least ceil(t * |A|) words, so a match must hold one of
    the |A| - ceil(t * |A|) + 1 rarest words of A, and only texts holding one of those are compared.
    Both relations are symmetric, so `matched_by` can stream a split past an index of a few probes
    instead of indexing the split.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = NEAR_DUPLICATE_JACCARD) -> None:
        self.threshold = threshold
        self.exact: dict[str, list[int]] = {}  # normalised text -> indices of the texts that have it
        self.word_sets: list[frozenset[str]] = []
        self.holding: dict[str, list[int]] = {}  # word -> indices of the word sets that hold it
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        """Remember one text."""
        key = normalise_text(text)
        self.exact.setdefault(key, []).append(len(self.word_sets))
        words = frozenset(key.split())
        for word in words:
            self.holding.setdefault(word, []).append(len(self.word_sets))
        self.word_sets.append(words)

    def _near(self, words: frozenset[str]) -> Iterator[int]:
        """Indices of the remembered word sets whose Jaccard with `words` (not empty) reaches the threshold."""
        shared = math.ceil(self.threshold * len(words) - 1e-9)
        rarest = sorted(words, key=lambda w: (len(self.holding.get(w, ())), w))[: len(words) - shared + 1]
        candidates = {i for word in rarest for i in self.holding.get(word, ())}
        return (i for i in candidates if jaccard(words, self.word_sets[i]) >= self.threshold)

    def matches(self, text: str) -> bool:
        """Whether `text` equals a remembered text after normalisation or reaches the Jaccard threshold with one."""
        key = normalise_text(text)
        if key in self.exact:
            return True
        words = frozenset(key.split())
        return bool(words) and next(self._near(words), None) is not None

    def matched_by(self, texts: Iterable[str]) -> set[int]:
        """Indices (in the order added) of the remembered texts that some text of `texts` equals or is near, read
        once, one at a time: the same pairs `matches` finds, from the other side."""
        found: set[int] = set()
        for text in texts:
            key = normalise_text(text)
            found.update(self.exact.get(key, ()))
            words = frozenset(key.split())
            if words:
                found.update(self._near(words))
        return found


def expected_behaviour(category: str) -> str:
    """'answer' for on_topic probes, 'decline' for every other category."""
    return "answer" if category == "on_topic" else "decline"


def _take_new(
    candidates: Iterable[Mapping[str, str]], wanted: int, seen: Iterable[str], taken: NearDuplicates
) -> list[Mapping[str, str]]:
    """The first `wanted` candidates new to the split (its questions: `seen`) and to the probes taken so far
    (`taken`, which remembers each one chosen).

    Against the split a candidate may be neither equal nor near. Against earlier probes a templated candidate
    (one with a `subject`, such as `more_itertools.chunked`) need only differ: two renderings of one wording
    about different functions are different questions, and a near test would keep only the short wordings
    (one changed word of eleven is Jaccard 0.83), skewing the draw towards them.

    Candidates are drawn a few more than still wanted at a time, and each draw is checked against the split in
    one pass over `seen` (`NearDuplicates.matched_by`), so the split's questions are never held: the choice is
    the one checking each candidate in turn against an index of the whole split makes.
    """
    chosen: list[Mapping[str, str]] = []
    stream = iter(candidates)
    while len(chosen) < wanted:
        drawn = list(islice(stream, 2 * (wanted - len(chosen)) + 8))
        if not drawn:
            break
        in_split = NearDuplicates(c["question"] for c in drawn).matched_by(seen)
        for position, candidate in enumerate(drawn):
            if len(chosen) == wanted:
                break
            question = candidate["question"]
            repeated = normalise_text(question) in taken.exact if candidate.get("subject") else taken.matches(question)
            if position not in in_split and not repeated:
                taken.add(question)
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
    lazily, only a little further than needed); the count per category; the hand-picked questions; the
    split's train and test questions, which may be read several times (`seen_questions` reads them from
    the split files each time). A candidate equal or near (`NearDuplicates`) to a split
    question, or to a probe taken before, is skipped (a templated one only when equal: `_take_new`).
    Out: `{"question", "category", "expected", "source"}` rows, category by category; a category whose
    source runs out gives fewer (logged).
    """
    taken = NearDuplicates()
    probes: list[dict[str, str]] = []
    for category in PROBE_CATEGORIES:
        wanted = counts.get(category, 0)
        chosen = _take_new(candidates.get(category, ()), wanted, seen, taken) if wanted else []
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
    hand = [{"question": q, "source": HAND_PICKED_PROBES} for q in hand_picked]
    for question in _take_new(hand, len(hand), seen, taken):
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
    """Names of `package`'s documented objects that some split question asks about in a training phrasing.

    The split's questions are read once, one at a time, against the package's phrased questions (objects x
    phrasings), so they are never held.
    """
    try:
        objects = list(documented_objects(package))
    except DataError:
        return set()
    asking: dict[str, set[str]] = {}  # a normalised training question -> the names it asks about
    for name, kind, _ in objects:
        for phrasing in QUESTION_PHRASINGS:
            question = phrasing.format(package=package, name=name, qualname=f"{package}.{name}", kind=kind)
            asking.setdefault(normalise_text(question), set()).add(name)
    asked: set[str] = set()
    for question in split_questions:
        asked |= asking.get(normalise_text(question), set())
    return asked


def on_topic_candidates(packages: Sequence[str], split_questions: Iterable[str], seed: str) -> Iterator[dict[str, str]]:
    """Questions about the taught packages' objects in PROBE_PHRASINGS, seeded; only objects the training data
    asks about (all documented objects when it asks about none of them)."""
    trained = {package: trained_names(package, split_questions) for package in packages}
    # Every probe wording of every object, one wording per object first: a package documents a few hundred
    # objects, and a false-refusal gate may need more probes than that to decide.
    for question in package_questions(packages, PROBE_PHRASINGS, seed, wordings=len(PROBE_PHRASINGS)):
        names = trained[question["package"]]
        if not names or question["name"] in names:
            yield {
                "question": question["question"],
                "source": f"on_topic:{question['package']}",
                "subject": f"{question['package']}.{question['name']}",
            }


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
        yield {
            "question": question["question"],
            "source": f"near_domain:{question['package']}",
            "subject": f"{question['package']}.{question['name']}",
        }


def probe_candidates(
    config: EvalConfig, taught: Sequence[str], split_questions: Iterable[str]
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


def look_counts(counts: Mapping[str, int], look: int) -> dict[str, int]:
    """Each category's probe count at look `look` (1, 2, ...): the configured count, doubled at every later look."""
    return {category: count * 2 ** (look - 1) for category, count in counts.items()}


def look_probes(config: EvalConfig, taught: Sequence[str], seen: Iterable[str], look: int) -> list[dict[str, str]]:
    """The probes look `look` (2 or later) adds to the earlier looks', per category of PROBE_CATEGORIES.

    Each category's draw is the first `look_counts` new candidates of its seeded stream, so a larger draw begins
    with the smaller one and only the new probes are answered; the hand-picked probes belong to look 1 (the
    evaluate stage). Out: rows like `select_probes`'s, the earlier looks' questions left out.
    """
    if look < 2:
        raise ValueError(f"look_probes: look 1 is the evaluate stage's, found look={look}")

    def draw(at: int) -> list[dict[str, str]]:
        counts = look_counts(config.probe_counts, at)
        return select_probes(probe_candidates(config, taught, seen), counts, [], seen)

    earlier = {p["question"] for p in draw(look - 1)}
    return [p for p in draw(look) if p["question"] not in earlier]
