"""The gate's plots: each gate's interval against its threshold, and base vs fine-tuned bars (PNG, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOTTED_EVAL_METRICS = (
    "exact_match",
    "similarity_mean",
    "rouge_l",
    "token_f1",
    "refusal_rate",
    "ok_rate",
    "too_short_rate",
    "repetition_rate",
    "off_topic_rate",
    "not_declined_rate",
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt

    return plt


def plot_intervals(verdicts: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One row per gate: its interval (a bar), estimate (a dot) and threshold (a red line), saved as PNG."""
    plt = _pyplot()
    colours = {"pass": "tab:green", "fail": "tab:red", "inconclusive": "tab:orange"}
    fig, axes = plt.subplots(len(verdicts), 1, figsize=(7, 1.1 * len(verdicts) + 0.6), dpi=100, squeeze=False)
    for ax, v in zip(axes[:, 0], verdicts):
        ax.hlines(0, v["low"], v["high"], colors=colours[v["verdict"]], linewidth=6)
        ax.plot([v["estimate"]], [0], "o", color="black")
        ax.axvline(v["threshold"], color="red", linestyle="--")
        span = max(v["high"], v["threshold"]) - min(v["low"], v["threshold"])
        pad = max(span * 0.15, 0.01)
        ax.set_xlim(min(v["low"], v["threshold"]) - pad, max(v["high"], v["threshold"]) + pad)
        ax.set_yticks([])
        ax.set_title(
            f"{v['gate']}: {v['verdict']} (n={v['n']}, {v['confidence']:.1%} interval)", fontsize=8, loc="left"
        )
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp in the file
    plt.close(fig)


def plot_comparison(metrics: Mapping[str, Mapping[str, float]], names: Sequence[str], path: Path) -> None:
    """Grouped bar plot of `names` for each model label in `metrics`, saved as PNG at `path`."""
    plt = _pyplot()
    shown = [n for n in names if all(n in m for m in metrics.values())]
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(shown) + 2), 4), dpi=100)
    for offset, (label, values) in enumerate(metrics.items()):
        xs = [i + offset * width for i in range(len(shown))]
        ax.bar(xs, [values[n] for n in shown], width, label=label)
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(shown))])
    ax.set_xticklabels(
        [n.removeprefix("eval.").removeprefix("benchmark.") for n in shown], rotation=35, ha="right", fontsize=8
    )
    ax.set_ylim(min(0.0, *(v[n] for v in metrics.values() for n in shown)) if shown else 0.0, 1.0)
    ax.set_title("Base vs fine-tuned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
