"""pipeline/stats.py against published reference values and independent computations.

References:
* Wilson: Newcombe 1998, "Two-sided confidence intervals for the single proportion: comparison of seven
  methods", Stat Med 17:857-872, Table I (method 3, score interval without continuity correction).
* Newcombe paired (method 10): Newcombe 1998, "Improved confidence intervals for the difference between
  binomial proportions based on paired data", Stat Med 17:2635-2650, Table II examples (a)-(d), 95% limits
  to 4 decimals (the same numbers are the expected values of the propint R package's tests,
  github.com/m-Py/propint, tests/testthat/test_Two_Dependent_Props_CI.R).
* McNemar: the exact binomial tail by hand, 2 * sum_{k<=2} C(12, k) / 2^12 = 158 / 4096.
* Bootstrap: scipy's paired t interval (`ttest_rel(...).confidence_interval()`).
* Bradley-Terry: the closed form for two players (strength ratio = win ratio).
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from scipy import stats

from pipeline.stats import (
    Estimate,
    _newcombe_paired,
    _wilson_limits,
    bradley_terry,
    bradley_terry_ratings,
    items_to_decide,
    mcnemar_exact_p,
    minimum_detectable_effect,
    paired_binary_difference,
    paired_mean_difference,
    per_look_confidence,
    verdict,
    wilson_interval,
)

Z95 = 1.959963984540054  # norm.ppf(0.975), written out so the tests do not trust the code's own quantile
Z80 = 0.8416212335729143  # norm.ppf(0.80)


def paired_table(both: int, b: int, c: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Per-item outcomes (tuned, base) for a paired 2x2 table: both right, tuned only, base only, neither."""
    tuned = [True] * both + [True] * b + [False] * c + [False] * neither
    base = [True] * both + [False] * b + [True] * c + [False] * neither
    return tuned, base


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    "k, n, low, high",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_1998_table_i(k, n, low, high):
    est = wilson_interval(k, n)
    assert est.estimate == pytest.approx(k / n)
    # Published to 4 decimals: within half a unit of the last place.
    assert abs(est.low - low) <= 5.01e-5 and abs(est.high - high) <= 5.01e-5
    assert est.method == "Wilson score interval" and est.spread == pytest.approx(k / n) and est.p_value is None


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.9875])
def test_wilson_and_its_vectorised_form_match_scipy(confidence):
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    for n in (1, 7, 50, 2376):
        ks = np.arange(n + 1)
        lows, highs = _wilson_limits(ks, np.full(n + 1, n), z)
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ref = stats.binomtest(int(k), n).proportion_ci(confidence_level=confidence, method="wilson")
            est = wilson_interval(int(k), n, confidence)
            assert (est.low, est.high) == pytest.approx((ref.low, ref.high), abs=1e-12)
            assert (lows[k], highs[k]) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="between 0 and n=5"):
        wilson_interval(6, 5)


# --------------------------------------------------------------------------- Newcombe paired (method 10)


@pytest.mark.parametrize(
    "table, low, high",
    [
        ((36, 12, 2, 0), 0.0569, 0.3404),  # (a)
        ((18, 12, 2, 18), 0.0562, 0.3290),  # (b): eh - fg > n/2, so the continuity-corrected phi is used
        ((53, 0, 0, 1), -0.0729, 0.0729),  # (c): no discordant pairs, still a real interval
        ((0, 30, 0, 0), 0.8395, 1.0),  # (d): an empty margin, phi = 0
    ],
)
def test_paired_difference_matches_newcombe_1998_table_ii(table, low, high):
    _both, b, c, _neither = table
    est = paired_binary_difference(*paired_table(*table))
    assert est.estimate == pytest.approx((b - c) / sum(table))
    assert abs(est.low - low) <= 5.01e-5 and abs(est.high - high) <= 5.01e-5
    assert est.n == sum(table) and est.discordant == (b, c) and est.spread == pytest.approx((b + c) / sum(table))
    assert est.method == "Newcombe paired score interval (method 10)"


