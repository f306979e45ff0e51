"""Handcrafted features for the classical baselines of notebook 03.

Before deep learning, image classification meant *describing* each scan with a
few dozen numbers a person chose, then fitting a classical model (a support
vector machine, a random forest, a logistic regression) on those numbers. The
features here are the usual ones for brain MRI, computed inside the brain mask
of a preprocessed (intensity-normalised) volume:

- **intensity histogram**: the share of brain voxels in each intensity bin, per
  contrast (a lesion brighter than normal tissue shifts mass into the top bins);
- **tissue volume fractions**: the brain split into three intensity classes
  (dark, middle, bright: on T1w roughly CSF, grey and white matter) by a 1D
  k-means, and the share of each;
- **texture**: how much intensity changes between neighbouring voxels (gradient
  magnitude), and how varied small neighbourhoods are (local standard deviation);
- **left-right asymmetry**: how different the brain is from its mirror image
  (a healthy brain is nearly symmetric; a one-sided lesion is not).

Example:
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).normal(size=(2, 16, 16, 16)).astype(np.float32)
    >>> feats = extract_features(vol, np.ones((16, 16, 16), bool), channel_names=["T1w", "FLAIR"])
    >>> round(feats["T1w_tissue_bright"] + feats["T1w_tissue_middle"] + feats["T1w_tissue_dark"], 6)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

HIST_RANGE = (-3.0, 4.0)
"""Histogram range, in z-score units (intensities normalised per brain)."""


def inner_mask(head: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """The head mask shrunk by ``fraction`` of the image edge, to leave out scalp and skull.

    Bright scalp fat otherwise dominates the top of the intensity histogram and
    hides a bright lesion (measured in notebook 03: whole-head features scored
    near chance). A cheap stand-in for skull stripping, which costs seconds per scan.

    Example:
        >>> m = np.ones((20, 20, 20), bool)
        >>> int(inner_mask(m, 0.1).sum())    # 2 voxels off every side
        4096
    """
    iterations = max(1, round(fraction * max(head.shape)))
    return ndimage.binary_erosion(np.asarray(head, bool), iterations=iterations, border_value=0)


def histogram_features(channel: np.ndarray, brain: np.ndarray, bins: int = 12,
                       value_range: tuple[float, float] = HIST_RANGE) -> np.ndarray:
    """Share of brain voxels per intensity bin (values outside the range go to the end bins)."""
    values = np.clip(channel[brain], value_range[0], value_range[1] - 1e-6)
    counts, _ = np.histogram(values, bins=bins, range=value_range)
    return counts / max(1, values.size)


def _kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 20) -> np.ndarray:
    """Cluster centres of a 1D k-means, started at quantiles (deterministic)."""
    centres = np.quantile(values, np.linspace(0.15, 0.85, k))
    for _ in range(iterations):
        labels = np.abs(values[:, None] - centres[None]).argmin(1)
        new = np.array([values[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def tissue_fractions(channel: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Fractions of brain voxels in the dark, middle and bright intensity classes (sum 1)."""
    values = channel[brain].astype(np.float64)
    if values.size < 3:
        return np.full(3, np.nan)
    centres = _kmeans_1d(values)
    labels = np.abs(values[:, None] - centres[None]).argmin(1)
    return np.bincount(labels, minlength=3) / values.size


def texture_features(channel: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Mean and 95th percentile of gradient magnitude and of 3-voxel local standard deviation."""
    grad = np.sqrt(sum(g.astype(np.float64) ** 2 for g in np.gradient(channel)))
    mean = ndimage.uniform_filter(channel.astype(np.float64), 3)
    sq = ndimage.uniform_filter(channel.astype(np.float64) ** 2, 3)
    local_std = np.sqrt(np.clip(sq - mean**2, 0, None))
    g, s = grad[brain], local_std[brain]
    return np.array([g.mean(), np.percentile(g, 95), s.mean(), np.percentile(s, 95)])


def asymmetry_features(channel: np.ndarray, brain: np.ndarray, axis: int = 0) -> np.ndarray:
    """Left-right asymmetry: mean and 99th percentile of |image - mirror image| in the brain.

    ``axis`` is the left-right axis (0 in the RAS orientation the series uses). The
    mirror is taken about the centre of the brain mask along that axis.
    """
    coords = np.nonzero(brain.any(axis=tuple(i for i in range(brain.ndim) if i != axis)))[0]
    if coords.size == 0:
        return np.full(2, np.nan)
    lo, hi = coords.min(), coords.max() + 1
    sl = [slice(None)] * channel.ndim
    sl[axis] = slice(lo, hi)
    part, mask = channel[tuple(sl)], brain[tuple(sl)]
    diff = np.abs(part - np.flip(part, axis))[mask & np.flip(mask, axis)]
    if diff.size == 0:
        return np.full(2, np.nan)
    return np.array([diff.mean(), np.percentile(diff, 99)])


def extract_features(image: np.ndarray, brain: np.ndarray | None = None,
                     channel_names: Sequence[str] | None = None, bins: int = 12) -> dict[str, float]:
    """Every handcrafted feature of one preprocessed case, as ``name -> value``.

    Args:
        image: ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) normalised intensities.
        brain: boolean brain mask (None: voxels that are not the background value).
        channel_names: a name per channel (default ``ch0``, ``ch1``...).
        bins: histogram bins per channel.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and (brain is None or brain.ndim == 3):
        image = image[None]
    if brain is None:
        brain = image[0] > image[0].min()
    brain = np.asarray(brain, bool)
    if not brain.any():
        raise ValueError("extract_features: the brain mask is empty")
    names = list(channel_names) if channel_names is not None else [f"ch{i}" for i in range(len(image))]
    out: dict[str, float] = {"brain_voxels": float(brain.sum())}
    for name, channel in zip(names, image, strict=True):
        values = channel[brain]
        out[f"{name}_mean"], out[f"{name}_std"] = float(values.mean()), float(values.std())
        out[f"{name}_p99"] = float(np.percentile(values, 99))
        edges = np.linspace(*HIST_RANGE, bins + 1)
        for i, share in enumerate(histogram_features(channel, brain, bins)):
            out[f"{name}_hist_{edges[i]:+.1f}"] = float(share)
        for cls, frac in zip(("dark", "middle", "bright"), tissue_fractions(channel, brain), strict=True):
            out[f"{name}_tissue_{cls}"] = float(frac)
        for key, val in zip(("grad_mean", "grad_p95", "localstd_mean", "localstd_p95"),
                            texture_features(channel, brain), strict=True):
            out[f"{name}_{key}"] = float(val)
        for key, val in zip(("asym_mean", "asym_p99"), asymmetry_features(channel, brain), strict=True):
            out[f"{name}_{key}"] = float(val)
    return out


def feature_groups(columns: Sequence[str]) -> dict[str, list[str]]:
    """Feature columns grouped by kind: histogram, tissue, texture, asymmetry, other."""
    groups: dict[str, list[str]] = {"histogram": [], "tissue": [], "texture": [], "asymmetry": [], "other": []}
    for c in columns:
        if "_hist_" in c:
            groups["histogram"].append(c)
        elif "_tissue_" in c:
            groups["tissue"].append(c)
        elif "_grad_" in c or "_localstd_" in c:
            groups["texture"].append(c)
        elif "_asym_" in c:
            groups["asymmetry"].append(c)
        else:
            groups["other"].append(c)
    return groups


def classical_models(seed: int = 42) -> dict:
    """The three classical classifiers of notebook 03, each a scikit-learn pipeline.

    Features are standardised (mean 0, standard deviation 1) inside the pipeline,
    so cross-validation learns the scaling on the training folds only.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "logistic regression": make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=5000, C=0.5, class_weight="balanced")),
        "SVM (RBF kernel)": make_pipeline(StandardScaler(), SVC(
            C=1.0, class_weight="balanced", decision_function_shape="ovr", random_state=seed)),
        "random forest": make_pipeline(StandardScaler(), RandomForestClassifier(
            n_estimators=300, min_samples_leaf=2, class_weight="balanced", random_state=seed, n_jobs=1)),
    }


def class_scores(model, x: np.ndarray) -> np.ndarray:
    """Per-class scores that sum to 1: ``predict_proba``, or a softmax of the SVM's decision values.

    ROC-AUC only needs a ranking, so the SVM's raw decision values work as scores
    (no probability calibration needed).
    """
    if hasattr(model, "predict_proba"):
        try:
            return model.predict_proba(x)
        except AttributeError:
            pass
    d = np.asarray(model.decision_function(x), dtype=np.float64)
    if d.ndim == 1:
        d = np.stack([-d, d], axis=1) / 2
    e = np.exp(d - d.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def compare_classifiers(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                        cv_folds: int = 5, seed: int = 42):
    """Cross-validate each classical model inside the training split, then score it on validation.

    Cross-validation uses the training split only (stratified folds; fewer folds
    when a class has fewer training samples than ``cv_folds``), so the validation
    and test subjects never influence a choice.

    Returns:
        ``(table, fitted)``: a DataFrame with the cross-validated ROC-AUC (mean and
        standard deviation over folds) and the validation ROC-AUC and balanced
        accuracy per model; and the models refitted on the whole training split.
    """
    import pandas as pd
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    classes = np.unique(y_train)
    binary = len(classes) == 2
    scoring = "roc_auc" if binary else "roc_auc_ovr"
    folds = int(min(cv_folds, np.bincount(y_train).min() if len(y_train) else 2))
    rows, fitted = [], {}
    for name, model in classical_models(seed).items():
        row = {"model": name}
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            scores = cross_val_score(model, x_train, y_train, cv=cv, scoring=scoring)
            row.update({"cv ROC-AUC (train split)": scores.mean(), "cv sd": scores.std(), "folds": folds})
        model.fit(x_train, y_train)
        scores = class_scores(model, x_val)
        present = np.unique(y_val)
        if len(present) < 2 or (not binary and len(present) < len(classes)):
            auc = float("nan")
        else:
            auc = roc_auc_score(y_val, scores[:, 1]) if binary else roc_auc_score(
                y_val, scores, multi_class="ovr", labels=classes)
        row.update({"validation ROC-AUC": auc,
                    "validation balanced accuracy": balanced_accuracy_score(y_val, model.predict(x_val))})
        rows.append(row)
        fitted[name] = model
    return pd.DataFrame(rows).set_index("model"), fitted
