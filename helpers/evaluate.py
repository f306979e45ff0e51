"""Evaluate a trained run on its held-out test subjects: scores, intervals, figures, failures.

:func:`evaluate_run` loads a run folder written by :mod:`helpers.train`, rebuilds
exactly the data the run was trained on (same source, same preprocessing, same
subject-wise split), predicts the **validation** subjects (to choose a decision
threshold) and the **test** subjects **once**, and writes ``metrics.json`` plus
PNG figures into ``RUN/evaluation/``:

- classification: confusion matrix, ROC and PR curves with the operating point,
  reliability diagram; every score with a bootstrap 95 % interval; the threshold
  chosen on validation to reach a target sensitivity and what it costs on test;
  scores by site, by diagnosis and by lesion size; the cases ranked by error;
- segmentation: Dice, IoU, HD95 (mm) and lesion-volume error per case, their
  means with intervals, Bland-Altman agreement of volumes, scores by group.

Cases are subjects: a model that reads slices is scored per subject (its most
suspicious slice), so every approach is compared on the same test subjects.
:func:`comparison_table` puts approaches side by side (classical baselines from
:func:`classical_entries`, trained networks from :func:`run_entry`).

Command line::

    python -m helpers.evaluate --run runs/NAME [--data SOURCE] [--out DIR]

Example:
    >>> result = evaluate_run("runs/classify_binary_cnn_3d")   # doctest: +SKIP
    >>> print(result.report.get("roc_auc"))                    # doctest: +SKIP
    0.912 [0.853, 0.961]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from helpers import metrics as M
from helpers.io import DataError, write_json

SIZE_BINS = (0.0, 2.0, 10.0, 50.0, math.inf)
"""Lesion-volume bins (ml) for the failure analysis: < 2, 2-10, 10-50, >= 50 ml."""
OVERLAP_NAMES = {1: "missed (truth only)", 2: "extra (prediction only)", 3: "found (both)"}
"""Label names of :func:`overlap_labels` for the slice browser."""


# --------------------------------------------------------------------------- data of a run


@dataclass
class RunData:
    """A run's model and the data it was trained on, rebuilt for evaluation.

    Attributes:
        model: the trained model (eval mode).
        checkpoint: the checkpoint dict (classes, preprocess, history, metrics...).
        prep: the prepared splits (:class:`helpers.training_data.Prepared`).
        table: the dataset's case table (metadata: site, diagnosis, lesion volume...).
        run_dir: the run folder.
    """

    model: torch.nn.Module
    checkpoint: dict[str, Any]
    prep: Any
    table: Any
    run_dir: Path


def load_run_data(run_dir: str | Path, source: str | Path | None = None, device=None,
                  verbose: bool = False) -> RunData:
    """Load a run and rebuild its data with the preprocessing saved in the checkpoint.

    Args:
        run_dir: the run folder (``runs/NAME``).
        source: the dataset (default: the one the run was trained on).
        device: where the model runs (default ``get_device()``).
        verbose: print what was prepared.

    Raises:
        DataError: the checkpoint lacks the data record, or the rebuilt
            preprocessing differs from the run's.
    """
    from helpers.datasets import load_dataset
    from helpers.runtime import get_profile
    from helpers.train import load_run
    from helpers.training_data import prepare

    run_dir = Path(run_dir)
    model, ckpt = load_run(run_dir, device)
    pre, info = ckpt.get("preprocess") or {}, ckpt.get("data") or {}
    source = source or info.get("source")
    if not pre or not source:
        raise DataError(run_dir, "the checkpoint does not say which data and preprocessing it was "
                                 "trained with; pass --data SOURCE (and train with helpers.train.fit(..., "
                                 "preprocess=prep.preprocess, data_info=prep.info))")
    pipeline = pre["pipeline"]
    shape = pipeline.get("shape") or [None]
    size = {"volume_size": shape[0]} if pre["input"] == "volume" else {"slice_size": shape[0]}
    spacing = pipeline.get("spacing")
    profile = get_profile(info.get("profile", "auto"), spacing_mm=spacing if not isinstance(spacing, list)
                          else spacing[0], **size)
    prep = prepare(source, task=ckpt["task"], profile=profile, input=pre["input"],
                   labels=pre.get("labels") if ckpt["task"] == "classify" else "binary",
                   n_slices=pre.get("n_slices") or 16, min_lesion_pixels=pre.get("min_lesion_pixels", 5),
                   verbose=verbose)
    if prep.preprocess["pipeline"] != pipeline:
        raise DataError(run_dir, "rebuilding the run's data gave another preprocessing "
                                 f"({prep.preprocess['pipeline']} vs {pipeline})")
    table = load_dataset(source, seed=profile.seed)
    return RunData(model, ckpt, prep, table, run_dir)


def _meta(table: Any, subjects: Sequence[str]) -> pd.DataFrame:
    """One row per subject: diagnosis, site, lesion volume (where the dataset has them)."""
    df = table.df.drop_duplicates("subject").set_index("subject")
    out = pd.DataFrame(index=pd.Index(list(subjects), name="subject"))
    out["diagnosis"] = df["label"].reindex(out.index).astype(str).to_numpy()
    for col in ("site", "lesion_volume_ml", "age", "sex"):
        if col in df.columns:
            out[col] = df[col].reindex(out.index).to_numpy()
    return out


def subject_probabilities(probs: np.ndarray, subjects: Sequence[str], healthy_index: int = 0
                          ) -> tuple[list[str], np.ndarray]:
    """One probability vector per subject from per-sample (e.g. per-slice) probabilities.

    Each subject takes the probabilities of its most suspicious sample (the one
    least likely to be healthy): one lesion on one slice makes the scan abnormal.

    Returns:
        (subjects in first-seen order, ``(n_subjects, K)`` probabilities).
    """
    order: dict[str, list[int]] = {}
    for i, s in enumerate(subjects):
        order.setdefault(str(s), []).append(i)
    rows = []
    for idx in order.values():
        idx = np.asarray(idx)
        rows.append(probs[idx[np.argmin(probs[idx, healthy_index])]])
    return list(order), np.stack(rows)


def predict_subjects(data: RunData, split: str) -> tuple[list[str], np.ndarray]:
    """Class probabilities per subject of one split (``val`` or ``test``)."""
    from helpers.train import predict

    tensors = getattr(data.prep, split)
    probs = predict(data.model, tensors.x).numpy()
    subjects = data.prep.subjects[split]
    if len(subjects) == len(set(subjects)):
        return list(subjects), probs
    healthy = 0
    if "healthy" in data.prep.classes:
        healthy = data.prep.classes.index("healthy")
    return subject_probabilities(probs, subjects, healthy)


def subject_labels(data: RunData, subjects: Sequence[str]) -> np.ndarray:
    """The class index of each subject, in the run's classes (binary: healthy 0, lesion 1)."""
    from helpers.training_data import healthy_class

    df = data.table.df.drop_duplicates("subject").set_index("subject")
    names = df["label"].reindex(list(subjects)).astype(str)
    classes = data.prep.classes
    if classes == ["healthy", "lesion"] and data.prep.preprocess.get("labels") == "binary":
        healthy = healthy_class(data.table.classes)
        return (names != healthy).to_numpy().astype(np.int64)
    return np.array([classes.index(n) for n in names], dtype=np.int64)


# --------------------------------------------------------------------------- classification


def size_bin(volume_ml: float) -> str:
    """A readable lesion-size group: ``none``, ``< 2 ml``, ``2-10 ml``, ``10-50 ml``, ``>= 50 ml``."""
    if not np.isfinite(volume_ml) or volume_ml <= 0:
        return "none"
    for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:], strict=True):
        if lo <= volume_ml < hi:
            return f"< {hi:g} ml" if lo == 0 else (f">= {lo:g} ml" if math.isinf(hi) else f"{lo:g}-{hi:g} ml")
    return "none"


def group_scores(y_true: np.ndarray, y_score: np.ndarray, groups: Sequence[Any], threshold: float,
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Binary scores within each group (site, diagnosis, lesion size), with intervals.

    Sensitivity is shown only where the group has lesion cases, specificity only
    where it has healthy ones. Small groups give wide intervals: read them as
    "where to look", not as proof of a difference.
    """
    y = np.asarray(y_true)
    p = M.as_proba(y_score)[:, 1]
    pred = p >= threshold
    rows = []
    for g in pd.unique(np.asarray(groups, dtype=object)):
        sel = np.asarray(groups, dtype=object) == g
        yy, pp = y[sel], pred[sel]
        row: dict[str, Any] = {"group": g, "cases": int(sel.sum()), "with lesion": int(yy.sum())}
        stats = {"accuracy": np.ones(len(yy), bool), "sensitivity": yy == 1, "specificity": yy == 0}
        for name, members in stats.items():
            if not members.any():
                row.update({name: np.nan, f"{name} low": np.nan, f"{name} high": np.nan})
                continue
            correct = (pp == yy)[members].astype(float)
            e = M.bootstrap_mean(correct, n_boot, seed)
            row.update({name: e.value, f"{name} low": e.low, f"{name} high": e.high})
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class ClassifierEvaluation:
    """Everything :func:`evaluate_classifier` found.

    Attributes:
        report: test scores with intervals (:class:`helpers.metrics.ClassificationReport`).
        operating: the threshold chosen on validation and its test sensitivity and
            specificity with intervals (binary only, else None).
        chosen: that threshold's scores on validation.
        cases: one row per test subject: truth, probability, call, error, metadata.
        groups: ``{"site": DataFrame, "diagnosis": ..., "lesion size": ...}`` scores per group.
    """

    report: M.ClassificationReport
    operating: M.OperatingPoint | None
    chosen: M.OperatingPoint | None
    cases: pd.DataFrame
    groups: dict[str, pd.DataFrame] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = {"test": self.report.as_dict(),
               "operating_point": {"chosen_on_validation": self.chosen.as_dict() if self.chosen else None,
                                   "test": self.operating.as_dict() if self.operating else None},
               "calibration": {k: np.asarray(v).tolist()
                               for k, v in self.report.curves.get("calibration", {}).items()},
               "groups": {k: _records(v) for k, v in self.groups.items()},
               "cases": _records(self.cases.reset_index())}
        return out


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-safe dicts (nan and inf become None)."""
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else
                        v.item() if isinstance(v, np.generic) else v) for k, v in rec.items()})
    return out