def test_paired_difference_equals_the_formula_built_step_by_step_from_scipy_wilson_limits():
    e, f, g, h, confidence = 30, 9, 3, 58, 0.9  # eh - fg = 1713 > n/2: the corrected phi
    n = e + f + g + h
    p1, p2 = (e + f) / n, (e + g) / n
    ci1 = stats.binomtest(e + f, n).proportion_ci(confidence_level=confidence, method="wilson")
    ci2 = stats.binomtest(e + g, n).proportion_ci(confidence_level=confidence, method="wilson")
    phi = (e * h - f * g - n / 2) / math.sqrt((e + f) * (g + h) * (e + g) * (f + h))
    dl = math.sqrt((p1 - ci1.low) ** 2 - 2 * phi * (p1 - ci1.low) * (ci2.high - p2) + (ci2.high - p2) ** 2)
    du = math.sqrt((p2 - ci2.low) ** 2 - 2 * phi * (p2 - ci2.low) * (ci1.high - p1) + (ci1.high - p1) ** 2)
    est = paired_binary_difference(*paired_table(e, f, g, neither=h), confidence=confidence)
    assert (est.low, est.high) == pytest.approx((p1 - p2 - dl, p1 - p2 + du), abs=1e-12)


def test_paired_difference_properties():
    rng = np.random.default_rng(3)
    for _ in range(200):
        table = rng.multinomial(int(rng.integers(1, 300)), rng.dirichlet(np.ones(4)))
        est = paired_binary_difference(*paired_table(*map(int, table)))
        assert -1.0 <= est.low <= est.estimate <= est.high <= 1.0
        both, b, c, neither = map(int, table)
        swapped = paired_binary_difference(*paired_table(both, c, b, neither))
        # Swapping tuned and base negates the difference and mirrors the interval.
        assert (swapped.estimate, swapped.low, swapped.high) == pytest.approx((-est.estimate, -est.high, -est.low))
        assert swapped.p_value == pytest.approx(est.p_value) and swapped.discordant == (c, b)
    # The same table on 4x the items: a narrower interval around the same estimate.
    small = paired_binary_difference(*paired_table(40, 8, 4, 48))
    large = paired_binary_difference(*paired_table(160, 32, 16, 192))
    assert large.estimate == pytest.approx(small.estimate) and large.high - large.low < 0.6 * (small.high - small.low)
    # No discordant pairs: the estimate is 0, the interval is not degenerate and is symmetric about 0.
    none = paired_binary_difference(*paired_table(50, 0, 0, 50))
    assert none.estimate == 0.0 and none.low == pytest.approx(-none.high) and none.high > 0.01 and none.p_value == 1.0
    # Every item tuned-only or base-only at the extremes: the interval stays inside [-1, 1].
    for table in [(0, 5, 0, 0), (0, 0, 5, 0), (0, 1, 0, 0)]:
        est = paired_binary_difference(*paired_table(*table))
        assert -1.0 <= est.low <= est.high <= 1.0


def test_paired_difference_accepts_ints_and_the_vectorised_form_agrees():
    tuned, base = [1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 1]
    est = paired_binary_difference(tuned, base, confidence=0.9)
    d, low, high = _newcombe_paired(np.array([2]), np.array([2]), np.array([1]), np.array([1]), 0.9)
    assert (est.estimate, est.low, est.high) == pytest.approx((d[0], low[0], high[0]))
    assert est.discordant == (2, 1)


