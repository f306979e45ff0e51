"""How good is a model? Classification and segmentation scores with bootstrap intervals.

Everything here is plain NumPy/SciPy: predictions in, numbers out. The notebooks
and :mod:`helpers.evaluate` turn model outputs into the arrays these functions take.

**Classification.** :func:`classification_report` gives the confusion matrix and,
for each class and averaged over classes, accuracy, sensitivity (recall),
specificity, precision and F1, plus ROC AUC, average precision (the area under
the precision-recall curve), the Brier score and the expected calibration error,
each with a bootstrap 95 % confidence interval.

**Bootstrap.** The test set is one sample of the patients the model will meet.
Resampling its cases with replacement (here, each case is one subject) and
recomputing a score many times shows how much that score would move with another
sample of the same size: the middle 95 % of the resampled scores is the
*percentile bootstrap* 95 % interval. Resampling is stratified by the true class,
so every resample keeps each class's count (and an AUC is always defined). The
resamples are held as a matrix of case weights (how often each case was drawn),
so all of them are scored at once with matrix products: 2,000 resamples of a few
hundred cases take a fraction of a second.

**Operating point.** A screening tool may need sensitivity of at least 0.95.
:func:`choose_threshold` picks that threshold on *validation* data; the test set
then only measures what it costs (:func:`operating_point`), because a threshold
tuned on the test set would make the test scores optimistic.

**Segmentation.** :func:`dice`, :func:`iou`, :func:`hausdorff95` (in mm, from the
voxel spacing), :func:`volume_ml` and :func:`bland_altman` for volume agreement.
Empty masks have explicit conventions (see :func:`dice` and :func:`hausdorff95`).

Example:
    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1, 1, 0])
    >>> p = np.array([0.1, 0.6, 0.8, 0.7, 0.3, 0.2])
    >>> report = classification_report(y, p, n_boot=200, seed=0)
    >>> round(report.value("accuracy"), 3), round(report.value("roc_auc"), 3)
    (0.667, 0.889)
    >>> dice(np.ones((2, 2), bool), np.array([[1, 1], [0, 0]], bool))
    0.6666666666666666
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """A score with its percentile-bootstrap confidence interval.

    Attributes:
        value: the score on all the cases (the point estimate).
        low: lower end of the interval (nan when no bootstrap was run).
        high: upper end of the interval.
        level: the interval's coverage, e.g. 0.95.
    """

    value: float
    low: float = math.nan
    high: float = math.nan
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        """``{"value", "low", "high"}`` with non-finite numbers as None (valid JSON)."""
        return {k: _finite_or_none(getattr(self, k)) for k in ("value", "low", "high")}

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


# --------------------------------------------------------------------------- bootstrap


def bootstrap_weights(n: int, n_boot: int, seed: int | None = 0,
                      strata: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """Case weights for ``n_boot`` bootstrap resamples of ``n`` cases.

    Row ``b`` holds how many times each case was drawn in resample ``b`` (each row
    sums to ``n``). With ``strata`` (for example the true class), every stratum is
    resampled within itself, so every resample keeps each stratum's size.

    Args:
        n: number of cases.
        n_boot: number of resamples.
        seed: seed for the random generator (same seed, same resamples).
        strata: one label per case, or None for plain resampling.

    Returns:
        an ``(n_boot, n)`` float array of draw counts.

    Example:
        >>> w = bootstrap_weights(5, 3, seed=1, strata=[0, 0, 1, 1, 1])
        >>> w.shape, w[:, :2].sum(axis=1).tolist()
        ((3, 5), [2.0, 2.0, 2.0])
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [
        np.flatnonzero(np.asarray(strata) == s) for s in np.unique(np.asarray(strata))
    ]
    if strata is not None and len(np.asarray(strata)) != n:
        raise ValueError(f"strata has {len(np.asarray(strata))} labels for {n} cases")
    counts = np.zeros(n_boot * n, dtype=np.int64)
    rows = (np.arange(n_boot) * n)[:, None]
    for members in groups:
        draws = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        counts += np.bincount((rows + draws).ravel(), minlength=n_boot * n)
    return counts.reshape(n_boot, n).astype(np.float64)


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = 1000,
              seed: int | None = 0, strata: Sequence[Any] | np.ndarray | None = None,
              level: float = 0.95) -> Estimate | list[Estimate]:
    """Percentile bootstrap interval for any statistic written over case weights.

    ``statistic`` takes a ``(B, n)`` weight matrix and returns ``B`` values (or a
    ``(B, k)`` array for ``k`` statistics at once). The point estimate is the
    statistic with every weight 1.

    Args:
        statistic: the weighted statistic, vectorised over rows.
        n: number of cases.
        n_boot: resamples (0 gives the point estimate with nan bounds).
        seed: random seed.
        strata: resample within these groups (e.g. the true class).
        level: coverage of the interval.

    Returns:
        one :class:`Estimate`, or a list of them when the statistic returns ``k`` columns.

    Example:
        >>> x = np.array([1.0, 2.0, 3.0, 4.0])
        >>> weighted_mean = lambda w: (w @ x) / w.sum(axis=1)
        >>> bootstrap(weighted_mean, 4, n_boot=500, seed=0).value
        2.5
    """
    point = np.asarray(statistic(np.ones((1, n))), dtype=float)
    if n_boot <= 0:
        lows = highs = np.full(point.shape[1:], np.nan)
    else:
        stats = np.asarray(statistic(bootstrap_weights(n, n_boot, seed, strata)), dtype=float)
        tail = 100 * (1 - level) / 2
        with np.errstate(invalid="ignore"):
            lows, highs = np.nanpercentile(stats, [tail, 100 - tail], axis=0)
    if point.ndim == 1:
        return Estimate(float(point[0]), float(lows), float(highs), level)
    return [Estimate(float(v), float(lo), float(hi), level)
            for v, lo, hi in zip(point[0], np.atleast_1d(lows), np.atleast_1d(highs), strict=True)]


def bootstrap_mean(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int | None = 0,
                   level: float = 0.95) -> Estimate:
    """Mean of per-case values (e.g. Dice per subject) with a bootstrap interval.

    Non-finite values (nan) are left out, and so is their weight.

    Example:
        >>> round(bootstrap_mean([0.8, 0.9, 0.7], n_boot=0).value, 6)
        0.8
    """
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    x0 = np.where(ok, x, 0.0)

    def stat(w: np.ndarray) -> np.ndarray:
        wk = w * ok
        with np.errstate(invalid="ignore", divide="ignore"):
            return (wk @ x0) / wk.sum(axis=1)

    if not ok.any():
        return Estimate(math.nan, math.nan, math.nan, level)
    return bootstrap(stat, len(x), n_boot, seed, None, level)


# --------------------------------------------------------------------------- classification


def as_proba(y_score: np.ndarray) -> np.ndarray:
    """(n,) positive-class scores or (n, K) class probabilities -> (n, K) with K >= 2."""
    s = np.asarray(y_score, dtype=float)
    if s.ndim == 1:
        return np.stack([1 - s, s], axis=1)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must be (n,) or (n, K>=2); got shape {s.shape}")
    return s


def _check_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one label per case; got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.any(np.mod(y, 1) != 0):
            raise ValueError("y_true must hold integer class indices 0..K-1")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"y_true holds labels outside 0..{n_classes - 1}")
    return y


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     n_classes: int | None = None) -> np.ndarray:
    """Counts of (true class, predicted class): rows are the truth, columns the prediction.

    Example:
        >>> confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1]).tolist()
        [[1, 1], [0, 2]]
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    k = int(n_classes if n_classes is not None else max(t.max(initial=0), p.max(initial=0)) + 1)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def predict_labels(y_score: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class decisions from scores: positive when score >= threshold (binary), else argmax.

    Args:
        y_score: (n,) positive-class probabilities or (n, K) class probabilities.
        threshold: for two classes, the positive-class probability at or above
            which a case is called positive (default 0.5). Ignored for K > 2.
    """
    proba = as_proba(y_score)
    if proba.shape[1] == 2:
        return (proba[:, 1] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    return proba.argmax(axis=1)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with 0 where b == 0 (scikit-learn's zero_division=0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def _counts(w: np.ndarray, truth1h: np.ndarray, pred1h: np.ndarray) -> tuple[np.ndarray, ...]:
    """Weighted TP, FP, FN, TN per class: each (B, K)."""
    tp = w @ (truth1h * pred1h)
    fp = w @ ((1 - truth1h) * pred1h)
    fn = w @ (truth1h * (1 - pred1h))
    tn = w.sum(axis=1, keepdims=True) - tp - fp - fn
    return tp, fp, fn, tn


def _weights_per_score(score: np.ndarray, positive: np.ndarray, w: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Total weight of positive and of negative cases at each distinct score, lowest first.

    One sort of the n scores, then sums over runs of tied scores: O(B x n).
    """
    s = np.asarray(score, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    order = np.argsort(s, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(s[order]) != 0])
    ws = w[:, order]
    pos_w = np.add.reduceat(ws * pos[order], starts, axis=1)
    all_w = np.add.reduceat(ws, starts, axis=1)
    return pos_w, all_w - pos_w


def weighted_auc(score: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of case weights: P(score of a positive > score of a negative).

    Ties count one half (the Mann-Whitney definition, which equals the area under
    the ROC curve). Cost O(B * n) after one sort.

    Args:
        score: (n,) scores, higher meaning more likely positive.
        positive: (n,) booleans, the truth.
        w: (B, n) case weights.

    Returns:
        (B,) AUCs (nan for a row without positives or without negatives).
    """
    pos_w, neg_w = _weights_per_score(score, positive, w)  # (B, m), lowest score first
    below = np.cumsum(neg_w, axis=1) - neg_w            # negatives strictly below each value
    num = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    den = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_average_precision(score: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (area under the precision-recall curve, step-wise) per weight row.

    The scikit-learn definition: sum over thresholds of (recall gained) x precision,
    thresholds at each distinct score from the highest down.

    Returns:
        (B,) values (nan for a row without positives).
    """
    pos_w, neg_w = _weights_per_score(score, positive, w)
    pos_w, all_w = pos_w[:, ::-1], (pos_w + neg_w)[:, ::-1]  # highest score first
    tp = np.cumsum(pos_w, axis=1)
    called = np.cumsum(all_w, axis=1)
    total_pos = tp[:, -1:]
    precision = _safe_div(tp, called)
    recall_gain = _safe_div(pos_w, np.broadcast_to(total_pos, pos_w.shape))
    ap = (recall_gain * precision).sum(axis=1)
    return np.where(total_pos[:, 0] > 0, ap, np.nan)


def _bin_ids(prob: np.ndarray, n_bins: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.percentile(prob, np.linspace(0, 100, n_bins + 1))
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', not {strategy!r}")
    return np.searchsorted(edges[1:-1], prob), edges


def calibration_curve(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                      n_bins: int = 10, strategy: str = "uniform") -> dict[str, np.ndarray]:
    """Reliability-diagram data: in each probability bin, predicted vs observed frequency.

    Binary only: ``prob`` is the predicted probability of class 1. The same bins
    as scikit-learn's ``calibration_curve``; empty bins are dropped.

    Returns:
        dict with ``predicted`` (mean probability in the bin), ``observed``
        (fraction of positives in the bin), ``count`` (cases in the bin) and
        ``edges`` (all bin edges).

    Example:
        >>> c = calibration_curve([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_bins=2)
        >>> c["observed"].tolist(), c["count"].tolist()
        ([0.0, 1.0], [2, 2])
    """
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(prob, dtype=float)
    if p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    ids, edges = _bin_ids(p, n_bins, strategy)
    total = np.bincount(ids, minlength=n_bins)
    keep = total > 0
    return {
        "predicted": (np.bincount(ids, weights=p, minlength=n_bins)[keep] / total[keep]),
        "observed": (np.bincount(ids, weights=y, minlength=n_bins)[keep] / total[keep]),
        "count": total[keep],
        "edges": edges,
    }


def weighted_brier(proba: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Brier score per weight row: mean squared distance between probabilities and truth.

    For two classes this is mean((p - y)^2) with p the probability of class 1
    (0 is perfect, 1 the worst; always answering 0.5 scores 0.25). For K > 2
    classes it is Brier's original mean over cases of sum_k (p_k - y_k)^2, which
    runs from 0 to 2 (scikit-learn's convention for both).
    """
    onehot = np.eye(proba.shape[1])[y]
    per_case = ((proba - onehot) ** 2).sum(axis=1)
    if proba.shape[1] == 2:
        per_case = per_case / 2  # (p1 - y1)^2 + (p0 - y0)^2 = 2 (p1 - y1)^2
    return (w @ per_case) / w.sum(axis=1)


def weighted_ece(proba: np.ndarray, y: np.ndarray, w: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Expected calibration error per weight row (equal-width bins).

    Binary: bins of the class-1 probability, |observed rate - mean probability|
    per bin, weighted by the share of cases in the bin. K classes: the same on the
    top-class confidence against whether the top class was right.
    """
    if proba.shape[1] == 2:
        conf, hit = proba[:, 1], (y == 1).astype(float)
    else:
        conf, hit = proba.max(axis=1), (proba.argmax(axis=1) == y).astype(float)
    ids, _ = _bin_ids(conf, n_bins, "uniform")
    onehot = np.zeros((len(ids), n_bins))
    onehot[np.arange(len(ids)), ids] = 1.0
    gap = np.abs(w @ (onehot * hit[:, None]) - w @ (onehot * conf[:, None]))  # = cases in bin x |obs - pred|
    return gap.sum(axis=1) / w.sum(axis=1)


CLASS_METRICS = ("sensitivity", "specificity", "precision", "f1")
"""Scores reported per class (one class against the rest) and averaged."""


@dataclass
class ClassificationReport:
    """Scores of one classifier on one set of cases, each with its bootstrap interval.

    Attributes:
        estimates: ``{(metric, scope): Estimate}``; scope is a class name,
            ``"macro"`` (plain mean over classes), ``"weighted"`` (mean weighted
            by class size) or ``"overall"``.
        confusion: confusion matrix (rows truth, columns prediction).
        class_names: names of the classes, in label order.
        threshold: the positive-class threshold used (binary), else None.
        n_cases: number of cases scored.
        n_boot: number of bootstrap resamples.
        curves: ROC, PR and calibration curve data for plotting.
    """

    estimates: dict[tuple[str, str], Estimate]
    confusion: np.ndarray
    class_names: list[str]
    threshold: float | None
    n_cases: int
    n_boot: int
    curves: dict[str, Any] = field(default_factory=dict)

    def get(self, metric: str, scope: str = "overall") -> Estimate:
        """One score. For binary problems per-class scores default to the positive class.

        Example: ``report.get("sensitivity", "lesion")`` or ``report.get("roc_auc")``.
        """
        if (metric, scope) in self.estimates:
            return self.estimates[(metric, scope)]
        if scope == "overall" and len(self.class_names) == 2:
            return self.estimates[(metric, self.class_names[1])]
        raise KeyError(f"no score {metric!r} for {scope!r}; have {sorted(set(self.estimates))}")

    def value(self, metric: str, scope: str = "overall") -> float:
        """The point estimate of one score."""
        return self.get(metric, scope).value

    def table(self):
        """All scores as a tidy pandas DataFrame: metric, scope, value, low, high."""
        import pandas as pd

        rows = [{"metric": m, "scope": s, "value": e.value, "low": e.low, "high": e.high}
                for (m, s), e in self.estimates.items()]
        return pd.DataFrame(rows)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: scores with intervals, confusion matrix, settings."""
        scores: dict[str, dict[str, Any]] = {}
        for (m, s), e in self.estimates.items():
            scores.setdefault(m, {})[s] = e.as_dict()
        return {
            "n_cases": self.n_cases, "n_boot": self.n_boot, "threshold": self.threshold,
            "class_names": self.class_names, "confusion_matrix": self.confusion.tolist(),
            "scores": scores,
        }


def classification_report(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                          class_names: Sequence[str] | None = None, threshold: float | None = None,
                          n_boot: int = 1000, seed: int | None = 0, level: float = 0.95,
                          n_bins: int = 10) -> ClassificationReport:
    """Every classification score, with stratified percentile-bootstrap intervals.

    Per class (that class against all others): sensitivity (recall: of the cases
    that have it, the share called so), specificity (of the cases that do not, the
    share called negative), precision (of the cases called so, the share right)
    and F1 (harmonic mean of precision and sensitivity), with their macro and
    weighted averages; overall: accuracy, ROC AUC, average precision, Brier score,
    expected calibration error (ECE). For K > 2 the AUC and AP are macro averages
    of one-vs-rest values (also reported per class).

    Args:
        y_true: true class per case, integers 0..K-1 (1 = positive when binary).
        y_score: (n,) probability of class 1, or (n, K) class probabilities.
        class_names: names for display (default ``"0"``, ``"1"``...).
        threshold: binary only: class-1 probability at or above which a case is
            called positive (default 0.5). Choose it on validation data
            (:func:`choose_threshold`), never on the test set.
        n_boot: bootstrap resamples (0: point estimates only).
        seed: seed for the resamples.
        level: interval coverage.
        n_bins: bins for the ECE and the calibration curve.

    Example:
        >>> r = classification_report([0, 1, 1, 0], [0.2, 0.9, 0.4, 0.1], n_boot=0)
        >>> r.value("sensitivity"), r.value("specificity"), r.value("roc_auc")
        (0.5, 1.0, 1.0)
    """
    proba = as_proba(y_score)
    n, k = proba.shape
    y = _check_labels(y_true, k)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels but {n} scores")
    names = [str(c) for c in (class_names if class_names is not None else range(k))]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    binary = k == 2
    thr = (0.5 if threshold is None else float(threshold)) if binary else None
    pred = predict_labels(proba, thr)
    truth1h, pred1h = np.eye(k)[y], np.eye(k)[pred]
    support = truth1h.sum(axis=0)
    present = [c for c in range(k) if support[c] > 0 and support[c] < n]

    def stat(w: np.ndarray) -> np.ndarray:
        tp, fp, fn, tn = _counts(w, truth1h, pred1h)
        total = w.sum(axis=1)
        per = {
            "sensitivity": _safe_div(tp, tp + fn),
            "specificity": _safe_div(tn, tn + fp),
            "precision": _safe_div(tp, tp + fp),
        }
        per["f1"] = _safe_div(2 * tp, 2 * tp + fp + fn)
        class_w = w @ truth1h
        cols = [tp.sum(axis=1) / total]  # accuracy
        for name in CLASS_METRICS:
            v = per[name]
            cols += [v[:, c] for c in range(k)]
            cols.append(v.mean(axis=1))
            cols.append((v * class_w).sum(axis=1) / total)
        aucs = [weighted_auc(proba[:, c], y == c, w) for c in present]
        aps = [weighted_average_precision(proba[:, c], y == c, w) for c in present]
        nan = np.full(len(w), np.nan)
        if binary:
            cols += [aucs[-1] if 1 in present else nan, aps[-1] if 1 in present else nan]
        else:
            cols += [np.mean(aucs, axis=0) if aucs else nan, np.mean(aps, axis=0) if aps else nan]
            cols += aucs + aps
        cols += [weighted_brier(proba, y, w), weighted_ece(proba, y, w, n_bins)]
        return np.stack(cols, axis=1)

    keys = [("accuracy", "overall")]
    for name in CLASS_METRICS:
        keys += [(name, c) for c in names] + [(name, "macro"), (name, "weighted")]
    keys += [("roc_auc", "overall"), ("average_precision", "overall")]
    if not binary:
        keys += [("roc_auc", names[c]) for c in present] + [
            ("average_precision", names[c]) for c in present]
    keys += [("brier", "overall"), ("ece", "overall")]
    estimates = bootstrap(stat, n, n_boot, seed, strata=y, level=level)
    report = ClassificationReport(dict(zip(keys, estimates, strict=True)),
                                  confusion_matrix(y, pred, k), names, thr, n, n_boot)
    report.curves = {"roc": {}, "pr": {}}
    for c in present if not binary else [1]:
        report.curves["roc"][names[c]] = roc_curve(y == c, proba[:, c])
        report.curves["pr"][names[c]] = pr_curve(y == c, proba[:, c])
    if binary:
        report.curves["calibration"] = calibration_curve(y, proba[:, 1], n_bins)
    return report


def roc_curve(positive: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray
              ) -> dict[str, np.ndarray]:
    """ROC curve points: false-positive rate and sensitivity at every distinct threshold.

    A case is called positive when its score >= threshold. The first point is
    (0, 0) at threshold +inf.

    Returns:
        dict with ``fpr``, ``tpr`` (sensitivity) and ``threshold`` arrays.
    """
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=float)
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(pos)[last]
    fp = np.cumsum(~pos)[last]
    n_pos, n_neg = max(pos.sum(), 1), max((~pos).sum(), 1)
    return {"fpr": np.r_[0.0, fp / n_neg], "tpr": np.r_[0.0, tp / n_pos],
            "threshold": np.r_[np.inf, s[last]]}


def pr_curve(positive: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray
             ) -> dict[str, np.ndarray]:
    """Precision-recall curve points at every distinct threshold (highest first).

    Starts at recall 0 with precision 1 (nothing called positive), as scikit-learn does.

    Returns:
        dict with ``recall``, ``precision`` and ``threshold`` arrays.
    """
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=float)
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(pos)[last].astype(float)
    called = (last + 1).astype(float)
    return {"recall": np.r_[0.0, tp / max(pos.sum(), 1)], "precision": np.r_[1.0, tp / called],
            "threshold": np.r_[np.inf, s[last]]}


# --------------------------------------------------------------------------- operating point


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and what it does on a set of cases.

    Attributes:
        threshold: call a case positive when its probability >= threshold.
        target_sensitivity: the sensitivity asked for when choosing it.
        sensitivity: sensitivity at this threshold (with interval on test data).
        specificity: specificity at this threshold (with interval on test data).
        chosen_on: which cases it was chosen on (``validation``) or measured on.
    """

    threshold: float
    target_sensitivity: float
    sensitivity: Estimate
    specificity: Estimate
    chosen_on: str

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "target_sensitivity": self.target_sensitivity,
                "sensitivity": self.sensitivity.as_dict(),
                "specificity": self.specificity.as_dict(), "chosen_on": self.chosen_on}


def choose_threshold(y_val: Sequence[int] | np.ndarray, score_val: Sequence[float] | np.ndarray,
                     min_sensitivity: float = 0.95) -> OperatingPoint:
    """The highest threshold whose sensitivity on VALIDATION cases reaches a target.

    Lowering a threshold can only raise sensitivity and lower specificity, so the
    highest threshold that still meets the sensitivity target is the one that
    keeps the most specificity. It is the k-th highest score among the positive
    cases, with k = ceil(target x number of positives).

    Use it on validation data, then measure the result on the test set with
    :func:`operating_point`: choosing on the test set would flatter the test scores.

    Example:
        >>> op = choose_threshold([0, 0, 1, 1, 1, 1], [0.1, 0.5, 0.4, 0.6, 0.8, 0.9], 0.75)
        >>> op.threshold, op.sensitivity.value, op.specificity.value
        (0.6, 0.75, 1.0)
    """
    y = np.asarray(y_val, dtype=np.int64)
    s = as_proba(score_val)[:, 1]
    if not 0 < min_sensitivity <= 1:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    pos_scores = np.sort(s[y == 1])[::-1]
    if not len(pos_scores) or not (y == 0).any():
        raise ValueError("choosing a threshold needs validation cases of both classes")
    k = math.ceil(min_sensitivity * len(pos_scores) - 1e-9)
    thr = float(pos_scores[k - 1])
    pred = s >= thr
    sens = float(pred[y == 1].mean())
    spec = float((~pred[y == 0]).mean())
    return OperatingPoint(thr, min_sensitivity, Estimate(sens), Estimate(spec), "validation")


def operating_point(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                    chosen: OperatingPoint | float, n_boot: int = 1000, seed: int | None = 0,
                    level: float = 0.95) -> OperatingPoint:
    """Sensitivity and specificity (with intervals) of a fixed threshold on new cases.

    Args:
        y_true: true labels (0/1) of the cases, typically the test set.
        y_score: their class-1 probabilities.
        chosen: an :class:`OperatingPoint` from :func:`choose_threshold` or a threshold.
        n_boot, seed, level: bootstrap settings.
    """
    thr = chosen.threshold if isinstance(chosen, OperatingPoint) else float(chosen)
    target = chosen.target_sensitivity if isinstance(chosen, OperatingPoint) else math.nan
    r = classification_report(y_true, y_score, threshold=thr, n_boot=n_boot, seed=seed,
                              level=level)
    return OperatingPoint(thr, target, r.get("sensitivity"), r.get("specificity"), "test")


# --------------------------------------------------------------------------- segmentation


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} differs from truth shape {b.shape}")
    return a, b


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|A and B| / (|A| + |B|): 1 is a perfect match, 0 no overlap.

    Convention: both masks empty -> 1.0 (the model correctly found nothing);
    exactly one empty -> 0.0.
    """
    a, b = _pair(pred, truth)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard) |A and B| / |A or B|; same empty conventions as Dice."""
    a, b = _pair(pred, truth)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary voxels: in the mask, with a face neighbour outside it.

    Voxels on the edge of the array count as boundary (outside the array is outside).
    """
    m = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, truth: np.ndarray,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each boundary voxel of one mask to the nearest of the other.

    Returns:
        (from pred's boundary to truth's, from truth's boundary to pred's); empty
        arrays when a mask is empty.
    """
    a, b = _pair(pred, truth)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * a.ndim))
    if len(spacing) != a.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for {a.ndim}D masks")
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        return np.empty(0), np.empty(0)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
                percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries, in mm.

    For each boundary voxel of one mask, the distance to the nearest boundary voxel
    of the other; the 95th percentile in each direction; the larger of the two
    (the convention of MONAI and the BraTS challenges). Ignoring the worst 5 % keeps
    a few stray voxels from dominating, unlike the plain (100th-percentile) Hausdorff.

    Conventions: both masks empty -> 0.0; exactly one empty -> nan (there is no
    boundary to measure to: count such cases separately as missed or false lesions).

    Args:
        pred, truth: masks of the same shape.
        spacing: voxel size in mm per axis (default 1 mm).
        percentile: 95 by default; 100 gives the classic Hausdorff distance.

    Example:
        >>> a = np.zeros((1, 1, 10), bool); b = a.copy()
        >>> a[0, 0, 2] = True; b[0, 0, 5] = True
        >>> hausdorff95(a, b, spacing=(1, 1, 2.0))
        6.0
    """
    a, b = _pair(pred, truth)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.nan
    d_ab, d_ba = surface_distances(a, b, spacing)
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a mask in millilitres (1 ml = 1,000 mm^3).

    Example:
        >>> volume_ml(np.ones((10, 10, 10), bool), (1.0, 1.0, 1.0))
        1.0
    """
    return float(np.count_nonzero(mask) * np.prod(np.asarray(spacing, dtype=float)) / 1000.0)


def segmentation_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                        regions: dict[str, Sequence[int]] | None = None) -> dict[str, dict[str, float]]:
    """Dice, IoU, HD95 and volumes for one case, for each region of a label map.

    Args:
        pred, truth: integer label maps (0 background) or binary masks.
        spacing: voxel size in mm.
        regions: ``{name: [label values]}``, e.g. ``{"whole tumour": [1, 2, 3],
            "core": [1, 3]}``. Default: one region, ``lesion`` = any label > 0.

    Returns:
        ``{region: {"dice", "iou", "hd95_mm", "volume_true_ml", "volume_pred_ml",
        "volume_error_ml"}}``; volume error is predicted minus true.
    """
    p, t = np.asarray(pred), np.asarray(truth)
    out: dict[str, dict[str, float]] = {}
    for name, values in (regions or {"lesion": None}).items():
        pm = p > 0 if values is None else np.isin(p, list(values))
        tm = t > 0 if values is None else np.isin(t, list(values))
        vt, vp = volume_ml(tm, spacing), volume_ml(pm, spacing)
        out[name] = {"dice": dice(pm, tm), "iou": iou(pm, tm), "hd95_mm": hausdorff95(pm, tm, spacing),
                     "volume_true_ml": vt, "volume_pred_ml": vp, "volume_error_ml": vp - vt}
    return out


def bland_altman(measured: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray
                 ) -> dict[str, Any]:
    """Bland-Altman agreement between two measurements of the same cases (e.g. volumes).

    The bias is the mean difference (measured - reference); the 95 % limits of
    agreement are bias +- 1.96 standard deviations of the differences: about 95 %
    of cases' differences fall between them, if the differences are roughly normal.

    Returns:
        dict with ``mean`` (per-case average of the two), ``difference`` (per-case),
        ``bias``, ``sd``, ``loa_low``, ``loa_high`` and ``n``.

    Example:
        >>> ba = bland_altman([10.0, 12.0, 9.0], [9.0, 11.0, 10.0])
        >>> round(ba["bias"], 3)
        0.333
    """
    m = np.asarray(measured, dtype=float)
    r = np.asarray(reference, dtype=float)
    if m.shape != r.shape:
        raise ValueError(f"{m.shape} measured values vs {r.shape} reference values")
    diff = m - r
    bias = float(diff.mean()) if diff.size else math.nan
    sd = float(diff.std(ddof=1)) if diff.size > 1 else math.nan
    return {"mean": (m + r) / 2, "difference": diff, "bias": bias, "sd": sd,
            "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": int(diff.size)}
