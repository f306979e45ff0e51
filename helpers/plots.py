"""The evaluation figures: confusion matrix, ROC and PR curves, reliability diagram, Bland-Altman.

Each function draws on a matplotlib axis (made for you when ``ax`` is None) and
returns it, so notebooks can arrange them and :mod:`helpers.evaluate` can save
them as PNG. Axes are labelled in words a clinician uses, and every curve names
its score and interval in the legend.

Example:
    >>> import numpy as np
    >>> from helpers import metrics
    >>> y = np.array([0, 0, 1, 1, 1, 0]); p = np.array([0.1, 0.6, 0.8, 0.7, 0.3, 0.2])
    >>> ax = plot_roc(metrics.classification_report(y, p, n_boot=50))
    >>> ax.get_xlabel()
    '1 - specificity (false-positive rate)'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from helpers.metrics import ClassificationReport, Estimate, OperatingPoint


def _axis(ax, figsize: tuple[float, float] = (4.6, 4.2)):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _ci(e: Estimate) -> str:
    return f"{e.value:.2f}" if np.isnan(e.low) else f"{e.value:.2f} [{e.low:.2f}-{e.high:.2f}]"


def plot_confusion(report: ClassificationReport, ax=None, title: str | None = None):
    """Confusion matrix: counts, and each row's share (of the truly-X cases, how many were called Y)."""
    ax = _axis(ax)
    cm = report.confusion
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = report.class_names
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 2 else 0, ha="right" if len(names) > 2 else "center")
    ax.set_yticks(range(len(names)), names)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n({share[i, j]:.0%})", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=9)
    ax.set(xlabel="model's call", ylabel="truth",
           title=title or f"Confusion matrix ({report.n_cases} cases)")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    return ax


def plot_roc(report: ClassificationReport, operating: OperatingPoint | None = None, ax=None,
             label: str | None = None, title: str | None = None):
    """ROC curve(s) with AUC and its interval; the operating point marked if given."""
    ax = _axis(ax)
    curves = report.curves.get("roc", {})
    binary = len(report.class_names) == 2
    for name, c in curves.items():
        auc = report.get("roc_auc") if binary else report.get("roc_auc", name)
        text = (label or "model") if binary else name
        # Straight segments between thresholds: tied scores give a diagonal step, as the AUC counts them.
        ax.plot(c["fpr"], c["tpr"], lw=2, label=f"{text}: AUC {_ci(auc)}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC 0.5)")
    if operating is not None:
        ax.plot(1 - operating.specificity.value, operating.sensitivity.value, "o", ms=9, mfc="none",
                mew=2, color="crimson",
                label=f"threshold {operating.threshold:.2f}: sens {operating.sensitivity.value:.2f}, "
                      f"spec {operating.specificity.value:.2f}")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal",
           title=title or f"ROC curve ({report.n_cases} cases)")
    ax.legend(loc="lower right", fontsize=8)
    return ax