def evaluate_classifier(y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray,
                        class_names: Sequence[str], meta: pd.DataFrame | None = None,
                        min_sensitivity: float = 0.95, n_boot: int = 1000, seed: int = 0,
                        ) -> ClassifierEvaluation:
    """Score a classifier's test predictions, with the threshold chosen on validation.

    Args:
        y_val, p_val: validation labels and probabilities (used only to choose the threshold).
        y_test, p_test: test labels and probabilities (``(n,)`` or ``(n, K)``).
        class_names: names in label order.
        meta: per test case metadata (index = case ids; ``site``, ``diagnosis``,
            ``lesion_volume_ml`` columns used for the groups when present).
        min_sensitivity: the clinical target for the operating point (binary).
        n_boot, seed: bootstrap settings.
    """
    p_test, p_val = np.asarray(p_test, dtype=float), np.asarray(p_val, dtype=float)
    proba = M.as_proba(p_test)
    binary = proba.shape[1] == 2
    chosen = operating = None
    threshold = 0.5
    if binary:
        try:
            chosen = M.choose_threshold(y_val, p_val, min_sensitivity)
            threshold = chosen.threshold
        except ValueError:  # validation without both classes: keep 0.5, say so
            chosen = None
    report = M.classification_report(y_test, p_test, class_names, threshold=threshold if binary else None,
                                     n_boot=n_boot, seed=seed)
    if chosen is not None:
        operating = M.operating_point(y_test, p_test, chosen, n_boot=n_boot, seed=seed)
    pred = M.predict_labels(proba, threshold if binary else None)
    index = meta.index if meta is not None else pd.RangeIndex(len(proba), name="case")
    cases = pd.DataFrame({"truth": [class_names[i] for i in y_test],
                          "call": [class_names[i] for i in pred]}, index=index)
    if binary:
        cases["probability of lesion"] = proba[:, 1]
        cases["error"] = np.abs(np.asarray(y_test) - proba[:, 1])
    else:
        cases["probability of truth"] = proba[np.arange(len(proba)), y_test]
        cases["error"] = 1 - cases["probability of truth"]
    groups: dict[str, pd.DataFrame] = {}
    if meta is not None:
        cases = cases.join(meta.drop(columns=[c for c in meta.columns if c in cases.columns]))
        if binary:
            for name, column in (("site", "site"), ("diagnosis", "diagnosis")):
                if column in meta.columns:
                    groups[name] = group_scores(y_test, proba, meta[column].astype(str).to_numpy(),
                                                threshold, n_boot, seed)
            if "lesion_volume_ml" in meta.columns:
                bins = [size_bin(float(v)) for v in meta["lesion_volume_ml"].astype(float)]
                groups["lesion size"] = group_scores(y_test, proba, bins, threshold, n_boot, seed)
    cases = cases.sort_values("error", ascending=False)
    return ClassifierEvaluation(report, operating, chosen, cases, groups)


# --------------------------------------------------------------------------- segmentation


