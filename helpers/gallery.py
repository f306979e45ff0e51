"""Static figures of scans for the notebooks: one plane, reoriented, lettered, with overlays.

The display rules come from ``helpers.orientation`` (the same ones the slice
browser ``helpers.viewer`` uses): reorient to canonical RAS+ first, keep the voxel
spacing's aspect ratio, put anatomical letters on the edges, window intensities by
percentiles. This module only draws one plane into a matplotlib axis, so notebooks
can build galleries (diagnosis x modality) and side-by-side comparisons.

Example:
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt, numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 5)).astype(np.float32),
    ...                       np.diag([2.0, 2.0, 4.0, 1.0]))
    >>> fig, ax = plt.subplots()
    >>> shown = draw_plane(ax, img, view="axial", colorbar=True)
    >>> shown.get_array().shape
    (9, 8)
"""

from __future__ import annotations

from collections.abc import Mapping

import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from helpers.orientation import (
    SLICE_AXIS,
    canonical,
    edge_letters,
    pixel_aspect,
    plane,
    voxel_spacing,
)

LABEL_COLOURS: dict[int, str] = {1: "#d62728", 2: "#2ca02c", 3: "#ffdd00", 4: "#1f77b4",
                                 5: "#ff7f0e", 6: "#9467bd", 7: "#17becf", 8: "#e377c2"}
"""Overlay colour of each label value (lesion labels 1-5 of the simulated cohort and more)."""


def busiest_slice(labels: np.ndarray, view: str) -> int | None:
    """Index of the slice (in a canonical volume) holding the most labelled voxels; None if empty."""
    axis = SLICE_AXIS[view]
    counts = np.count_nonzero(labels, axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.any() else None


def draw_plane(ax, img: nib.spatialimages.SpatialImage, view: str = "axial", index: int | None = None,
               labels: nib.spatialimages.SpatialImage | None = None, opacity: float = 0.45,
               percentiles: tuple[float, float] = (1.0, 99.5), radiological: bool = False,
               title: str | None = None, colorbar: bool = False, cmap: str = "gray"):
    """Draw one plane of a scan (and its label map) the way a reader expects to see it.

    Args:
        ax: a matplotlib axis.
        img: the scan (any stored orientation; it is reoriented to RAS+ first).
        view: ``axial``, ``coronal`` or ``sagittal``.
        index: slice index in the canonical volume (default: the busiest label
            slice if labels are given, else the middle).
        labels: a label map on the same voxel grid, drawn as coloured overlay.
        opacity: overlay opacity.
        percentiles: intensities mapped to black and white (of non-zero voxels).
        radiological: put the patient's right on the screen's left.
        title: axis title.
        colorbar: add a colour bar in the image's units.
        cmap: colour map of the scan.

    Returns:
        the ``AxesImage`` of the scan.
    """
    can = canonical(img)
    data = np.asanyarray(can.dataobj, dtype=np.float32)
    lab = np.asanyarray(canonical(labels).dataobj) if labels is not None else None
    if index is None:
        found = busiest_slice(lab, view) if lab is not None else None
        index = found if found is not None else data.shape[SLICE_AXIS[view]] // 2
    cut = plane(data, view, index, radiological)
    nonzero = data[data > 0]
    lo, hi = np.percentile(nonzero, percentiles) if nonzero.size else (0.0, 1.0)
    aspect = pixel_aspect(voxel_spacing(can.affine), view)
    shown = ax.imshow(cut, cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    if lab is not None:
        over = plane(lab, view, index, radiological).astype(int)
        colours = ListedColormap(["none", *[LABEL_COLOURS.get(v, "#ffffff") for v in range(1, 9)]])
        ax.imshow(np.ma.masked_equal(over, 0), cmap=colours, vmin=-0.5, vmax=8.5, alpha=opacity,
                  aspect=aspect, interpolation="nearest")
    draw_edge_letters(ax, view, radiological)
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="intensity (scaled units)")
    return shown


def draw_edge_letters(ax, view: str, radiological: bool = False, fontsize: int = 9) -> None:
    """Write the anatomical letters (L/R, A/P, S/I) on the edges of a plane and hide the ticks."""
    letters = edge_letters(view, radiological)
    style = {"color": "yellow", "fontsize": fontsize, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, letters["left"], ha="left", va="center", **style)
    ax.text(0.98, 0.5, letters["right"], ha="right", va="center", **style)
    ax.text(0.5, 0.98, letters["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.02, letters["bottom"], ha="center", va="bottom", **style)
    ax.set_xticks([])
    ax.set_yticks([])


def label_legend(ax_or_fig, names: Mapping[int, str], **kwargs):
    """A legend with one coloured patch per label name (``{value: name}``)."""
    handles = [Patch(color=LABEL_COLOURS.get(k, "#ffffff"), label=f"{k}: {v}") for k, v in names.items()]
    options = {"loc": "lower center", "ncol": min(len(handles), 5), "fontsize": 8, "frameon": False}
    options.update(kwargs)
    return ax_or_fig.legend(handles=handles, **options)
