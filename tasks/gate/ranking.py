"""Ranking model versions: judges of two answers to one question and Bradley-Terry ratings over all games.

A judge compares two versions' answer rows (by a per-answer metric, or a 'package.module:function');
`rank_versions` fits the ratings on the Elo scale with bootstrap intervals, independent of game order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

from pipeline import stats
from pipeline.answers import normalise_answer
from pipeline.config import EloConfig, import_function

RANKING_RESAMPLES = 1000


Judge = Callable[[Mapping[str, Any], Mapping[str, Any]], float]
"""judge(row_a, row_b) -> 1.0 when version A's answer is better, 0.5 for a draw, 0.0 when B's is.
Rows carry question, target, answer and similarity (to the target)."""


def metric_judge(metric: str = "similarity", margin: float = EloConfig().draw_margin) -> Judge:
    """A judge by one per-answer metric: 1.0 when `a` beats `b` on it by more than `margin`, 0.0 the reverse,
    else 0.5."""

    def judge(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
        diff = float(a[metric]) - float(b[metric])
        return 0.5 if abs(diff) <= margin else (1.0 if diff > 0 else 0.0)

    return judge


similarity_judge: Judge = metric_judge("similarity")
"""The default judge: the answer closer to the target in embedding space wins."""


def make_judge(config: EloConfig) -> Judge:
    """The judge `config.judge` names: a per-answer metric, or a 'package.module:function' (imported here)."""
    if ":" not in config.judge:
        return metric_judge(config.judge, config.draw_margin)
    return import_function(config.judge)


def rank_versions(
    versions: Sequence[Sequence[Mapping[str, Any]]],
    labels: Sequence[str],
    judge: Judge = similarity_judge,
    confidence: float = 0.95,
    resamples: int = RANKING_RESAMPLES,
) -> list[dict[str, Any]]:
    """Bradley-Terry ratings (Elo scale) of model versions from every pairwise game, with bootstrap intervals.

    In: one list of answer rows per version (question, target, answer, similarity), their labels, a judge.
    Every pair of versions plays one game per question both answered. The fit uses all games at once, so
    the ratings do not depend on the order of questions or games (sequential Elo did). Out: one row per
    version, best first (ties keep list order): rank, label, rating, low, high, games, wins, draws, losses,
    mean similarity.
    """
    if len(versions) != len(labels):
        raise ValueError(
            f"ranking: expected one label per version, found {len(labels)} labels for {len(versions)} versions"
        )
    by_question = [{normalise_answer(row["question"]): row for row in rows} for rows in versions]
    games: list[tuple[str, int, int, float]] = []
    record = [{"wins": 0, "draws": 0, "losses": 0} for _ in versions]
    for i, j in combinations(range(len(versions)), 2):
        for question in sorted(set(by_question[i]) & set(by_question[j])):
            score = judge(by_question[i][question], by_question[j][question])
            games.append((question, i, j, score))
            for side, points in ((i, score), (j, 1.0 - score)):
                record[side]["wins" if points == 1.0 else "losses" if points == 0.0 else "draws"] += 1
    fitted = (
        stats.bradley_terry_ratings(games, len(versions), confidence, resamples)
        if games
        else [{"rating": 1000.0, "low": 1000.0, "high": 1000.0} for _ in versions]
    )
    table = []
    for index, (label, rows) in enumerate(zip(labels, versions)):
        sims = [float(r["similarity"]) for r in rows]
        table.append(
            {
                "label": label,
                **{k: round(v, 1) for k, v in fitted[index].items()},
                "games": sum(record[index].values()),
                **record[index],
                "mean_similarity": round(sum(sims) / len(sims), 4) if sims else None,
                "_order": index,
            }
        )
    table.sort(key=lambda row: (-row["rating"], row["_order"]))
    return [
        {"rank": rank, **{key: value for key, value in row.items() if key != "_order"}}
        for rank, row in enumerate(table, 1)
    ]


def version_labels(metas: Sequence[Mapping[str, Any]]) -> list[str]:
    """A label per evaluated version: its model name ('tiny-neox', 'fine-tuned'), repeats numbered '#2', '#3'."""
    seen: dict[str, int] = {}
    labels = []
    for index, meta in enumerate(metas):
        name = str(meta.get("model", f"model {index}"))
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels
