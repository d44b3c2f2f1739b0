"""benchmarks/paired.py: how two methods are compared over seeds (../shared/EXPERIMENTS.md), for compare.py and
tree_compare.py. Seed s gives every method the same training prompts in the same order and the same held-out set, so
the question is whether the per-seed differences d_s = metric(method, s) - metric(baseline, s) are away from 0:

    mean_ci         a mean over seeds with its 95% t interval: mean ± t_{0.975, n-1} * sd / sqrt(n)
    paired          the mean paired difference, its 95% t interval, and the two-sided Wilcoxon signed-rank p-value
                    (scipy.stats.wilcoxon, exact for small n without ties; with 8 pairs the smallest p is 2/256)
    verdict         the decision rule written in docs/LOG.md before the runs: a method beats (or trails) its baseline
                    when the 95% interval of the paired difference excludes 0; otherwise "not significantly different"
    plot_paired     one line per seed from the baseline's value to the method's (a paired "slope" plot)
scipy is a benchmark-only dependency (pip install scipy); the training code never imports it.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.cli import pyplot, save_figure


def t_quantile(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def mean_ci(values: Sequence[float]) -> dict:
    """{"n", "mean", "low", "high"}: the mean and its 95% t interval (None bounds for n < 2).
        mean_ci([0.5, 0.6, 0.7]): mean 0.6, sd 0.1, t_{0.975, 2} = 4.303 -> 0.6 ± 0.248 = [0.352, 0.848]"""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None}
    half = t_quantile(len(values)) * statistics.stdev(values) / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "low": mean - half, "high": mean + half}


def paired(method: Sequence[Optional[float]], baseline: Sequence[Optional[float]]) -> dict:
    """The paired comparison over the seeds where both have a value: mean_ci of d = method - baseline, plus the
    two-sided Wilcoxon signed-rank p-value of d (1.0 when every d is 0: nothing to rank).
        paired([0.6, 0.7, 0.8, 0.9, 0.7, 0.6, 0.8, 0.9], [0.5] * 8): d all > 0 -> p = 2/256 = 0.0078"""
    from scipy import stats

    pairs = [(m, b) for m, b in zip(method, baseline) if m is not None and b is not None]
    diffs = [m - b for m, b in pairs]
    result = mean_ci(diffs)
    if len(diffs) < 2 or all(abs(d) < 1e-12 for d in diffs):
        result["p"] = 1.0 if diffs else None
    else:
        result["p"] = float(stats.wilcoxon(diffs).pvalue)
    result["diffs"] = diffs
    return result


def verdict(comparison: dict, method: str, baseline: str) -> str:
    """The decision rule (docs/LOG.md, 2026-12-05): 'beats' / 'trails' when the 95% interval of the paired difference
    excludes 0, else 'not significantly different from'.
        {"low": 0.01, "high": 0.09} -> "grpo_2g beats grpo";  {"low": -0.02, "high": 0.05} -> "... not ..." """
    if comparison.get("low") is None:
        return f"{method} vs {baseline}: too few seeds"
    if comparison["low"] > 0:
        return f"{method} beats {baseline}"
    if comparison["high"] < 0:
        return f"{method} trails {baseline}"
    return f"{method} is not significantly different from {baseline}"


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ci_text(summary: dict, digits: int = 3) -> str:
    """"0.600 [0.352, 0.848]" (mean [95% CI]), or the bare mean for one seed."""
    if summary["mean"] is None:
        return "n/a"
    if summary["low"] is None:
        return fmt(summary["mean"], digits)
    return f"{fmt(summary['mean'], digits)} [{fmt(summary['low'], digits)}, {fmt(summary['high'], digits)}]"


def digits(key: str) -> int:
    """Decimals to print a metric with: 1 for lengths in tokens (len_after), 3 for shares (acc_after, success_after,
    auc)."""
    return 1 if key.startswith("len") else 3


def paired_tables(values: dict, pairs: Sequence[tuple], metrics: Sequence[tuple]) -> tuple:
    """Markdown and numbers. values: {method: {metric: [one value per seed, in one seed order]}}; pairs: (method,
    baseline) for each comparison; metrics: (key, label). Returns (markdown, {"method vs baseline": {key: paired}})."""
    lines = ["| method | n | " + " | ".join(f"{label}: mean [95% CI]" for _, label in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for method, per_metric in values.items():
        cells = [ci_text(mean_ci(per_metric[key]), digits(key)) for key, _ in metrics]
        n = len([v for v in per_metric[metrics[0][0]] if v is not None])
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "| method vs baseline | n | " + " | ".join(f"{label}: paired difference [95% CI], Wilcoxon p"
                                                            for _, label in metrics) + " | decision (accuracy) |",
              "|" + "---|" * (len(metrics) + 3)]
    numbers = {}
    for method, baseline in pairs:
        if method not in values or baseline not in values:
            continue
        row = {key: paired(values[method][key], values[baseline][key]) for key, _ in metrics}
        numbers[f"{method} vs {baseline}"] = row
        cells = [f"{ci_text(row[key], digits(key))}, p = {fmt(row[key]['p'])}" for key, _ in metrics]
        lines.append(f"| {method} vs {baseline} | {row[metrics[0][0]]['n']} | " + " | ".join(cells)
                     + f" | {verdict(row[metrics[0][0]], method, baseline)} |")
    return "\n".join(lines), numbers


def plot_paired(values: dict, pairs: Sequence[tuple], key: str, label: str, path: Path) -> bool:
    """One panel per (method, baseline): a line per seed from the baseline's value (left) to the method's (right),
    and the means in black. False when matplotlib is missing."""
    plt = pyplot()
    pairs = [(m, b) for m, b in pairs if m in values and b in values]
    if plt is None or not pairs:
        return False
    # at least 5 inches wide, or a single panel cuts its two-line title
    figure, axes = plt.subplots(1, len(pairs), figsize=(max(5.0, 2.6 * len(pairs)), 3.8), squeeze=False, sharey=True)
    for axis, (method, baseline) in zip(axes.flat, pairs):
        both = [(b, m) for m, b in zip(values[method][key], values[baseline][key]) if m is not None and b is not None]
        for b, m in both:
            axis.plot([0, 1], [b, m], color="tab:green" if m > b else "tab:red" if m < b else "grey", alpha=0.6,
                      marker="o", markersize=3)
        if both:
            axis.plot([0, 1], [statistics.mean(b for b, _ in both), statistics.mean(m for _, m in both)],
                      color="black", linewidth=2.5)
        axis.set_xticks([0, 1], [baseline, method], rotation=20, fontsize=7)
        axis.set_xlim(-0.3, 1.3)
        axis.grid(alpha=0.3)
    axes.flat[0].set_ylabel(label)
    figure.suptitle(f"{label}, paired by seed\n(a line per seed; green: the method higher; black: the means)",
                    fontsize=9)
    return save_figure(plt, figure, path)