def test_paired_difference_rejects_unpaired_or_empty_input():
    with pytest.raises(ValueError, match=r"tuned has 3 items, base has 2"):
        paired_binary_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="n == 0"):
        paired_binary_difference([], [])
    with pytest.raises(ValueError, match="base outcomes must be booleans or 0/1"):
        paired_binary_difference([1, 0], [0.4, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_binary_difference([1], [0], confidence=1.0)


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_p_by_hand_and_against_binomtest():
    assert mcnemar_exact_p(10, 2) == pytest.approx(158 / 4096)  # = 0.0386
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    for b, c in [(0, 1), (3, 9), (40, 25), (117, 150)]:
        assert mcnemar_exact_p(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    est = paired_binary_difference(*paired_table(30, 10, 2, 58))
    assert est.p_value == pytest.approx(158 / 4096) and est.discordant == (10, 2)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


def test_estimate_as_dict_is_json_and_rounded():
    est = paired_binary_difference(*paired_table(30, 10, 2, 58))
    out = est.as_dict()
    assert json.loads(json.dumps(out)) == out
    assert out["discordant"] == [10, 2] and out["estimate"] == 0.08 and out["p_value"] == round(158 / 4096, 6)
    assert out["low"] == round(est.low, 6) and out["n"] == 100
    assert wilson_interval(3, 10).as_dict()["discordant"] is None


# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_is_seeded_and_close_to_the_t_interval_on_normal_data():
    rng = np.random.default_rng(7)
    base = rng.normal(0.6, 0.15, 400)
    tuned = base + rng.normal(0.03, 0.1, 400)
    est = paired_mean_difference(tuned, base)
    assert est.method == "paired bootstrap (BCa, 9999 resamples, seed 0)"
    assert est.estimate == pytest.approx(np.mean(tuned - base))
    assert est.spread == pytest.approx(np.std(tuned - base, ddof=1)) and est.n == 400 and est.p_value is None
    assert paired_mean_difference(tuned, base) == est
    assert paired_mean_difference(tuned, base, seed=1) != est
    t = stats.ttest_rel(tuned, base).confidence_interval(confidence_level=0.95)
    width = t.high - t.low
    assert abs(est.low - t.low) <= 0.1 * width and abs(est.high - t.high) <= 0.1 * width
    assert est.low < est.estimate < est.high


def test_paired_bootstrap_with_all_differences_equal_is_a_point():
    est = paired_mean_difference([0.5, 0.7, 0.9], [0.4, 0.6, 0.8])
    assert est.estimate == pytest.approx(0.1) and est.low == est.high == est.estimate
    assert est.spread == pytest.approx(0.0, abs=1e-12) and "degenerate" in est.method
    rounding = paired_mean_difference([1.0, 1.1, 1.2], [0.9, 1.0, 1.1])  # differences equal but for the last bit
    assert rounding.low == rounding.high and rounding.spread == 0.0
    one = paired_mean_difference([0.3], [0.1])
    assert one.low == one.high == pytest.approx(0.2) and one.spread == 0.0
    with pytest.raises(ValueError, match=r"tuned has 2 items, base has 1"):
        paired_mean_difference([0.1, 0.2], [0.1])


# --------------------------------------------------------------------------- verdicts and planning


def _interval(low: float, high: float) -> Estimate:
    return Estimate(estimate=(low + high) / 2, low=low, high=high, n=100, confidence=0.95, method="test")


def test_verdict_has_three_outcomes_for_both_ops():
    assert verdict(_interval(-0.01, 0.03), ">=", -0.02) == "pass"
    assert verdict(_interval(-0.02, 0.03), ">=", -0.02) == "pass"  # touching the threshold passes, as ">=" does
    assert verdict(_interval(-0.06, -0.03), ">=", -0.02) == "fail"
    assert verdict(_interval(-0.03, 0.01), ">=", -0.02) == "inconclusive"
    assert verdict(_interval(0.02, 0.08), "<=", 0.1) == "pass"
    assert verdict(_interval(0.02, 0.1), "<=", 0.1) == "pass"
    assert verdict(_interval(0.11, 0.2), "<=", 0.1) == "fail"
    assert verdict(_interval(0.05, 0.15), "<=", 0.1) == "inconclusive"
    with pytest.raises(ValueError, match="op"):
        verdict(_interval(0, 1), ">", 0.5)  # type: ignore[arg-type]


def test_per_look_confidence_spends_alpha_evenly():
    assert per_look_confidence(0.95, 4) == pytest.approx(0.9875)
    assert per_look_confidence(0.95, 1) == pytest.approx(0.95)
    assert per_look_confidence(0.9, 10) == pytest.approx(0.99)
    with pytest.raises(ValueError):
        per_look_confidence(0.95, 0)


def test_minimum_detectable_effect_matches_the_closed_form():
    mde = minimum_detectable_effect("paired_binary", 2376, 0.1, 0.95)
    assert mde == pytest.approx((Z95 + Z80) * math.sqrt(0.1 / 2376))
    assert minimum_detectable_effect("paired_mean", 400, 0.2, 0.95) == pytest.approx((Z95 + Z80) * 0.2 / 20)
    assert minimum_detectable_effect("rate", 100, None, 0.95) == pytest.approx((Z95 + Z80) * 0.05)
    assert minimum_detectable_effect("rate", 100, 0.1, 0.95, power=0.5) == pytest.approx(Z95 * 0.03)
    z_look = stats.norm.ppf(1 - 0.0125 / 2)
    mde = minimum_detectable_effect("paired_binary", 800, 0.1, 0.9875)
    assert mde == pytest.approx((z_look + Z80) * math.sqrt(0.1 / 800))
    with pytest.raises(ValueError, match="kind"):
        minimum_detectable_effect("ratio", 10, 0.1, 0.95)  # type: ignore[arg-type]


def test_items_to_decide_is_the_normal_approximation_and_that_many_items_decide():
    # A 47%-accurate base, 10% discordant pairs, tuned 2 points lower, judged against a 5-point margin.
    small = paired_binary_difference(*paired_table(41, 4, 6, 49))
    n = items_to_decide(small, "paired_binary", -0.05)
    z, var = Z95, 0.1 - 0.02**2
    assert n == math.ceil(z * z * var / 0.03**2)
    assert z * math.sqrt(var / n) <= 0.03 < z * math.sqrt(var / (n - 1))
    # The score interval is a little wider than the normal one at this size: the same table on n items sits at
    # the threshold, and on a few more items (about z^2) it decides.
    # (Fractional counts keep the table's proportions exact at any n.)
    cells = np.array([0.41, 0.04, 0.06, 0.49])
    _, low, _ = _newcombe_paired(*(cells[:, None] * [n, n + 10]), 0.95)
    assert abs(low[0] - -0.05) < 0.05 * 0.03 and low[1] >= -0.05
    est = paired_binary_difference(*paired_table(41 * 5, 4 * 5, 6 * 5, 49 * 5))  # 500 items
    assert n < 500 and verdict(est, ">=", -0.05) == "pass"

    # Paired means: differences with mean 0.02 and sd 0.1 exactly; the bootstrap interval is close to the normal one.
    def differences(n: int) -> np.ndarray:
        x = np.random.default_rng(n).normal(size=n)
        return 0.02 + 0.1 * (x - x.mean()) / x.std(ddof=1)

    m = items_to_decide(paired_mean_difference(differences(30), np.zeros(30)), "paired_mean", 0.0)
    assert m == math.ceil((Z95 * 0.1 / 0.02) ** 2)
    at_m = paired_mean_difference(differences(m), np.zeros(m))
    assert abs(at_m.low) < 0.1 * 0.02
    assert verdict(paired_mean_difference(differences(m + m // 5), np.zeros(m + m // 5)), ">=", 0.0) == "pass"
    assert items_to_decide(wilson_interval(30, 100), "rate", 0.5) == math.ceil(Z95**2 * 0.21 / 0.04)
    # Nothing to decide on: the estimate on the threshold, or nothing varies.
    assert items_to_decide(paired_binary_difference(*paired_table(5, 2, 2, 5)), "paired_binary", 0.0) is None
    on_margin = paired_binary_difference(*paired_table(80, 12, 18, 90))  # -6/200, not exactly -0.03 in floats
    assert on_margin.estimate != -0.03 and items_to_decide(on_margin, "paired_binary", -0.03) is None
    assert items_to_decide(paired_binary_difference(*paired_table(5, 0, 0, 5)), "paired_binary", -0.05) is None
    assert items_to_decide(paired_mean_difference([1.0, 2.0], [0.5, 1.5]), "paired_mean", 0.0) is None


# --------------------------------------------------------------------------- Bradley-Terry


def _games_from(results: dict[tuple[int, int], tuple[float, ...]]) -> list[tuple[str, int, int, float]]:
    games, item = [], 0
    for (i, j), scores in results.items():
        for score in scores:
            games.append((f"q{item}", i, j, score))
            item += 1
    return games


def test_bradley_terry_two_players_is_the_closed_form():
    ratings = bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]))  # A beat B 3 times in 4
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert ratings.mean() == pytest.approx(1000.0)
    # Draws count half a point each: 2 wins, 2 draws, 1 loss in 5 is 3 points to 2.
    ratings = bradley_terry(np.array([[0.0, 3.0], [2.0, 0.0]]))
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(1.5), abs=1e-6)


def test_bradley_terry_is_order_independent_and_transitive():
    results = {(0, 1): (1, 1, 1, 0, 0.5, 1, 0), (1, 2): (1, 1, 0, 1, 1, 0.5), (0, 2): (1, 1, 1, 1, 0)}
    games = _games_from(results)
    ratings = [r["rating"] for r in bradley_terry_ratings(games, 3, resamples=0)]
    assert ratings[0] > ratings[1] > ratings[2] and np.mean(ratings) == pytest.approx(1000.0)
    shuffled = games[:]
    random.Random(5).shuffle(shuffled)
    # Swapping who is "i" in a game (and the score) is the same game.
    flipped = [(item, j, i, 1 - s) for item, i, j, s in shuffled]
    for variant in (shuffled, flipped):
        again = [r["rating"] for r in bradley_terry_ratings(variant, 3, resamples=0)]
        assert again == pytest.approx(ratings, abs=1e-8)


def test_bradley_terry_is_the_maximum_likelihood_fit():
    wins = np.array([[0, 5, 7, 2], [3, 0, 4, 4], [1, 4, 0, 6], [3, 3, 2, 0]], dtype=float)
    strength = 10 ** (bradley_terry(wins) / 400)
    games = wins + wins.T
    # The likelihood equations: each player's expected points equal its actual points.
    expected = (games * strength[:, None] / (strength[:, None] + strength[None, :])).sum(axis=1)
    assert expected == pytest.approx(wins.sum(axis=1), abs=1e-6)


def test_bradley_terry_stays_finite_for_an_unbeaten_or_absent_player():
    unbeaten = np.array([[0, 3, 2], [0, 0, 2], [0, 1, 0]], dtype=float)  # player 0 never lost
    ratings = bradley_terry(unbeaten)
    assert np.all(np.isfinite(ratings)) and ratings[0] > ratings[1] > ratings[2]
    absent = np.array([[0, 2, 0], [1, 0, 0], [0, 0, 0]], dtype=float)  # player 2 played no games
    ratings = bradley_terry(absent)
    assert np.all(np.isfinite(ratings)) and ratings[0] > ratings[1]
    assert bradley_terry(np.zeros((1, 1))) == pytest.approx([1000.0])


def test_bradley_terry_bootstrap_intervals_contain_the_rating_and_are_seeded():
    rng = np.random.default_rng(2)
    strengths = [2.0, 1.0, 0.5]
    games = []
    for item in range(40):  # every item is a tournament among the three players
        for i, j in [(0, 1), (1, 2), (0, 2)]:
            games.append((f"item{item}", i, j, float(rng.random() < strengths[i] / (strengths[i] + strengths[j]))))
    out = bradley_terry_ratings(games, 3, resamples=300, seed=4)
    assert [set(r) for r in out] == [{"rating", "low", "high"}] * 3
    for r in out:
        assert r["low"] <= r["rating"] <= r["high"] and r["high"] - r["low"] > 10
    assert bradley_terry_ratings(games, 3, resamples=300, seed=4) == out
    reordered = bradley_terry_ratings(list(reversed(games)), 3, resamples=300, seed=4)
    assert [r[k] for r in reordered for k in sorted(r)] == pytest.approx([r[k] for r in out for k in sorted(r)])
    assert bradley_terry_ratings(games, 3, resamples=300, seed=5) != out
    with pytest.raises(ValueError, match="score"):
        bradley_terry_ratings([("q", 0, 1, 0.3)], 2)
    with pytest.raises(ValueError, match="different"):
        bradley_terry_ratings([("q", 1, 1, 1.0)], 2)