def overlap_labels(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """One label map comparing two masks: 1 missed (truth only), 2 extra (prediction only), 3 found.

    Show it with ``helpers.viewer.show(..., labels=overlap_labels(p, t), label_names=OVERLAP_NAMES)``.
    """
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    return (t & ~p) * 1 + (p & ~t) * 2 + (p & t) * 3


@dataclass
class SegmenterEvaluation:
    """Everything :func:`evaluate_segmenter` found.

    Attributes:
        cases: one row per test case: dice, iou, hd95_mm, volumes, metadata.
        summary: ``{metric: Estimate}``: the mean over cases with an interval
            (Dice, IoU, HD95 over cases with a lesion in the truth; HD95 over cases
            where both masks are non-empty).
        bland_altman: volume agreement (:func:`helpers.metrics.bland_altman`).
        groups: mean Dice per site / diagnosis / lesion size.
    """

    cases: pd.DataFrame
    summary: dict[str, M.Estimate]
    bland_altman: dict[str, Any]
    groups: dict[str, pd.DataFrame] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        ba = {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in self.bland_altman.items()}
        return {"summary": {k: e.as_dict() for k, e in self.summary.items()}, "bland_altman": ba,
                "groups": {k: _records(v) for k, v in self.groups.items()},
                "cases": _records(self.cases.reset_index())}


def evaluate_segmenter(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                       spacings: Sequence[Sequence[float]], meta: pd.DataFrame | None = None,
                       n_boot: int = 1000, seed: int = 0) -> SegmenterEvaluation:
    """Per-case Dice, IoU, HD95 and volume error; their means with intervals; Bland-Altman.

    Args:
        preds, truths: predicted and true masks per case (any label > 0 is lesion).
        spacings: voxel size in mm per case (of the grid the masks are on).
        meta: per case metadata (index = case ids).
        n_boot, seed: bootstrap settings.
    """
    rows = [M.segmentation_scores(p, t, s)["lesion"] for p, t, s in zip(preds, truths, spacings, strict=True)]
    index = meta.index if meta is not None else pd.RangeIndex(len(rows), name="case")
    cases = pd.DataFrame(rows, index=index)
    has = cases["volume_true_ml"] > 0
    summary = {
        "dice": M.bootstrap_mean(cases["dice"].where(has), n_boot, seed),
        "iou": M.bootstrap_mean(cases["iou"].where(has), n_boot, seed),
        "hd95_mm": M.bootstrap_mean(cases["hd95_mm"].where(has), n_boot, seed),
        "volume_error_ml": M.bootstrap_mean(cases["volume_error_ml"], n_boot, seed),
        "missed_lesion_cases": M.Estimate(float(((cases["volume_pred_ml"] == 0) & has).sum())),
        "false_lesion_cases": M.Estimate(float(((cases["volume_pred_ml"] > 0) & ~has).sum())),
    }
    ba = M.bland_altman(cases["volume_pred_ml"], cases["volume_true_ml"])
    groups: dict[str, pd.DataFrame] = {}
    if meta is not None:
        cases = cases.join(meta.drop(columns=[c for c in meta.columns if c in cases.columns]))
        keys = {"site": cases.get("site"), "diagnosis": cases.get("diagnosis")}
        if "lesion_volume_ml" in cases.columns:
            keys["lesion size"] = cases["lesion_volume_ml"].astype(float).map(size_bin)
        for name, column in keys.items():
            if column is None:
                continue
            parts = []
            for g, sub in cases[has].groupby(column[has].astype(str)):
                e = M.bootstrap_mean(sub["dice"], n_boot, seed)
                parts.append({"group": g, "cases": len(sub), "dice": e.value, "dice low": e.low,
                              "dice high": e.high, "median hd95_mm": float(np.nanmedian(sub["hd95_mm"]))
                              if sub["hd95_mm"].notna().any() else np.nan})
            groups[name] = pd.DataFrame(parts)
    cases = cases.sort_values("dice")
    return SegmenterEvaluation(cases, summary, ba, groups)


# --------------------------------------------------------------------------- a whole run


@dataclass
class RunEvaluation:
    """The result of :func:`evaluate_run`.

    Attributes:
        data: the run, its model and its data.
        task: ``classify`` or ``segment``.
        classification / segmentation: the evaluation for the run's task.
        predictions: test predictions (per subject probabilities, or per case masks).
        out: folder where metrics.json and the PNGs were written (None: not written).
        files: the files written.
    """

    data: RunData
    task: str
    classification: ClassifierEvaluation | None = None
    segmentation: SegmenterEvaluation | None = None
    predictions: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def report(self) -> M.ClassificationReport | None:
        return self.classification.report if self.classification else None


def case_spacings(data: RunData, split: str = "test") -> list[tuple[float, float, float]]:
    """Voxel size (mm) of each case of a split on the preprocessed grid, from the tensor cache."""
    from helpers.cache import TensorCache
    from helpers.preprocess import PreprocessConfig, spacing_of

    cache = TensorCache(PreprocessConfig.from_dict(data.prep.preprocess["pipeline"]), verbose=False)
    rows = data.table.split(split)
    out = []
    for _, row in rows.iterrows():
        geometry = cache.get(data.table, row)["geometry"]
        out.append(tuple(float(s) for s in spacing_of(np.asarray(geometry["affine"]))))
    return out


def case_data(data: RunData, subject: str) -> dict[str, Any]:
    """One subject as the model saw it (the run's preprocessing), ready for the slice browser.

    Returns:
        dict with ``image`` ``(C, X, Y, Z)``, ``mask`` (label map or None), ``affine``
        of the preprocessed grid, ``images`` ``{modality: (array, affine)}`` (FLAIR first) and
        ``labels`` ``(mask, affine)`` for ``helpers.viewer.show``.

    Example:
        >>> case = case_data(result.data, "sub-007")                          # doctest: +SKIP
        >>> viewer.show(case["images"], labels=case["labels"])                # doctest: +SKIP
    """
    from helpers.cache import TensorCache
    from helpers.preprocess import PreprocessConfig

    df = data.table.df
    rows = df[df["subject"].astype(str) == str(subject)]
    if rows.empty:
        raise ValueError(f"no subject {subject!r} in {data.table.source}")
    cache = TensorCache(PreprocessConfig.from_dict(data.prep.preprocess["pipeline"]), verbose=False)
    item = cache.get(data.table, rows.iloc[0])
    image = item["image"].numpy()
    mask = item["mask"].numpy() if item["mask"] is not None else None
    affine = np.asarray(item["geometry"]["affine"], dtype=float)
    return {"image": image, "mask": mask, "affine": affine,
            # FLAIR first: the static view shows the first modality, and lesions are brightest there.
            "images": {m: (image[i], affine) for i, m in sorted(enumerate(data.table.modalities),
                                                                key=lambda im: im[1] != "FLAIR")},
            "labels": (mask.astype(np.int16), affine) if mask is not None else None}


def evaluate_run(run_dir: str | Path, source: str | Path | None = None, out: str | Path | None = None,
                 n_boot: int = 1000, seed: int = 0, min_sensitivity: float = 0.95, write: bool = True,
                 device=None, verbose: bool = True) -> RunEvaluation:
    """Evaluate a run on its test subjects; write metrics.json and PNG figures.

    The threshold for the operating point is chosen on the validation subjects;
    the test subjects are predicted once and only measured.

    Args:
        run_dir: the run folder.
        source: the dataset (default: the one the run was trained on).
        out: output folder (default ``RUN/evaluation``).
        n_boot: bootstrap resamples for the intervals.
        seed: bootstrap seed.
        min_sensitivity: target sensitivity for the operating point.
        write: write metrics.json and the figures.
        device: where to run the model.
        verbose: print a short summary.
    """
    data = load_run_data(run_dir, source, device)
    task = data.checkpoint["task"]
    result = RunEvaluation(data, task)
    if task == "classify":
        val_subjects, p_val = predict_subjects(data, "val")
        test_subjects, p_test = predict_subjects(data, "test")
        y_val, y_test = subject_labels(data, val_subjects), subject_labels(data, test_subjects)
        meta = _meta(data.table, test_subjects)
        result.classification = evaluate_classifier(y_val, p_val, y_test, p_test, data.prep.classes, meta,
                                                    min_sensitivity, n_boot, seed)
        result.predictions = {"subjects": test_subjects, "y": y_test, "probabilities": p_test}
    else:
        if data.prep.input != "volume":
            raise DataError(Path(run_dir), "segmentation evaluation needs a volume model (input 'volume')")
        from helpers.train import predict

        probs = predict(data.model, data.prep.test.x)
        preds = probs.argmax(1).numpy()
        truths = data.prep.test.y.numpy()
        subjects = data.prep.subjects["test"]
        meta = _meta(data.table, subjects)
        result.segmentation = evaluate_segmenter(list(preds), list(truths), case_spacings(data), meta,
                                                 n_boot, seed)
        result.predictions = {"subjects": subjects, "masks": preds, "truths": truths}
    if write:
        result.out = Path(out) if out is not None else Path(run_dir) / "evaluation"
        result.files = write_evaluation(result, result.out)
    if verbose:
        print(summary_text(result))
    return result


def summary_text(result: RunEvaluation) -> str:
    """A few lines for people: the headline scores with intervals."""
    name = result.data.run_dir.name
    if result.classification is not None:
        r = result.classification.report
        lines = [f"{name}: {r.n_cases} test subjects, {r.n_boot} bootstrap resamples"]
        keys = ["roc_auc", "accuracy", "sensitivity", "specificity", "f1", "brier"] if len(r.class_names) == 2 \
            else ["roc_auc", "accuracy"] + [f"{m}" for m in ("sensitivity", "f1")]
        for key in keys:
            scope = "overall" if len(r.class_names) == 2 or key in ("roc_auc", "accuracy") else "macro"
            lines.append(f"  {key} ({scope}): {r.get(key, scope)}")
        op = result.classification.operating
        if op is not None:
            lines.append(f"  threshold {op.threshold:.3f} (chosen on validation for sensitivity >= "
                         f"{op.target_sensitivity}): test sensitivity {op.sensitivity}, specificity {op.specificity}")
    else:
        s = result.segmentation.summary
        lines = [f"{name}: {len(result.segmentation.cases)} test cases"]
        lines += [f"  {k}: {e}" for k, e in s.items()]
    if result.out is not None:
        lines.append(f"  written to {result.out}")
    return "\n".join(lines)


def write_evaluation(result: RunEvaluation, out: str | Path) -> list[Path]:
    """Write ``metrics.json`` and the figures (PNG) of an evaluation into ``out``."""
    from matplotlib.figure import Figure

    from helpers import plots

    def subplots(figsize: tuple[float, float]):
        # A bare Figure (no pyplot): nothing is shown in a notebook and no backend is changed.
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    payload: dict[str, Any] = {"run": str(result.data.run_dir), "task": result.task,
                               "classes": result.data.prep.classes,
                               "source": result.data.prep.info.get("source"),
                               "test_subjects": len(set(result.data.prep.subjects["test"]))}

    def save(fig, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110)
        files.append(path)

    if result.classification is not None:
        ev = result.classification
        payload.update(ev.as_dict())
        r, op = ev.report, ev.operating
        for name, draw in (("confusion.png", lambda ax: plots.plot_confusion(r, ax)),
                           ("roc.png", lambda ax: plots.plot_roc(r, op, ax)),
                           ("pr.png", lambda ax: plots.plot_pr(r, op, ax))):
            fig, ax = subplots((5, 4.4))
            draw(ax)
            save(fig, name)
        if "calibration" in r.curves:
            fig, ax = subplots((5, 4.6))
            plots.plot_reliability(r, ax)
            save(fig, "calibration.png")
    else:
        ev = result.segmentation
        payload.update(ev.as_dict())
        fig, ax = subplots((6, 4.2))
        plots.plot_bland_altman(ev.bland_altman, ax)
        save(fig, "bland_altman.png")
    write_json(out / "metrics.json", payload)
    files.append(out / "metrics.json")
    return files


# --------------------------------------------------------------------------- finding or making runs


def find_run(source: str | Path, task: str = "classify", model: str = "cnn", input: str = "volume",
             labels: str = "binary", pipeline: dict[str, Any] | None = None,
             runs: str | Path | None = None) -> Path | None:
    """A finished run folder trained on ``source`` with this task, model and input, if any.

    Looks through every ``runs/*/checkpoint.pt`` (notebook 05 leaves its runs there).
    With ``pipeline`` the preprocessing must match too. The newest match wins.
    """
    from helpers.paths import runs_dir
    from helpers.train import load_checkpoint

    want = str(Path(source).resolve())
    found = []
    for ckpt_path in sorted(runs_dir(runs).glob("*/checkpoint.pt")):
        try:
            ckpt = load_checkpoint(ckpt_path)
        except DataError:
            continue
        pre, info = ckpt.get("preprocess") or {}, ckpt.get("data") or {}
        if not ckpt.get("finished") or ckpt.get("task") != task or not info.get("source"):
            continue
        if (str(Path(info["source"]).resolve()) != want or pre.get("input") != input
                or ckpt.get("model_config", {}).get("name") != model):
            continue
        if task == "classify" and pre.get("labels") != labels:
            continue
        if pipeline is not None and pre.get("pipeline") != pipeline:
            continue
        found.append((ckpt_path.stat().st_mtime, ckpt_path.parent))
    return max(found)[1] if found else None


def ensure_run(source: str | Path, profile: Any, model: str = "cnn", input: str = "volume",
               task: str = "classify", labels: str = "binary", name: str | None = None,
               runs: str | Path | None = None, verbose: bool = True, **model_kwargs: Any) -> Path:
    """A trained run for this data, model and input: found in ``runs/`` or trained now.

    An existing finished run on the same data and preprocessing (for example from
    notebook 05) is reused as it is. Otherwise a small one is trained with the
    profile's settings into ``runs/<task>_<labels>_<model>_<dims>d_<profile>``.

    Args:
        source: the dataset.
        profile: a :class:`helpers.runtime.Profile` (sizes, epochs, time cap, seed).
        model: a name from :data:`helpers.models.MODEL_NAMES`.
        input: ``volume`` or ``slices``.
        task: ``classify`` or ``segment``.
        labels: ``binary`` or ``diagnosis`` (classification).
        name: the run folder name (default as above).
        runs: the runs folder (default ``helpers.paths.runs_dir()``).
        verbose: say whether the run was found or trained.
        **model_kwargs: depth, width... for :func:`helpers.models.build_model`.
    """
    from helpers.models import build_model
    from helpers.paths import runs_dir
    from helpers.train import TrainConfig, default_run_name, fit
    from helpers.training_data import prepare

    prep = prepare(source, task=task, profile=profile, input=input, labels=labels, verbose=False)
    found = find_run(source, task, model, input, labels, prep.preprocess["pipeline"], runs)
    if found is not None:
        if verbose:
            print(f"Using the trained run {found}")
        return found
    run_dir = runs_dir(runs) / (name or default_run_name(task, model, prep.dims, labels) + f"_{profile.name}")
    torch.manual_seed(profile.seed)
    net = build_model(model, prep.in_channels, prep.num_classes, dims=prep.dims, **model_kwargs)
    # cnn_gru runs 2D convolutions inside a 3D input: channels-last-3d (which bf16 autocast on
    # a CPU switches on) cannot be applied to it, so it trains in float32.
    config = TrainConfig.from_profile(profile, task=task, dims=prep.dims, model=model,
                                      mixed_precision=False if model == "cnn_gru" else None)
    start = time.perf_counter()
    fit(net, prep.train, prep.val, config, run_dir, test=prep.test, classes=prep.classes,
        preprocess=prep.preprocess, data_info=prep.info, progress=False, live_plot=False)
    if verbose:
        print(f"Trained {run_dir.name} ({model}, {input}) in {time.perf_counter() - start:.1f} s")
    return run_dir


# --------------------------------------------------------------------------- comparing approaches


def run_entry(run_dir: str | Path, approach: str | None = None, source: str | Path | None = None,
              device=None) -> dict[str, Any]:
    """Validation and test predictions per subject of a trained classifier run, for the comparison.

    Returns:
        dict with ``approach``, ``y_val``, ``p_val``, ``y_test``, ``p_test``,
        ``subjects`` (test), ``parameters`` and ``train_seconds``.
    """
    from helpers.models import count_parameters

    data = load_run_data(run_dir, source, device)
    val_subjects, p_val = predict_subjects(data, "val")
    test_subjects, p_test = predict_subjects(data, "test")
    return {"approach": approach or Path(run_dir).name,
            "y_val": subject_labels(data, val_subjects), "p_val": p_val,
            "y_test": subject_labels(data, test_subjects), "p_test": p_test, "subjects": test_subjects,
            "parameters": count_parameters(data.model),
            "train_seconds": float(data.checkpoint.get("train_seconds", math.nan))}


def classical_size(model: Any) -> int:
    """How many numbers a fitted scikit-learn model stores (its 'parameters').

    SVM: support vectors, their weights and the intercept; random forest: every
    tree node's split feature, threshold and leaf values; linear models:
    coefficients and intercept. A rough count, to set beside network weights.
    """
    est = model[-1] if hasattr(model, "steps") else model
    if hasattr(est, "support_vectors_"):
        return int(est.support_vectors_.size + est.dual_coef_.size + est.intercept_.size)
    if hasattr(est, "estimators_"):
        return int(sum(t.tree_.node_count * (2 + t.tree_.value.shape[-1]) for t in est.estimators_))
    if hasattr(est, "coef_"):
        return int(est.coef_.size + np.size(est.intercept_))
    return 0


def classical_entries(prep: Any, seed: int = 42, models: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Fit the classical baselines (handcrafted features) on the training subjects; predict val and test.

    Args:
        prep: a prepared *volume* classification dataset (:func:`helpers.training_data.prepare`)
            with head masks (``prep.brains``).
        seed: seed of the models.
        models: names from :func:`helpers.features.classical_models` (default all).

    Returns:
        entries for :func:`comparison_table`; ``train_seconds`` counts feature
        extraction for the training subjects plus fitting.
    """
    from helpers import features

    def frame(split: str) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        data, heads = getattr(prep, split), prep.brains[split]
        rows = [features.extract_features(x.numpy(), h.numpy(), prep.modalities)
                for x, h in zip(data.x, heads, strict=True)]
        return pd.DataFrame(rows).to_numpy(float), time.perf_counter() - start

    (x_train, t_feat), (x_val, _), (x_test, _) = frame("train"), frame("val"), frame("test")
    y_train = prep.train.y.numpy()
    entries = []
    for name, model in features.classical_models(seed).items():
        if models is not None and name not in models:
            continue
        start = time.perf_counter()
        model.fit(x_train, y_train)
        fit_seconds = time.perf_counter() - start
        entries.append({"approach": name, "y_val": prep.val.y.numpy(),
                        "p_val": features.class_scores(model, x_val),
                        "y_test": prep.test.y.numpy(), "p_test": features.class_scores(model, x_test),
                        "subjects": list(prep.subjects["test"]), "parameters": classical_size(model),
                        "train_seconds": t_feat + fit_seconds})
    return entries


COMPARISON_METRICS = ("roc_auc", "sensitivity", "specificity", "f1", "accuracy")


def comparison_table(entries: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0,
                     metrics: Sequence[str] = COMPARISON_METRICS) -> pd.DataFrame:
    """One table of every approach: test scores with 95 % intervals, size and training time.

    Every entry must hold predictions for the same test subjects (checked), so
    the rows compare like with like. Binary decisions use 0.5 on the class-1 score.

    Args:
        entries: dicts from :func:`classical_entries` and :func:`run_entry` (or
            your own with ``approach``, ``y_test``, ``p_test``, ``parameters``,
            ``train_seconds``, and optionally ``subjects``).
        n_boot, seed: bootstrap settings. Entries are put in the first entry's subject
            order, so every row is scored on the same resamples.
        metrics: scores to tabulate (macro averages for more than two classes).

    Returns:
        a DataFrame with ``approach``, ``test subjects``, each metric with
        ``low`` and ``high`` columns, ``parameters`` and ``train seconds``.
    """
    rows, reference = [], None
    for e in entries:
        y, p = np.asarray(e["y_test"]), np.asarray(e["p_test"])
        subjects = e.get("subjects")
        if subjects is not None:
            subjects = [str(s) for s in subjects]
            if reference is None:
                reference = subjects
            elif sorted(subjects) != sorted(reference):
                raise ValueError(f"{e['approach']}: its test subjects differ from the first entry's; "
                                 "compare approaches on the same subjects")
            else:  # same subjects in the first entry's order: the same resamples for every row
                order = [subjects.index(s) for s in reference]
                y, p = y[order], p[order]
        r = M.classification_report(y, p, n_boot=n_boot, seed=seed)
        row: dict[str, Any] = {"approach": e["approach"], "test subjects": r.n_cases}
        for m in metrics:
            scope = "overall" if len(r.class_names) == 2 or m in ("roc_auc", "accuracy") else "macro"
            est = r.get(m, scope)
            row.update({m: est.value, f"{m} low": est.low, f"{m} high": est.high})
        row["parameters"] = int(e.get("parameters", 0))
        row["train seconds"] = float(e.get("train_seconds", math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def format_intervals(table: pd.DataFrame, metrics: Sequence[str], keep: Sequence[str] = ()) -> pd.DataFrame:
    """Columns ``m``, ``m low``, ``m high`` as one readable column ``0.91 [0.85-0.96]`` each.

    Missing values (a group without lesions has no sensitivity) show as ``-``.
    """
    out = table[list(keep)].copy()
    for m in metrics:
        out[m] = ["-" if not np.isfinite(v) else f"{v:.2f} [{lo:.2f}-{hi:.2f}]" if np.isfinite(lo)
                  else f"{v:.2f}" for v, lo, hi in zip(table[m], table[f"{m} low"], table[f"{m} high"], strict=True)]
    return out


def format_table(table: pd.DataFrame, metrics: Sequence[str] = COMPARISON_METRICS) -> pd.DataFrame:
    """The comparison table for people: ``0.91 [0.85-0.96]`` per score."""
    out = format_intervals(table, [m for m in metrics if m in table.columns], ["approach", "test subjects"])
    out["parameters"] = [f"{int(p):,}" for p in table["parameters"]]
    out["train seconds"] = table["train seconds"].round(1)
    return out.set_index("approach")


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.evaluate --run runs/NAME [--data SOURCE] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.evaluate",
        description="Evaluate a trained run on its held-out test subjects: scores with bootstrap "
                    "95 %% intervals as JSON, figures as PNG.")
    parser.add_argument("--run", required=True, help="the run folder written by helpers.train")
    parser.add_argument("--data", default=None, help="dataset (default: the one the run was trained on)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/evaluation)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--min-sensitivity", type=float, default=0.95,
                        help="target sensitivity of the operating point, chosen on validation (default 0.95)")
    args = parser.parse_args(argv)
    try:
        evaluate_run(args.run, args.data, args.out, n_boot=args.n_boot, seed=args.seed,
                     min_sensitivity=args.min_sensitivity)
    except (DataError, ValueError) as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
