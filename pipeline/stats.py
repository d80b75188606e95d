"""Interval estimates and verdicts for gates that decide on paired evidence (numpy + scipy only).

In: per-item outcomes of the fine-tuned and the base model on the same items (booleans for a benchmark's
right/wrong, floats for a score such as answer similarity), success counts for a single rate, or the games of
a pairwise tournament. Out: an `Estimate` (point estimate, two-sided interval at a stated confidence, the
method that made it and, for paired binary outcomes, the exact McNemar p-value and the discordant counts), a
three-way `verdict` ("pass", "fail", "inconclusive") of an estimate against a gate's threshold, and planning
numbers: the per-look confidence for a growing sample (Bonferroni alpha spending), the minimum detectable
effect at a sample size and how many items would decide. `bradley_terry` / `bradley_terry_ratings` turn
tournament games into Elo-scale ratings with bootstrap intervals.

Methods (all two-sided):

* a rate: the Wilson score interval (scipy's `binomtest(...).proportion_ci(method="wilson")`);
* a difference of paired proportions (tuned - base on the same items): Newcombe's hybrid score interval,
  method 10 of Newcombe 1998 ("Improved confidence intervals for the difference between binomial proportions
  based on paired data", Stat Med 17:2635-2650): the Wilson limits of the two marginal rates combined
  "square and add" with a correction for their correlation (phi). It is not degenerate when there are no
  discordant pairs (unlike the Wald interval), stays inside [-1, 1] and keeps near-nominal coverage at the
  sizes used here. The test is the exact McNemar test (a two-sided binomial test on the discordant pairs);
* a difference of paired means: a seeded BCa bootstrap of the mean of the per-item differences
  (`scipy.stats.bootstrap`);
* tournament ratings: maximum-likelihood Bradley-Terry strengths by Hunter's (2004) MM algorithm on the Elo
  scale, with intervals from a bootstrap over items (all games of an item are resampled together).

Everything here is a pure function: no configuration is read, randomness comes from an explicit seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats
from scipy.sparse.csgraph import connected_components

Kind = Literal["paired_binary", "paired_mean", "rate"]

NEWCOMBE_METHOD = "Newcombe paired score interval (method 10)"
WILSON_METHOD = "Wilson score interval"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided interval and what a gate or a power calculation needs beside it.

    `estimate` is a difference tuned - base for paired data and a rate for `wilson_interval`; `low`/`high` the
    interval at `confidence`; `n` the number of items (pairs, or trials); `method` names the interval.
    `p_value` is the exact McNemar p (paired binary only), `discordant` the counts (tuned right & base wrong,
    base right & tuned wrong) (paired binary only), and `spread` the quantity power calculations need: the
    discordance rate (paired binary), the sd of the differences (paired continuous), the rate (wilson).
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float
    method: str
    p_value: float | None = None
    discordant: tuple[int, int] | None = None
    spread: float | None = None

    def as_dict(self) -> dict:
        """A JSON-able dict: floats rounded to 6 places, the discordant counts as a list, None kept."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 6)
        if self.discordant is not None:
            out["discordant"] = [int(x) for x in self.discordant]
        return out


# --------------------------------------------------------------------------- checks and helpers


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")


