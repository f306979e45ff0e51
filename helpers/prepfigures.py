"""Figures for preprocessing: the same anatomy before and after each step, with histograms.

Display rules (from :mod:`helpers.orientation`): every volume is shown in the
canonical RAS+ order, with pixels in the voxel-spacing aspect ratio, anatomical
letters on the edges and a colour bar. Panels of one figure show the *same point
in millimetres*, so a step that changes the voxel grid (resampling, cropping)
still shows the same anatomy.

Example:
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    >>> fig = before_after([("before", vol, np.eye(4)), ("after", vol * 2, np.eye(4))])
    >>> len(fig.axes) >= 2
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from helpers import orientation as ori
from helpers.preprocess import reorient, spacing_of

Panel = tuple[str, np.ndarray, np.ndarray]


def _slice_at(data: np.ndarray, affine: np.ndarray, view: str, world: np.ndarray) -> tuple[np.ndarray, float]:
    """The canonical plane through a world point, and its pixel aspect."""
    d, a = reorient(data, affine)
    vox = np.linalg.inv(a) @ np.r_[world, 1.0]
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[view]
    index = int(np.clip(round(vox[axis]), 0, d.shape[axis] - 1))
    return ori.plane(d, view, index), ori.pixel_aspect(spacing_of(a), view)


def _letters(ax, view: str) -> None:
    e = ori.edge_letters(view)
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, e["left"], va="center", ha="left", **style)
    ax.text(0.98, 0.5, e["right"], va="center", ha="right", **style)
    ax.text(0.5, 0.98, e["top"], va="top", ha="center", **style)
    ax.text(0.5, 0.02, e["bottom"], va="bottom", ha="center", **style)


def centre_mm(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The centre of the brightest half of a volume, in mm (a good default slice point)."""
    w = np.asarray(data, dtype=np.float64)
    w = np.clip(w - np.percentile(w, 50), 0, None)
    idx = np.indices(w.shape).reshape(3, -1)
    c = (idx * w.ravel()).sum(axis=1) / max(w.sum(), 1e-12)
    return np.asarray(affine)[:3, :3] @ c + np.asarray(affine)[:3, 3]


def before_after(panels: Sequence[Panel], view: str = "axial", world: Sequence[float] | None = None,
                 overlays: Sequence[np.ndarray | None] | None = None, hist: bool = False,
                 hist_masks: Sequence[np.ndarray | None] | None = None, percentiles: tuple[float, float] = (1, 99),
                 cmap: str = "gray", units: str = "intensity", title: str | None = None,
                 size: float = 3.2, hist_log: bool = True) -> plt.Figure:
    """Show volumes side by side at the same point in mm, optionally with their histograms.

    Args:
        panels: ``(title, volume, affine)`` for each panel.
        view: ``axial``, ``coronal`` or ``sagittal``.
        world: the point (mm) the slices go through (default: centre of the first volume).
        overlays: label maps on each panel's grid, drawn as contours.
        hist: add a row of intensity histograms (log counts).
        hist_masks: voxels to count in each histogram (default: all non-zero voxels).
        hist_log: log-scale counts (shows rare values) or linear (shows peak widths).
        percentiles: display window per panel.
        units: colour-bar label.
    """
    n = len(panels)
    world = np.asarray(world if world is not None else centre_mm(panels[0][1], panels[0][2]))
    rows = 2 if hist else 1
    fig, axes = plt.subplots(rows, n, figsize=(size * n, size * (1.0 + 0.55 * (rows - 1))),
                             squeeze=False, gridspec_kw={"height_ratios": [1, 0.55][:rows]})
    for k, (name, data, affine) in enumerate(panels):
        cut, aspect = _slice_at(np.asarray(data, dtype=np.float32), affine, view, world)
        lo, hi = np.percentile(data, percentiles)
        ax = axes[0, k]
        im = ax.imshow(cut, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                       interpolation="nearest")
        if overlays is not None and overlays[k] is not None:
            ocut, _ = _slice_at(np.asarray(overlays[k], dtype=np.float32), affine, view, world)
            if ocut.max() > 0:
                ax.contour(ocut > 0, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        _letters(ax, view)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label(units, fontsize=8)
        if hist:
            hax = axes[1, k]
            m = hist_masks[k] if hist_masks is not None and hist_masks[k] is not None else np.asarray(data) != 0
            hax.hist(np.asarray(data)[m].ravel(), bins=100, color="steelblue")
            if hist_log:
                hax.set_yscale("log")
            hax.set_xlabel(units, fontsize=8)
            hax.set_ylabel("voxels", fontsize=8)
            hax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def montage(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None,
            titles: Sequence[str] | None = None, ncols: int = 4, aspect: float = 1.0,
            view: str = "axial", cmap: str = "gray", vrange: tuple[float, float] | None = None,
            size: float = 2.4, colorbar_label: str = "intensity") -> plt.Figure:
    """A grid of 2D canonical slices (already cut with :func:`helpers.orientation.plane`), one colour scale."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.8, size * nrows), squeeze=False)
    lo, hi = vrange if vrange is not None else np.percentile(np.concatenate([np.ravel(i) for i in images]), (1, 99))
    im = None
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        im = ax.imshow(images[k], cmap=cmap, vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if masks is not None and masks[k] is not None and np.any(masks[k]):
            ax.contour(np.asarray(masks[k]) > 0, levels=[0.5], colors="red", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
        _letters(ax, view)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02).set_label(colorbar_label, fontsize=8)
    return fig


def site_histograms(values: dict[str, Sequence[np.ndarray]], ax: Any = None, bins: int = 120,
                    xlabel: str = "intensity", title: str = "") -> Any:
    """One density curve per scan, coloured by site: shows how sites differ in intensity."""
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.2))[1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    allv = np.concatenate([np.ravel(v) for vs in values.values() for v in vs])
    lo, hi = np.percentile(allv, (0.5, 99.5))
    edges = np.linspace(lo, hi, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for c, (site, scans) in enumerate(sorted(values.items())):
        for j, v in enumerate(scans):
            dens, _ = np.histogram(v, bins=edges, density=True)
            ax.plot(centres, dens, color=colours[c % len(colours)], alpha=0.6, lw=1,
                    label=f"site {site}" if j == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax
