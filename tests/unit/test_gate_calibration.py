"""Calibration of the forgetting gate by simulation: how often it gives the wrong verdict.

The gate: `benchmark.arc_easy.acc_norm` of the fine-tuned model minus the base's >= -MARGIN, decided on paired
per-item outcomes with `paired_binary_difference` + `verdict` at `per_look_confidence(0.95, 4)` (the growing
sample looks at 200, 400, 800 and all 2,376 ARC-Easy test items). Synthetic paired outcomes: base accuracy
0.47, 10% of items discordant (one model right, the other wrong), 2,000 seeded runs per case. Runs are drawn
as multinomial 2x2 tables and all intervals of a case come from one vectorised call to the same Newcombe
implementation the public function uses, so the file runs in about a second.

`pytest -s` prints the old point rule's wrong-verdict rates beside the new gate's, and the pass rates for a
model as good as the base over a few margins (what margin the sample can support).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stats import (
    Estimate,
    _newcombe_paired,
    minimum_detectable_effect,
    paired_binary_difference,
    per_look_confidence,
    verdict,
)

# The tolerated drop in arc_easy acc_norm (tuned - base >= -MARGIN). With 10% discordant items at the per-look
# confidence, a model as good as the base passes >= 80% of the time on all 2,376 items from a margin of about
# 0.022 (0.03 passes ~98%), on 800 items from about 0.038 (see test_margin_pass_rates). The lead may change it.
MARGIN = 0.03
BASE_ACCURACY = 0.47
DISCORDANCE = 0.10
RUNS = 2000
LOOKS = (200, 400, 800, 2376)
OVERALL_CONFIDENCE = 0.95
CONFIDENCE = per_look_confidence(OVERALL_CONFIDENCE, len(LOOKS))  # 0.9875 at each look
LOOK_ALPHA = 1 - CONFIDENCE  # two-sided error per look (0.0125)
OVERALL_ALPHA = 1 - OVERALL_CONFIDENCE
OLD_RULE_THRESHOLD = -0.02  # the old gate: point difference >= -0.02 passes
SLACK = 0.01  # one percentage point for simulation noise (sd of a 2% rate over 2,000 runs is 0.3 points)


def cell_probabilities(drop: float) -> np.ndarray:
    """P(both right), P(tuned only), P(base only), P(neither) for a true difference tuned - base = -drop."""
    tuned_only, base_only = (DISCORDANCE - drop) / 2, (DISCORDANCE + drop) / 2
    both = BASE_ACCURACY - base_only
    return np.array([both, tuned_only, base_only, 1 - both - tuned_only - base_only])


def simulate_tables(drop: float, n: int, seed: int) -> np.ndarray:
    """RUNS paired 2x2 tables of n items each, shape (RUNS, 4)."""
    return np.random.default_rng(seed).multinomial(n, cell_probabilities(drop), size=RUNS)


def gate_verdicts(tables: np.ndarray, margin: float = MARGIN) -> np.ndarray:
    """The gate's verdict for every table, through the public `verdict` on each run's interval."""
    d, low, high = _newcombe_paired(*tables.T, CONFIDENCE)
    n = int(tables[0].sum())
    return np.array(
        [
            verdict(Estimate(float(e), float(lo), float(hi), n, CONFIDENCE, "sim"), ">=", -margin)
            for e, lo, hi in zip(d, low, high)
        ]
    )


def rate(verdicts: np.ndarray, outcome: str) -> float:
    return float(np.mean(verdicts == outcome))


def old_rule_passes(tables: np.ndarray) -> np.ndarray:
    return (tables[:, 1] - tables[:, 2]) / tables.sum(axis=1) >= OLD_RULE_THRESHOLD


def sequential_verdicts(drop: float, seed: int, margin: float = MARGIN) -> np.ndarray:
    """The whole procedure: nested samples at LOOKS, stopping at the first pass or fail; else inconclusive."""
    rng = np.random.default_rng(seed)
    steps = np.diff((0, *LOOKS))
    increments = np.stack([rng.multinomial(s, cell_probabilities(drop), size=RUNS) for s in steps])
    final = np.full(RUNS, "inconclusive", dtype=object)
    undecided = np.ones(RUNS, dtype=bool)
    for tables in np.cumsum(increments, axis=0):  # the first 200 items, then the first 400, ...
        verdicts = gate_verdicts(tables, margin)
        decided = undecided & (verdicts != "inconclusive")
        final[decided] = verdicts[decided]
        undecided &= ~decided
    return final


def report(lines: list[str]) -> None:
    """Shown with `pytest -s`."""
    print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------- tests


def test_vectorised_simulation_matches_the_public_function():
    tables = simulate_tables(drop=0.0, n=100, seed=99)[:25]
    for table, fast in zip(tables, gate_verdicts(tables)):
        both, b, c, neither = map(int, table)
        tuned = [True] * both + [True] * b + [False] * c + [False] * neither
        base = [True] * both + [False] * b + [True] * c + [False] * neither
        assert verdict(paired_binary_difference(tuned, base, CONFIDENCE), ">=", -MARGIN) == fast


def test_a_model_as_good_as_the_base_rarely_fails_and_passes_on_the_full_set():
    small = gate_verdicts(simulate_tables(drop=0.0, n=100, seed=1))
    full = gate_verdicts(simulate_tables(drop=0.0, n=2376, seed=2))
    old_small = old_rule_passes(simulate_tables(drop=0.0, n=100, seed=1))
    report(
        [
            f"equal model, n=100:  gate fails {rate(small, 'fail'):.1%} "
            f"(inconclusive {rate(small, 'inconclusive'):.1%}); "
            f"old point rule wrongly fails {1 - old_small.mean():.1%}",
            f"equal model, n=2376: gate fails {rate(full, 'fail'):.1%}, passes {rate(full, 'pass'):.1%}",
        ]
    )
    assert rate(small, "fail") <= LOOK_ALPHA + SLACK
    assert rate(full, "fail") <= LOOK_ALPHA + SLACK
    assert rate(full, "pass") >= 0.80


def test_a_drop_of_twice_the_margin_rarely_passes_and_fails_on_the_full_set():
    drop = 2 * MARGIN
    small = gate_verdicts(simulate_tables(drop=drop, n=100, seed=3))
    full = gate_verdicts(simulate_tables(drop=drop, n=2376, seed=4))
    old_small = old_rule_passes(simulate_tables(drop=drop, n=100, seed=3))
    report(
        [
            f"drop of {drop:.2f}, n=100:  gate passes {rate(small, 'pass'):.1%}; old point rule wrongly passes "
            f"{old_small.mean():.1%}",
            f"drop of {drop:.2f}, n=2376: gate passes {rate(full, 'pass'):.1%}, fails {rate(full, 'fail'):.1%}",
        ]
    )
    assert rate(small, "pass") <= LOOK_ALPHA + SLACK
    assert rate(full, "pass") <= LOOK_ALPHA + SLACK
    assert rate(full, "fail") >= 0.80


def test_the_sequential_procedure_keeps_its_one_sided_error_across_looks():
    # A true drop of exactly the margin is the hardest case to refuse: passing it is the error the gate
    # bounds. Four looks at per-look confidence 0.9875 spend alpha / 2 = 2.5% one-sided in all.
    at_margin = sequential_verdicts(drop=MARGIN, seed=5)
    equal = sequential_verdicts(drop=0.0, seed=6)
    report(
        [
            f"sequential (looks {LOOKS}), drop = margin: passes {rate(at_margin, 'pass'):.1%} "
            f"(bound {OVERALL_ALPHA / 2:.1%}), fails {rate(at_margin, 'fail'):.1%}",
            f"sequential, equal model: passes {rate(equal, 'pass'):.1%}, fails {rate(equal, 'fail'):.1%}, "
            f"inconclusive {rate(equal, 'inconclusive'):.1%}",
        ]
    )
    assert rate(at_margin, "pass") <= OVERALL_ALPHA / 2 + SLACK
    assert rate(equal, "fail") <= OVERALL_ALPHA / 2 + SLACK
    assert rate(equal, "pass") >= 0.80


@pytest.mark.parametrize("n", [800, 2376])
def test_margin_pass_rates(n):
    """The margin a model as good as the base needs to pass in >= 80% of runs, beside the normal-theory MDE."""
    tables = simulate_tables(drop=0.0, n=n, seed=7)
    margins = (0.02, 0.022, 0.025, 0.03, 0.035, 0.037, 0.04, 0.05)
    passes = {m: rate(gate_verdicts(tables, m), "pass") for m in margins}
    mde = minimum_detectable_effect("paired_binary", n, DISCORDANCE, CONFIDENCE, power=0.8)
    report(
        [
            f"n={n}: MDE at 80% power {mde:.4f}; pass rate by margin: "
            + ", ".join(f"{m:.3f}: {p:.0%}" for m, p in passes.items())
        ]
    )
    # The simulation agrees with the normal approximation: about 80% at the MDE, more above it.
    assert all(passes[m] >= 0.80 for m in margins if m >= mde + 0.003)
    assert all(passes[m] < 0.80 for m in margins if m <= mde - 0.003)