def _z(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval at `confidence`."""
    _check_confidence(confidence)
    return float(stats.norm.ppf(1.0 - (1.0 - confidence) / 2.0))


def _paired_arrays(tuned: Sequence, base: Sequence, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as arrays, refusing unequal lengths (the pairing would be wrong) and empty input."""
    if len(tuned) != len(base):
        raise ValueError(f"paired outcomes need equal lengths: tuned has {len(tuned)} items, base has {len(base)}")
    if len(tuned) == 0:
        raise ValueError("paired outcomes are empty (n == 0): nothing to estimate")
    return np.asarray(tuned, dtype=dtype), np.asarray(base, dtype=dtype)


def _wilson_limits(successes: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score limits, vectorised (scipy's `binomtest` takes one count at a time).

    Used by the Newcombe interval, which needs the limits of two rates for many tables at once in the
    calibration simulation; tests check it against scipy's Wilson interval.
    """
    k = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    z2 = z * z
    centre = (k + z2 / 2.0) / (n + z2)
    half = z / (n + z2) * np.sqrt(k * (n - k) / n + z2 / 4.0)
    # Clip only rounding noise: at k = 0 (k = n) the lower (upper) limit is exactly 0 (1).
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def _newcombe_paired(
    both: np.ndarray, b: np.ndarray, c: np.ndarray, neither: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Newcombe's method 10 for paired proportions, vectorised over tables; returns (difference, low, high).

    The table (Newcombe's e, f, g, h): `both` right, `b` tuned right & base wrong, `c` base right & tuned
    wrong, `neither` right. The difference is p1 - p2 = (b - c) / n with p1 = (both + b) / n the tuned rate
    and p2 = (both + c) / n the base rate. With (l1, u1), (l2, u2) their Wilson limits:

        low  = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        high = d + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)

    phi is the correlation of the two outcomes, (eh - fg) / sqrt((e+f)(g+h)(e+g)(f+h)), with Newcombe's
    continuity correction of the numerator: eh - fg - n/2 when eh - fg > n/2, 0 when 0 <= eh - fg <= n/2,
    unchanged when negative; phi = 0 when a margin is empty (the denominator is 0).
    """
    e, f, g, h = (np.asarray(x, dtype=float) for x in (both, b, c, neither))
    n = e + f + g + h
    z = _z(confidence)
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = _wilson_limits(e + f, n, z)
    l2, u2 = _wilson_limits(e + g, n, z)
    cross = e * h - f * g
    numerator = np.where(cross > n / 2.0, cross - n / 2.0, np.where(cross < 0.0, cross, 0.0))
    denominator = np.sqrt((e + f) * (g + h) * (e + g) * (f + h))
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(denominator > 0.0, numerator / np.where(denominator > 0.0, denominator, 1.0), 0.0)
    d = p1 - p2
    # |phi| <= 1 makes both radicands >= 0 up to rounding; the max guards the rounding.
    delta = np.sqrt(np.maximum((p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    epsilon = np.sqrt(np.maximum((p2 - l2) ** 2 - 2.0 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return d, np.clip(d - delta, -1.0, 1.0), np.clip(d + epsilon, -1.0, 1.0)


# --------------------------------------------------------------------------- estimates


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c trials at p = 0.5.

    b and c are the discordant counts; with none (b + c == 0) there is no evidence either way and p is 1.0.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def paired_binary_difference(
    tuned: Sequence[bool | int], base: Sequence[bool | int], confidence: float = 0.95
) -> Estimate:
    """Difference in proportions tuned - base on the same items, with Newcombe's paired score interval.

    `tuned[i]` and `base[i]` say whether each model got item i right. The interval is Newcombe's hybrid score
    interval for paired proportions (method 10, with the phi correlation correction); `p_value` is the exact
    McNemar test, `discordant` = (tuned right & base wrong, base right & tuned wrong) and `spread` the
    discordance rate (b + c) / n, which is what the power of a paired comparison depends on.
    Raises ValueError when the lengths differ (naming both) or there are no items.
    """
    for name, values in (("tuned", tuned), ("base", base)):
        # bool() of a score such as 0.4 is True: refuse anything but right/wrong rather than miscount it.
        if not np.isin(np.asarray(values, dtype=float), (0.0, 1.0)).all():
            raise ValueError(f"{name} outcomes must be booleans or 0/1 (right/wrong per item)")
    t, s = _paired_arrays(tuned, base, bool)
    both, b = int(np.sum(t & s)), int(np.sum(t & ~s))
    c, neither = int(np.sum(~t & s)), int(np.sum(~t & ~s))
    d, low, high = _newcombe_paired(np.array([both]), np.array([b]), np.array([c]), np.array([neither]), confidence)
    n = len(t)
    return Estimate(
        estimate=float(d[0]),
        low=float(low[0]),
        high=float(high[0]),
        n=n,
        confidence=confidence,
        method=NEWCOMBE_METHOD,
        p_value=mcnemar_exact_p(b, c),
        discordant=(b, c),
        spread=(b + c) / n,
    )


def paired_mean_difference(
    tuned: Sequence[float], base: Sequence[float], confidence: float = 0.95, resamples: int = 9999, seed: int = 0
) -> Estimate:
    """Mean of the per-item differences tuned - base, with a seeded paired bootstrap interval.

    The bootstrap resamples the differences (so the pairing is kept) and is BCa (bias-corrected and
    accelerated), which corrects the skew a percentile interval ignores. When all differences are equal the
    bootstrap distribution is a single point, BCa is undefined and the interval is [d, d]; if BCa fails on
    nearly degenerate data (a NaN limit) the percentile interval is used and `method` says so.
    `spread` is the sample sd of the differences (ddof=1; 0 when they are all equal, or with one item).
    """
    _check_confidence(confidence)
    t, s = _paired_arrays(tuned, base, float)
    diffs = t - s
    n = len(diffs)
    d = float(np.mean(diffs))
    # "All equal" up to rounding: 0.5 - 0.4 and 0.7 - 0.6 differ in the last bit, which is not a spread.
    if np.ptp(diffs) <= 1e-12 * max(1.0, float(np.max(np.abs(diffs)))):
        return Estimate(
            estimate=d,
            low=d,
            high=d,
            n=n,
            confidence=confidence,
            spread=0.0,
            method=f"paired bootstrap (degenerate: all {n} differences equal)",
        )
    sd = float(np.std(diffs, ddof=1))
    low = high = math.nan
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # A NaN BCa limit is handled below by the percentile fallback; scipy's warning would only repeat it.
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            result = stats.bootstrap(
                (diffs,),
                np.mean,
                confidence_level=confidence,
                n_resamples=resamples,
                method=method,
                rng=np.random.default_rng(seed),
                batch=1000,
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            break
    return Estimate(
        estimate=d,
        low=low,
        high=high,
        n=n,
        confidence=confidence,
        spread=sd,
        method=f"paired bootstrap ({method}, {resamples} resamples, seed {seed})",
    )


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """A rate successes / n with its Wilson score interval (scipy's binomtest); `spread` is the rate."""
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"a rate needs n > 0 trials, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    rate = successes / n
    return Estimate(
        estimate=rate,
        low=float(ci.low),
        high=float(ci.high),
        n=int(n),
        confidence=confidence,
        method=WILSON_METHOD,
        spread=rate,
    )


# --------------------------------------------------------------------------- decisions and planning


def verdict(estimate: Estimate, op: Literal[">=", "<="], threshold: float) -> Literal["pass", "fail", "inconclusive"]:
    """Decide a gate `value op threshold` on the whole interval, not on the point estimate.

    ">=": pass when the whole interval is at or above the threshold (low >= threshold), fail when it is wholly
    below (high < threshold), inconclusive when it straddles the threshold. "<=" mirrors it: pass when
    high <= threshold, fail when low > threshold. An interval touching the threshold counts on the passing
    side, as the gate itself (">=" / "<=") does for a point value.
    """
    if op == ">=":
        if estimate.low >= threshold:
            return "pass"
        return "fail" if estimate.high < threshold else "inconclusive"
    if op == "<=":
        if estimate.high <= threshold:
            return "pass"
        return "fail" if estimate.low > threshold else "inconclusive"
    raise ValueError(f"op must be '>=' or '<=', got {op!r}")


def per_look_confidence(confidence: float, looks: int) -> float:
    """The confidence to use at each look of a growing sample so the whole procedure keeps `confidence`.

    Bonferroni alpha spending: each of the planned `looks` gets an equal share of alpha = 1 - confidence,
    so the chance that any look errs is at most alpha however the looks are correlated (the nested samples
    of a growing evaluation are strongly correlated, so this is conservative). 1 - (1 - confidence) / looks.
    """
    _check_confidence(confidence)
    if looks < 1:
        raise ValueError(f"looks must be >= 1, got {looks}")
    return 1.0 - (1.0 - confidence) / looks


def _standard_error(kind: str, n: int, spread: float | None, estimate: float = 0.0) -> float:
    """Standard error of one estimate of `kind` from n items (normal approximation)."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if kind == "paired_binary":
        if spread is None:
            raise ValueError("paired_binary needs the discordance rate as spread")
        # Var(d) = (disc - d^2) / n for a paired difference; d = 0 gives the planning value disc / n.
        return math.sqrt(max(spread - estimate**2, 0.0) / n)
    if kind == "paired_mean":
        if spread is None:
            raise ValueError("paired_mean needs the sd of the differences as spread")
        return spread / math.sqrt(n)
    if kind == "rate":
        p = 0.5 if spread is None else spread  # p = 0.5 is the widest case: a safe plan when the rate is unknown
        return math.sqrt(p * (1.0 - p) / n)
    raise ValueError(f"kind must be 'paired_binary', 'paired_mean' or 'rate', got {kind!r}")


def minimum_detectable_effect(kind: Kind, n: int, spread: float | None, confidence: float, power: float = 0.8) -> float:
    """The smallest true distance from a threshold that an interval at `confidence` excludes with `power`.

    Normal approximation: (z_{1-alpha/2} + z_{power}) * se, with se = sqrt(discordance / n) for paired_binary,
    spread / sqrt(n) for paired_mean (spread = sd of the differences) and sqrt(p (1 - p) / n) for a rate
    (p = spread, or 0.5 when spread is None). For a gate `tuned - base >= -margin` with a model as good as
    the base, a margin at least this large passes with probability `power`.
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be strictly between 0 and 1, got {power}")
    return (_z(confidence) + float(stats.norm.ppf(power))) * _standard_error(kind, n, spread)


def items_to_decide(estimate: Estimate, kind: Kind, threshold: float) -> int | None:
    """About how many items would make the interval exclude the threshold, if the observed effect held.

    Normal approximation at the estimate's confidence: the smallest n with z * se(n) <= |estimate - threshold|,
    where se^2 = (disc - d^2) / n for paired_binary, sd^2 / n for paired_mean and p (1 - p) / n for a rate.
    None when there is nothing to gain from more items: the estimate sits on the threshold, or the spread is
    0 or unknown (the interval would not shrink towards a decision). A planning figure, not a promise: the
    interval actually used (score or bootstrap) is a little wider than the normal one at small n.
    """
    gap = abs(estimate.estimate - threshold)
    # -0.03 measured as 6/200 - 12/200 is -0.030000000000000002: float noise is "on the threshold" too.
    if gap < 1e-9 or not estimate.spread:
        return None
    unit_se = _standard_error(kind, 1, estimate.spread, estimate.estimate)  # se with one item
    if unit_se == 0.0:
        return None
    return max(1, math.ceil((_z(estimate.confidence) * unit_se / gap) ** 2))


# --------------------------------------------------------------------------- Bradley-Terry


def _with_prior(wins: np.ndarray) -> np.ndarray:
    """`wins` (square, zero diagonal) plus the weak prior of `bradley_terry`, when the MLE does not exist."""
    players = len(wins)
    n_strong, _ = connected_components(wins > 0, directed=True, connection="strong")
    if n_strong == 1:
        return wins
    met = (wins + wins.T) > 0
    n_weak, _ = connected_components(met, directed=False)
    pairs = met if n_weak == 1 else ~np.eye(players, dtype=bool)
    return wins + 0.5 * pairs


def _fit_strengths(wins: np.ndarray, tol: float = 1e-10, max_iter: int = 100_000) -> np.ndarray:
    """Bradley-Terry maximum-likelihood log-strengths (mean 0) by Hunter's MM iteration, for a stack of matrices.

    wins: shape (fits, players, players), each with an existing MLE (see `_with_prior`). The MM step is
    gamma_i <- W_i / sum_j N_ij / (gamma_i + gamma_j), W_i = points i scored, N_ij = games between i and j;
    each step increases the likelihood. The update is simultaneous and uses only the totals, so the result does
    not depend on the order games were counted in. All fits iterate together (one numpy operation per step
    for a whole bootstrap) until the largest change in any log-strength is below `tol`.
    """
    games = wins + np.swapaxes(wins, 1, 2)
    points = wins.sum(axis=2)
    log_gamma = np.zeros(points.shape)
    for _ in range(max_iter):
        gamma = np.exp(log_gamma)
        denominator = (games / (gamma[:, :, None] + gamma[:, None, :])).sum(axis=2)
        new = np.log(points / denominator)
        new -= new.mean(axis=1, keepdims=True)  # the likelihood only fixes ratios: pin the geometric mean at 1
        if np.max(np.abs(new - log_gamma)) < tol:
            return new
        log_gamma = new
    return log_gamma


def _elo(log_gamma: np.ndarray) -> np.ndarray:
    """Natural-log strengths to Elo-scale ratings with mean 1000 (along the last axis)."""
    ratings = 400.0 * log_gamma / math.log(10.0)
    return ratings - ratings.mean(axis=-1, keepdims=True) + 1000.0


def _checked_wins(wins: np.ndarray) -> np.ndarray:
    wins = np.asarray(wins, dtype=float)
    if wins.ndim != 2 or wins.shape[0] != wins.shape[1]:
        raise ValueError(f"wins must be a square matrix, got shape {wins.shape}")
    if np.any(wins < 0):
        raise ValueError("wins must be >= 0")
    return wins * (1.0 - np.eye(len(wins)))  # a player does not play itself


def bradley_terry(wins: np.ndarray) -> np.ndarray:
    """Elo-scale Bradley-Terry ratings from a matrix of points: wins[i, j] = points i scored against j.

    A draw counts 0.5 to each side. The maximum-likelihood strengths (Hunter 2004, MM algorithm) are returned
    as 400 * log10(strength), shifted so the mean rating is 1000; so P(i beats j) = 1 / (1 + 10^((Rj - Ri) /
    400)), as with Elo. The fit depends only on the totals, so it is independent of game order.

    The maximum-likelihood estimate exists only when every player can be linked to every other by a chain
    of wins (the "beat" graph is strongly connected); a player who never lost (or never scored) would run to
    +inf (-inf). Then, and only then, a weak prior is added: one pseudo-game drawn (half a point to each side)
    between every pair of players that met, or between every pair when some players never met through any
    chain of games (including players with no games, who then rate at about the mean). This keeps ratings
    finite and ordered without moving well-determined ratings.
    """
    wins = _checked_wins(wins)
    if len(wins) < 2:
        return np.full(len(wins), 1000.0)  # nobody to compare with: the mean rating
    return _elo(_fit_strengths(_with_prior(wins)[None])[0])


def _wins_matrix(games: Sequence[tuple[str, int, int, float]], players: int) -> np.ndarray:
    wins = np.zeros((players, players))
    for item, i, j, score in games:
        if not (0 <= i < players and 0 <= j < players) or i == j:
            raise ValueError(
                f"game on item {item!r}: players must be two different indices in [0, {players}), got {i} and {j}"
            )
        if score not in (0, 0.5, 1):
            raise ValueError(f"game on item {item!r}: score must be 0, 0.5 or 1, got {score}")
        wins[i, j] += score
        wins[j, i] += 1.0 - score
    return wins


def bradley_terry_ratings(
    games: Sequence[tuple[str, int, int, float]],
    players: int,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Bradley-Terry ratings of `players` players with bootstrap intervals over items.

    games: (item id, i, j, score of i against j in {0, 0.5, 1}). The ratings are fitted on all games
    (`bradley_terry`). The interval resamples items with replacement, all games of an item together (the
    games on one item share its difficulty, so they are not independent), refits, and takes the percentile
    interval at `confidence`; items are ordered by id first, so the result is independent of game order and
    reproducible with `seed`. Ratings are relative (mean 1000 in every refit), so an interval measures a
    player's rating against the field. Out: one dict per player, in index order: {"rating", "low", "high"}.
    """
    _check_confidence(confidence)
    ratings = bradley_terry(_wins_matrix(games, players))
    items = sorted({str(game[0]) for game in games})
    if not items or resamples < 1 or players < 2:
        return [{"rating": float(r), "low": float(r), "high": float(r)} for r in ratings]
    index = {item: k for k, item in enumerate(items)}
    per_item = np.zeros((len(items), players, players))
    for item, i, j, score in games:
        per_item[index[str(item)], i, j] += score
        per_item[index[str(item)], j, i] += 1.0 - score
    rng = np.random.default_rng(seed)
    # How often each item is drawn in each resample; a resample's wins matrix is the count-weighted sum of the
    # items' matrices. All resamples are then fitted together.
    counts = np.stack(
        [np.bincount(rng.integers(0, len(items), size=len(items)), minlength=len(items)) for _ in range(resamples)]
    )
    resampled = np.einsum("ri,ijk->rjk", counts, per_item)
    boot = _elo(_fit_strengths(np.stack([_with_prior(w) for w in resampled])))
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return [{"rating": float(ratings[p]), "low": float(low[p]), "high": float(high[p])} for p in range(players)]