def plot_pr(report: ClassificationReport, operating: OperatingPoint | None = None, ax=None,
            label: str | None = None, title: str | None = None):
    """Precision-recall curve(s) with average precision; the prevalence line is chance."""
    ax = _axis(ax)
    curves = report.curves.get("pr", {})
    binary = len(report.class_names) == 2
    for name, c in curves.items():
        text = (label or "model") if binary else name
        ap = report.get("average_precision") if binary else None
        suffix = f": AP {_ci(ap)}" if ap is not None else ""
        # Each precision holds over the recall it gained ("pre" steps): the area is the AP.
        ax.step(c["recall"], c["precision"], where="pre", lw=2, label=f"{text}{suffix}")
    if binary:
        prevalence = report.confusion[1].sum() / max(report.confusion.sum(), 1)
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance (prevalence {prevalence:.2f})")
    if operating is not None:
        tp = operating.sensitivity.value * report.confusion[1].sum()
        fp = (1 - operating.specificity.value) * report.confusion[0].sum()
        if tp + fp > 0:
            ax.plot(operating.sensitivity.value, tp / (tp + fp), "o", ms=9, mfc="none", mew=2,
                    color="crimson", label=f"threshold {operating.threshold:.2f}")
    ax.set(xlabel="sensitivity (recall)", ylabel="precision (positive predictive value)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), title=title or "Precision-recall curve")
    ax.legend(loc="lower left", fontsize=8)
    return ax


def plot_reliability(report: ClassificationReport, ax=None, title: str | None = None):
    """Reliability diagram: predicted probability against the observed rate, per bin.

    Points on the diagonal mean "when the model says 70 %, about 70 % have a
    lesion". Marker area grows with the number of cases in the bin.
    """
    ax = _axis(ax)
    cal = report.curves.get("calibration")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if cal is not None and len(cal["count"]):
        sizes = 30 + 170 * cal["count"] / cal["count"].max()
        ax.plot(cal["predicted"], cal["observed"], "-", color="tab:blue", lw=1)
        ax.scatter(cal["predicted"], cal["observed"], s=sizes, color="tab:blue", zorder=3)
        ax.plot([], [], "o", color="tab:blue", ms=7,
                label=f"model (Brier {_ci(report.get('brier'))}, ECE {_ci(report.get('ece'))})")
        for x, y, n in zip(cal["predicted"], cal["observed"], cal["count"], strict=True):
            ax.annotate(str(int(n)), (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set(xlabel="predicted probability of a lesion", ylabel="observed share with a lesion",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal",
           title=title or "Reliability diagram (numbers: cases per bin)")
    ax.legend(loc="upper left", fontsize=8)
    return ax


def plot_bland_altman(ba: dict[str, Any], ax=None, units: str = "ml", title: str | None = None,
                      labels: Sequence[str] | None = None):
    """Bland-Altman plot: difference (measured - reference) against the mean of the two.

    The solid line is the bias (average difference), the dashed lines the 95 %
    limits of agreement.
    """
    ax = _axis(ax, (5.4, 4.0))
    ax.scatter(ba["mean"], ba["difference"], s=30, color="tab:blue", zorder=3)
    if labels is not None:
        for x, y, text in zip(ba["mean"], ba["difference"], labels, strict=True):
            ax.annotate(str(text), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(ba["bias"], color="crimson", lw=1.5, label=f"bias {ba['bias']:+.2f} {units}")
    for key in ("loa_low", "loa_high"):
        ax.axhline(ba[key], color="crimson", ls="--", lw=1)
    if np.isfinite(ba["sd"]):
        ax.plot([], [], color="crimson", ls="--",
                label=f"95 % limits {ba['loa_low']:+.2f} to {ba['loa_high']:+.2f} {units}")
    ax.set(xlabel=f"mean of predicted and true volume ({units})",
           ylabel=f"predicted - true volume ({units})",
           title=title or f"Bland-Altman: lesion volume ({ba['n']} cases)")
    ax.legend(fontsize=8, loc="best")
    return ax


def plot_intervals(table, metric: str, ax=None, label_column: str = "approach", title: str | None = None):
    """A forest plot: one row per model, the point estimate and its 95 % interval.

    Args:
        table: a DataFrame with ``label_column`` and ``{metric}``, ``{metric} low``,
            ``{metric} high`` columns (as :func:`helpers.evaluate.comparison_table` gives).
        metric: the score to show.
    """
    ax = _axis(ax, (6.0, 0.5 + 0.45 * len(table)))
    rows = table.reset_index(drop=True)
    y = np.arange(len(rows))[::-1]
    v = rows[metric].to_numpy(float)
    lo, hi = rows[f"{metric} low"].to_numpy(float), rows[f"{metric} high"].to_numpy(float)
    ax.errorbar(v, y, xerr=[np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)], fmt="o",
                capsize=4, color="tab:blue")
    ax.set_yticks(y, rows[label_column])
    ax.set(xlabel=f"{metric} (dot: test-set value; bar: 95 % bootstrap interval)", xlim=(-0.02, 1.02),
           title=title or f"{metric} by approach")
    ax.grid(axis="x", alpha=0.3)
    return ax
