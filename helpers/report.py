"""The one-page report of a prediction: key slices with overlays, probabilities, volume, disclaimer.

:func:`report_figure` draws one A4-portrait page for a scan predicted by
:mod:`helpers.predict`: a header (case, date, input files), the class
probabilities as bars with the predicted diagnosis, the lesion volume, three
planes (axial, coronal, sagittal) through the centre of the predicted lesion with
the lesion mask outlined, the same planes with the lesion probability map, the
preprocessing that was applied, and the statement that this is a teaching model,
not a medical device. :func:`write_report` saves it as PNG.

Display rules come from :mod:`helpers.orientation` (canonical RAS+ first, aspect
from voxel spacing, anatomical letters on the edges), as in every figure of the series.

Example:
    >>> import numpy as np, nibabel as nib
    >>> from helpers.predict import CaseResult
    >>> img = nib.Nifti1Image(np.random.default_rng(0).random((40, 48, 40)).astype(np.float32), np.diag([4.0, 4, 4, 1]))
    >>> fig = report_figure(CaseResult("demo", diagnosis="healthy", probabilities={"healthy": 0.8, "lesion": 0.2}), img)
    >>> len(fig.axes) >= 4
    True
"""

from __future__ import annotations

import datetime as _dt
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from helpers.gallery import draw_edge_letters
from helpers.io import atomic_path
from helpers.orientation import SLICE_AXIS, VIEWS, pixel_aspect, plane, voxel_spacing

DISCLAIMER = ("TEACHING MODEL, NOT A MEDICAL DEVICE.\nTrained on simulated data: "
              "never use it to diagnose or treat a patient.")


def _canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj)


def key_voxel(mask: np.ndarray | None, prob: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """The voxel the report's planes go through: the lesion's centre of mass, else the most
    probable voxel, else the volume's centre (all in the canonical grid)."""
    if mask is not None and mask.any():
        return tuple(int(round(v)) for v in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    if prob is not None and prob.max() > 0:
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(prob)), prob.shape))  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def report_figure(result: Any, image: nib.Nifti1Image, mask: np.ndarray | None = None,
                  prob: np.ndarray | None = None, models: Sequence[str] = (), modality: str = "",
                  threshold: float = 0.5) -> Figure:
    """The one-page report as a matplotlib Figure (no pyplot state, safe in loops).

    Args:
        result: a :class:`helpers.predict.CaseResult` (case, diagnosis,
            probabilities, lesion volume, inputs, preprocessing steps).
        image: the scan (first modality) on its stored grid.
        mask, prob: the lesion mask and probability map on the same grid, or None.
        models: the run names used.
        modality: the name of the modality shown.
        threshold: the probability threshold of the mask (for the caption).
    """
    affine = np.asarray(image.affine, dtype=float)
    data = _canonical(np.asanyarray(image.dataobj, dtype=np.float32), affine)
    cmask = _canonical(mask.astype(np.uint8), affine) if mask is not None else None
    cprob = _canonical(prob.astype(np.float32), affine) if prob is not None else None
    spacing = voxel_spacing(_canonical_affine(affine, image.shape[:3]))
    centre = key_voxel(cmask, cprob, data.shape)
    nonzero = data[data > 0]
    lo, hi = np.percentile(nonzero[:: max(1, nonzero.size // 200_000)], (1, 99.5)) if nonzero.size else (0, 1)

    fig = Figure(figsize=(8.27, 11.69), dpi=100)
    fig.text(0.05, 0.975, f"Prediction report: {result.case}", fontsize=15, fontweight="bold", va="top")
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    inputs = "; ".join(f"{k}: {Path(v).name}" for k, v in result.inputs.items())
    fig.text(0.05, 0.948, textwrap.shorten(f"{when} | inputs: {inputs}", 140), fontsize=8, va="top", color="0.3")
    fig.text(0.05, 0.933, textwrap.shorten(f"models: {', '.join(models) or '-'}", 140), fontsize=8, va="top",
             color="0.3")

    # probabilities and headline numbers
    ax_p = fig.add_axes((0.14, 0.775, 0.36, 0.13))
    if result.probabilities:
        names = list(result.probabilities)
        values = [result.probabilities[n] for n in names]
        colours = ["#d62728" if n == result.diagnosis else "#7f7f7f" for n in names]
        ax_p.barh(names[::-1], values[::-1], color=colours[::-1])
        for y, v in enumerate(values[::-1]):
            inside = v > 0.85  # near 1 the number goes inside the bar, in white
            ax_p.text(v - 0.02 if inside else v + 0.02, y, f"{v:.2f}", va="center", fontsize=9,
                      ha="right" if inside else "left", color="white" if inside else "black")
        ax_p.set_xlim(0, 1)
        ax_p.set_xlabel("probability (model output, not calibrated to patients)", fontsize=8)
        ax_p.set_title("class probabilities", fontsize=10)
    else:
        ax_p.axis("off")
        ax_p.text(0.0, 0.5, "no classifier given", fontsize=10, color="0.4")
    lines = [f"Predicted diagnosis: {result.diagnosis or '- (no classifier)'}"]
    if result.probabilities and result.diagnosis:
        lines.append(f"  probability {result.probabilities[result.diagnosis]:.2f}")
    if result.lesion_volume_ml is not None:
        lines.append(f"Lesion volume: {result.lesion_volume_ml:.2f} ml")
        lines.append(f"  voxels with lesion probability >= {threshold:g}")
    else:
        lines.append("Lesion volume: - (no segmentation model)")
    lines.append(f"Scan: {'x'.join(str(s) for s in image.shape[:3])} voxels, "
                 f"{'x'.join(f'{s:g}' for s in voxel_spacing(affine))} mm, "
                 f"stored {''.join(nib.aff2axcodes(affine))}")
    fig.text(0.56, 0.905, "\n".join(lines), fontsize=10, va="top", linespacing=1.6)

    # key slices: scan with the mask outlined, then the probability map
    rows = [("mask", 0.47)] + ([("prob", 0.20)] if cprob is not None else [])
    heat = None
    for kind, bottom in rows:
        for col, view in enumerate(VIEWS):
            ax = fig.add_axes((0.04 + col * 0.315, bottom, 0.29, 0.24))
            index = centre[SLICE_AXIS[view]]
            aspect = pixel_aspect(spacing, view)
            ax.imshow(plane(data, view, index), cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                      interpolation="nearest")
            if kind == "mask" and cmask is not None and cmask.any():
                cut = plane(cmask, view, index).astype(float)
                ax.imshow(np.ma.masked_equal(cut, 0), cmap="autumn", alpha=0.35, aspect=aspect,
                          interpolation="nearest")
                ax.contour(cut, levels=[0.5], colors=["#ff2020"], linewidths=0.9)
            if kind == "prob":
                cut = plane(cprob, view, index)
                heat = ax.imshow(np.ma.masked_less(cut, 0.05), cmap="inferno", vmin=0, vmax=1, alpha=0.75,
                                 aspect=aspect, interpolation="nearest")
            draw_edge_letters(ax, view, fontsize=8)
            title = f"{view} {index}" + (f" | {modality}" if modality and col == 0 else "")
            if kind == "mask" and col == 0:
                title += " | lesion mask (red)" if cmask is not None else " | no segmentation"
            if kind == "prob" and col == 0:
                title += " | lesion probability"
            ax.set_title(title, fontsize=8)
    if heat is not None:
        cax = fig.add_axes((0.3, 0.175, 0.4, 0.01))
        fig.colorbar(heat, cax=cax, orientation="horizontal", label="lesion probability")

    steps = "; ".join(result.steps) or "-"
    fig.text(0.05, 0.135, textwrap.fill(f"Preprocessing (from the checkpoint): {steps}", 120), fontsize=7,
             va="top", color="0.25")
    fig.text(0.05, 0.085, "Neurological convention: the patient's right is on the right of each image. "
             "Planes pass through the lesion's centre (or the scan's centre).", fontsize=7, va="top", color="0.25")
    fig.text(0.5, 0.035, DISCLAIMER, fontsize=10, linespacing=1.5, fontweight="bold", color="white", ha="center", va="center",
             bbox={"facecolor": "#b22222", "edgecolor": "none", "boxstyle": "round,pad=0.5"})
    return fig


def _canonical_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    ornt = nib.orientations.io_orientation(affine)
    return np.asarray(affine) @ nib.orientations.inv_ornt_aff(ornt, tuple(shape[:3]))


def write_report(path: str | os.PathLike, result: Any, image: nib.Nifti1Image, mask: np.ndarray | None = None,
                 prob: np.ndarray | None = None, models: Sequence[str] = (), modality: str = "",
                 threshold: float = 0.5, dpi: int = 100) -> Path:
    """Draw :func:`report_figure` and save it as PNG (atomically); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = report_figure(result, image, mask, prob, models, modality, threshold)
    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path
