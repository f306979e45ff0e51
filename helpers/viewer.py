"""The slice browser: look at a brain volume, its modalities and overlays, slice by slice.

``show(image, labels=..., heatmap=...)`` displays a small interactive viewer in a
notebook: a slice slider, the view (axial, coronal, sagittal or all three), the
overlay opacity, the intensity window (level/width or percentile presets), the
modality, and the left-right convention. Under the picture a readout gives the
slice, the voxel under the crosshair, its world coordinate in millimetres and the
intensity there.

Display rules (kept in ``helpers.orientation``): every volume is reoriented to the
canonical RAS+ order first, labels and heat maps identically, and they must share
the image's voxel grid; pixels keep the voxel spacing's aspect ratio; the edges
carry orientation letters.

How it is drawn: one matplotlib figure per viewer, made once and updated in place
(no figure per slider step), rendered to PNG into an ``ipywidgets.Image``. Where no
widget front end exists (papermill, nbconvert HTML, GitHub) the same output also
carries a static three-plane PNG of the scan with its overlays, so executed
notebooks and their HTML copies still show it.

Example:
    >>> import numpy as np, nibabel as nib
    >>> data = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    >>> v = SliceViewer(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])))
    >>> v.set_slice(3)
    >>> v.readout()["voxel"]
    (10, 12, 3)
    >>> v.close()

Command line (writes the static three-plane figure)::

    python -m helpers.viewer scan.nii.gz --labels mask.nii.gz --out scan.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io as _io
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import matplotlib
import nibabel as nib
import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from helpers.io import DataError, load_volume
from helpers.orientation import (
    SLICE_AXIS,
    VIEWS,
    canonical,
    describe_grid,
    edge_letters,
    orientation_code,
    pixel_aspect,
    pixel_of_voxel,
    plane,
    same_grid,
    voxel_spacing,
    world_coordinate,
)

ImageLike = str | os.PathLike | nib.spatialimages.SpatialImage | tuple
"""A path to a NIfTI file, a nibabel image, or an ``(array, affine)`` tuple."""

ALL_VIEWS = (*VIEWS, "three")
VIEW_LABELS = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal", "three": "three-plane"}
PRESETS = {"1-99 %": (1, 99), "0.5-99.5 %": (0.5, 99.5), "2-98 %": (2, 98), "5-95 %": (5, 95),
           "min-max": (0, 100)}
"""Intensity-window presets: percentiles of the non-zero voxels mapped to black and white."""
DPI = 100
MAX_LEGEND = 18
"""Legend entries shown at most (an atlas with hundreds of labels would fill the figure)."""
LIVE_PNG_LEVEL = 1
"""zlib level for live frames: fast to encode; the static figure uses a smaller file."""
CSS_READOUT = "bmv-readout"
CSS_DRAWN = "bmv-drawn"
CSS_IMAGE = "bmv-image"


# --------------------------------------------------------------------------- inputs


def as_volume(obj: ImageLike, what: str = "image", dtype=np.float32) -> nib.Nifti1Image:
    """Turn a path, a nibabel image or an ``(array, affine)`` tuple into a canonical 3D image.

    Args:
        obj: the volume.
        what: how error messages name it (``"labels"``, ``"modality 'T1'"``...).
        dtype: the voxel type to hold in memory.

    Raises:
        DataError: not 3D, unreadable, or a malformed affine; the message names it.
    """
    if isinstance(obj, (str, os.PathLike)):
        img = load_volume(obj, ndim=None, dtype=dtype, allow_all_zero=True,
                          allow_nonfinite=(what == "heatmap"))
        source: str | os.PathLike = obj
        data, affine = np.asanyarray(img.dataobj), img.affine
    elif isinstance(obj, nib.spatialimages.SpatialImage):
        source = obj.get_filename() or f"{what} (in-memory {type(obj).__name__})"
        data, affine = np.asanyarray(obj.dataobj, dtype=dtype), obj.affine
    elif isinstance(obj, tuple) and len(obj) == 2:
        source = f"{what} (array, affine)"
        data, affine = np.asarray(obj[0], dtype=dtype), np.asarray(obj[1], float)
        if affine.shape != (4, 4):
            raise DataError(source, f"the affine must be a 4x4 matrix, got shape {affine.shape}")
    else:
        raise TypeError(f"{what}: expected a path, a nibabel image or an (array, affine) tuple, "
                        f"got {type(obj).__name__}")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(source, f"{what} has shape {tuple(data.shape)}; the viewer shows 3D volumes "
                                "(pick one volume of a 4D series first, e.g. data[..., 0])")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(source, f"{what} has a degenerate affine:\n{affine}")
    return canonical(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine))


def _modalities(image: ImageLike | Mapping[str, ImageLike]) -> dict[str, nib.Nifti1Image]:
    if isinstance(image, Mapping):
        if not image:
            raise ValueError("image: an empty dict; give at least one modality")
        items = [(str(name), obj) for name, obj in image.items()]
    else:
        name = Path(image).name.split(".")[0] if isinstance(image, (str, os.PathLike)) else "image"
        items = [(name, image)]
    vols = {name: as_volume(obj, f"modality {name!r}") for name, obj in items}
    first_name, first = next(iter(vols.items()))
    for name, vol in vols.items():
        _check_grid(vol, first, f"modality {name!r}", f"modality {first_name!r}")
    return vols


def _check_grid(vol: nib.Nifti1Image, ref: nib.Nifti1Image, what: str, ref_name: str) -> None:
    if not same_grid(vol.shape, vol.affine, ref.shape, ref.affine):
        raise DataError(
            what,
            f"its voxel grid ({describe_grid(vol.shape, vol.affine)}) does not match the grid of "
            f"{ref_name} ({describe_grid(ref.shape, ref.affine)}) after both were reoriented to RAS; "
            "resample it onto the image first, e.g. nilearn.image.resample_to_img(x, image, "
            "interpolation='nearest') for labels",
        )


def window_for(data: np.ndarray, preset: str) -> tuple[float, float]:
    """``(level, width)`` of an intensity-window preset, from the non-zero voxels' percentiles."""
    if preset not in PRESETS:
        raise ValueError(f"unknown window preset {preset!r}; choose one of {', '.join(PRESETS)}")
    flat = data.ravel()
    sample = flat[:: max(1, flat.size // 400_000)]
    sample = sample[np.isfinite(sample)]
    nonzero = sample[sample != 0]
    if nonzero.size > 0.01 * max(sample.size, 1):
        sample = nonzero
    if sample.size == 0:
        return 0.5, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, PRESETS[preset]))
    if hi <= lo:
        hi = lo + 1.0
    return (lo + hi) / 2, hi - lo


# --------------------------------------------------------------------------- drawing


class _Panel:
    """One axes showing one plane: base image, overlays, crosshair, letters."""

    def __init__(self, fig: Figure, label_cmap, heat_cmap, heat_norm, base_cmap: str):
        self.ax = fig.add_axes((0, 0, 1, 1))
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self.ax.set_facecolor("black")
        dummy = np.zeros((2, 2), np.float32)
        kw = {"interpolation": "nearest", "origin": "upper"}
        self.base = self.ax.imshow(dummy, cmap=base_cmap, **kw)
        self.labels = self.ax.imshow(np.ma.masked_all((2, 2)), cmap=label_cmap, norm=Normalize(
            0.5, label_cmap.N + 0.5), **kw) if label_cmap is not None else None
        self.heat = self.ax.imshow(np.ma.masked_all((2, 2)), cmap=heat_cmap, norm=heat_norm,
                                   **kw) if heat_cmap is not None else None
        line = {"color": "#39ff14", "lw": 0.6, "alpha": 0.55}
        self.vline = self.ax.axvline(0, **line)
        self.hline = self.ax.axhline(0, **line)
        style = {"color": "white", "fontsize": 11, "fontweight": "bold", "transform": self.ax.transAxes,
                 "path_effects": [patheffects.withStroke(linewidth=2.5, foreground="black")]}
        self.letters = {
            "left": self.ax.text(0.015, 0.5, "", ha="left", va="center", **style),
            "right": self.ax.text(0.985, 0.5, "", ha="right", va="center", **style),
            "top": self.ax.text(0.5, 0.985, "", ha="center", va="top", **style),
            "bottom": self.ax.text(0.5, 0.015, "", ha="center", va="bottom", **style),
        }
        self.caption = self.ax.text(0.5, 1.01, "", ha="center", va="bottom", fontsize=9,
                                    transform=self.ax.transAxes)
        # what changes from frame to frame: drawn over a saved background ("blitting")
        self.dynamic = [a for a in (self.base, self.labels, self.heat, self.vline, self.hline,
                                    *self.letters.values(), self.caption) if a is not None]
        for artist in self.dynamic:
            artist.set_animated(True)
        self.shape: tuple[int, ...] = ()

    def set_visible(self, on: bool) -> None:
        self.ax.set_visible(on)


class _Renderer:
    """The viewer's single matplotlib figure (not registered with pyplot, so never leaked)."""

    figures_created = 0
    """How many figures renderers have made in this process (tests check it stays put)."""

    def __init__(self, label_colors: Sequence | None, label_entries: Sequence[tuple[str, Any]],
                 heat_cmap: str | None, heat_range: tuple[float, float], base_cmap: str,
                 title: str | None):
        self.fig = Figure(dpi=DPI, facecolor="white")
        FigureCanvasAgg(self.fig)
        _Renderer.figures_created += 1
        label_cmap = ListedColormap(list(label_colors)) if label_colors else None
        hcmap = matplotlib.colormaps[heat_cmap].copy() if heat_cmap else None
        heat_norm = Normalize(*heat_range)
        self._legend_handles: list[Patch] = []
        self.single = _Panel(self.fig, label_cmap, hcmap, heat_norm, base_cmap)
        self.planes = {v: _Panel(self.fig, label_cmap, hcmap, heat_norm, base_cmap) for v in VIEWS}
        self.cax_base = self.fig.add_axes((0, 0, 1, 1))
        self.fig.colorbar(self.single.base, cax=self.cax_base)
        self.cax_base.set_title("intensity", fontsize=8)
        self.cax_heat = None
        if hcmap is not None:
            self.cax_heat = self.fig.add_axes((0, 0, 1, 1))
            self.fig.colorbar(self.single.heat, cax=self.cax_heat)
            self.cax_heat.set_title("heat map", fontsize=8)
        if label_entries:
            shown = list(label_entries[:MAX_LEGEND])
            if len(label_entries) > MAX_LEGEND:
                shown.append((f"... {len(label_entries) - MAX_LEGEND} more labels", "white"))
            self._legend_handles = [Patch(facecolor=c, edgecolor="none", label=n) for n, c in shown]
        self._legend = None
        self.title = self.fig.text(0.01, 0.985, title or "", ha="left", va="top", fontsize=11)
        self.info = self.fig.text(0.99, 0.985, "", ha="right", va="top", fontsize=8, color="0.3")
        self.layout = ""
        self._background = None
        self._background_key: tuple = ()

    def set_layout(self, view: str) -> None:
        if view == self.layout:
            return
        three = view == "three"
        self.fig.set_size_inches((12.0, 4.7) if three else (7.4, 6.2))
        self.single.set_visible(not three)
        for k, panel in enumerate(self.planes.values()):
            panel.set_visible(three)
            panel.ax.set_position((0.005 + k * 0.257, 0.13, 0.25, 0.78))
        self.single.ax.set_position((0.01, 0.1, 0.74, 0.82))
        x0, w, y0, h = (0.81, 0.012, 0.2, 0.6) if three else (0.78, 0.025, 0.15, 0.7)
        self.cax_base.set_position((x0, y0, w, h))
        if self.cax_heat is not None:
            self.cax_heat.set_position((x0 + (0.08 if three else 0.11), y0, w, h))
        if self._legend_handles:  # as many columns as fit the figure's width
            if self._legend is not None:
                self._legend.remove()
            longest = max(len(h.get_label()) for h in self._legend_handles)
            fit = int(self.fig.get_figwidth() * DPI / (5.5 * longest + 45))
            self._legend = self.fig.legend(
                handles=self._legend_handles, loc="lower left", bbox_to_anchor=(0.01, 0.0),
                ncol=max(1, min(len(self._legend_handles), fit)), fontsize=8, frameon=False)
        self.layout = view

    def draw_panel(self, panel: _Panel, view: str, st: _DrawState) -> None:
        idx = st.cursor[SLICE_AXIS[view]]
        base = plane(st.data, view, idx, st.radiological)
        panel.base.set_data(base)
        panel.base.set_clim(st.vmin, st.vmax)
        if panel.labels is not None and st.labels is not None:
            lab = plane(st.labels, view, idx, st.radiological)
            panel.labels.set_data(np.ma.masked_equal(lab, 0))
            panel.labels.set_alpha(st.opacity)
        if panel.heat is not None and st.heat is not None:
            h = plane(st.heat, view, idx, st.radiological)
            panel.heat.set_data(np.ma.masked_where(~(h > st.heat_threshold), h))
            panel.heat.set_alpha(st.opacity)
        if panel.shape != base.shape or panel.ax.get_aspect() != st.aspect[view]:
            rows, cols = base.shape
            ext = (-0.5, cols - 0.5, rows - 0.5, -0.5)
            for im in (panel.base, panel.labels, panel.heat):
                if im is not None:
                    im.set_extent(ext)
            panel.ax.set_xlim(ext[0], ext[1])
            panel.ax.set_ylim(ext[2], ext[3])
            panel.ax.set_aspect(st.aspect[view])
            panel.shape = base.shape
        row, col = pixel_of_voxel(st.data.shape, view, st.cursor, st.radiological)
        panel.vline.set_xdata([col, col])
        panel.hline.set_ydata([row, row])
        for line in (panel.vline, panel.hline):
            line.set_visible(st.crosshair)
        for edge, letter in edge_letters(view, st.radiological).items():
            panel.letters[edge].set_text(letter)
        panel.caption.set_text(f"{VIEW_LABELS[view]} slice {idx}")

    def draw(self, st: _DrawState) -> np.ndarray:
        """Draw the state; return the RGBA pixels (a view valid until the next draw)."""
        self.set_layout(st.view)
        if st.view == "three":
            for view, panel in self.planes.items():
                self.draw_panel(panel, view, st)
        else:
            self.draw_panel(self.single, st.view, st)
        canvas = self.fig.canvas
        key = (st.view, st.vmin, st.vmax, st.title, st.info, tuple(p.ax.get_position().bounds
                                                                   for p in self._visible()))
        if key != self._background_key or self._background is None:
            # the parts that rarely change (frames, colour bars, legend, captions): drawn
            # in full only when they change, then kept as a background image
            self.single.base.set_clim(st.vmin, st.vmax)  # the colour bar follows the window
            self.title.set_text(st.title)
            self.info.set_text(st.info)
            canvas.draw()
            self._background = canvas.copy_from_bbox(self.fig.bbox)
            self._background_key = key
        canvas.restore_region(self._background)
        for panel in self._visible():
            for artist in panel.dynamic:
                if artist.get_visible():
                    panel.ax.draw_artist(artist)
        return np.asarray(canvas.buffer_rgba())

    def _visible(self) -> list[_Panel]:
        return list(self.planes.values()) if self.layout == "three" else [self.single]

    def png(self, st: _DrawState, level: int = LIVE_PNG_LEVEL) -> bytes:
        from PIL import Image

        rgba = self.draw(st)
        buf = _io.BytesIO()
        Image.fromarray(rgba[..., :3]).save(buf, format="png", compress_level=level)
        return buf.getvalue()

    def close(self) -> None:
        self.fig = None  # not registered with pyplot: dropping the reference frees it


class _DrawState:
    """Everything one frame depends on (a plain record)."""

    __slots__ = ("data", "labels", "heat", "heat_threshold", "view", "cursor", "radiological",
                 "vmin", "vmax", "opacity", "aspect", "crosshair", "title", "info")

    def __init__(self, **kw: Any):
        for key, value in kw.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------- the widget


class SliceViewer(widgets.VBox):
    """An interactive slice browser for one subject: modalities, labels, heat map.

    Args:
        image: a path, a nibabel image, an ``(array, affine)`` tuple, or a dict
            ``{modality name: any of those}`` (all on one voxel grid).
        labels: a discrete label map on the same grid (0 = background), drawn in
            distinct colours with a legend.
        heatmap: a continuous map on the same grid (saliency, probability...),
            drawn with a colour bar; values at or below ``heatmap_threshold`` are
            transparent.
        label_names: ``{label value: name}`` for the legend.
        label_colors: ``{label value: matplotlib colour}``; the others get distinct
            colours from a qualitative palette, chosen by label value (so a value
            keeps its colour from one viewer to the next).
        title: a line above the picture.
        view: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"three"``.
        radiological: patient's right on the screen's left (default: neurological).
        opacity: of the overlays, 0 to 1.
        window: an intensity-window preset (see ``PRESETS``) or ``(level, width)``.
        cursor: the crosshair voxel ``(i, j, k)`` in the *canonical* (RAS) grid;
            default the centre. See also :meth:`set_cursor_mm`.
        heatmap_threshold: heat values at or below it are not drawn (default: the
            map's minimum).
        heatmap_range: ``(vmin, vmax)`` of the heat colour bar (default: the map's range).
        cmap, heatmap_cmap: matplotlib colour maps.
        crosshair: draw the crosshair lines.

    Raises:
        DataError: a volume is not 3D, cannot be read, or is on another grid.
    """

    def __init__(self, image: ImageLike | Mapping[str, ImageLike], *, labels: ImageLike | None = None,
                 heatmap: ImageLike | None = None, label_names: Mapping[int, str] | None = None,
                 label_colors: Mapping[int, Any] | None = None,
                 title: str | None = None, view: str = "axial", radiological: bool = False,
                 opacity: float = 0.5, window: str | tuple[float, float] = "1-99 %",
                 cursor: Sequence[int] | None = None, heatmap_threshold: float | None = None,
                 heatmap_range: tuple[float, float] | None = None, cmap: str = "gray",
                 heatmap_cmap: str = "inferno", crosshair: bool = True):
        if view not in ALL_VIEWS:
            raise ValueError(f"unknown view {view!r}; choose one of {', '.join(ALL_VIEWS)}")
        self.volumes = _modalities(image)
        self._data = {name: np.asarray(vol.dataobj, np.float32) for name, vol in self.volumes.items()}
        ref_name, ref = next(iter(self.volumes.items()))
        self.affine = ref.affine
        self.shape = tuple(int(s) for s in ref.shape[:3])
        self.spacing = voxel_spacing(self.affine)
        self.stored_orientation = _stored_orientation(image)
        self._aspect = {v: pixel_aspect(self.spacing, v) for v in VIEWS}
        self._crosshair = crosshair
        self._title = title

        self._labels, self._label_values, label_entries, colors = None, [], [], None
        if labels is not None:
            lab_img = as_volume(labels, "labels", dtype=np.float32)
            _check_grid(lab_img, ref, "labels", f"the image (modality {ref_name!r})")
            lab = np.rint(np.asarray(lab_img.dataobj)).astype(np.int32)
            self._label_values = [int(v) for v in np.unique(lab) if v != 0]
            # label value -> colour index 1..n (0 stays background)
            index = np.searchsorted(np.array([0, *self._label_values]), np.where(lab == 0, 0, lab))
            index = np.where(lab == 0, 0, index).astype(np.float32)
            self._labels, self._label_raw = index, lab
            palette = matplotlib.colormaps["tab10" if max(self._label_values, default=0) <= 10
                                           else "tab20"]
            chosen = dict(label_colors or {})
            colors = [chosen.get(v, palette((v - 1) % palette.N)) for v in self._label_values]
            colors = colors or [palette(0)]
            names = dict(label_names or {})
            label_entries = [(names.get(v, f"label {v}"), colors[n])
                             for n, v in enumerate(self._label_values)]
        self._heat, heat_range = None, (0.0, 1.0)
        if heatmap is not None:
            heat_img = as_volume(heatmap, "heatmap")
            _check_grid(heat_img, ref, "heatmap", f"the image (modality {ref_name!r})")
            self._heat = np.asarray(heat_img.dataobj, np.float32)
            finite = self._heat[np.isfinite(self._heat)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            heat_range = heatmap_range or (lo, hi if hi > lo else lo + 1.0)
            self._heat_threshold = lo if heatmap_threshold is None else float(heatmap_threshold)
        else:
            self._heat_threshold = 0.0

        self._renderer = _Renderer(colors, label_entries, heatmap_cmap if heatmap is not None else None,
                                   heat_range, cmap, title)
        self.cursor = list(cursor) if cursor is not None else [s // 2 for s in self.shape]
        self._check_cursor(self.cursor)
        self._modality = ref_name
        self._radiological = bool(radiological)
        self._opacity = float(opacity)
        self._view = view
        self._preset = window if isinstance(window, str) else "custom"
        self._level, self._width = (window_for(self._data[ref_name], window)
                                    if isinstance(window, str) else (float(window[0]), float(window[1])))
        self._busy = False
        self._windows: dict[tuple[str, str], tuple[float, float]] = {}
        self.frames_drawn = 0
        self._shown_at: int | None = None
        self._build_controls()
        super().__init__(children=self._layout_children())
        self.add_class("bmv-viewer")
        self._redraw()

    # ----------------------------------------------------------------- controls

    def _build_controls(self) -> None:
        names = list(self.volumes)
        has_overlay = self._labels is not None or self._heat is not None
        self.view_select = widgets.Dropdown(
            options=[(VIEW_LABELS[v], v) for v in ALL_VIEWS], value=self._view, description="View",
            layout=widgets.Layout(width="200px"))
        self.modality_select = widgets.Dropdown(
            options=names, value=self._modality, description="Modality", disabled=len(names) < 2,
            layout=widgets.Layout(width="220px"))
        self.convention_select = widgets.ToggleButtons(
            options=["neurological", "radiological"],
            value="radiological" if self._radiological else "neurological",
            tooltips=["patient's right on screen right", "patient's right on screen left"],
            style={"button_width": "100px"})
        axis = self._slider_axis()
        self.slice_slider = widgets.IntSlider(
            value=self.cursor[axis], min=0, max=self.shape[axis] - 1,
            description=f"{('sagittal', 'coronal', 'axial')[axis]} slice", continuous_update=True, layout=widgets.Layout(width="420px"))
        self.opacity_slider = widgets.FloatSlider(
            value=self._opacity, min=0.0, max=1.0, step=0.05, description="Opacity",
            disabled=not has_overlay, continuous_update=True, layout=widgets.Layout(width="300px"))
        self.preset_select = widgets.Dropdown(
            options=[*PRESETS, "custom"], value=self._preset, description="Window",
            layout=widgets.Layout(width="200px"))
        self.level_slider = widgets.FloatSlider(description="Level", readout_format=".4g",
                                                layout=widgets.Layout(width="300px"))
        self.width_slider = widgets.FloatSlider(description="Width", readout_format=".4g",
                                                layout=widgets.Layout(width="300px"))
        self._set_window_ranges()
        self.image_widget = widgets.Image(format="png")
        self.image_widget.add_class(CSS_IMAGE)
        self.readout_html = widgets.HTML()
        self.readout_html.add_class(CSS_READOUT)
        self.drawn_html = widgets.HTML()
        self.drawn_html.add_class(CSS_DRAWN)
        for css, control in (("view", self.view_select), ("modality", self.modality_select),
                             ("convention", self.convention_select), ("slice", self.slice_slider),
                             ("opacity", self.opacity_slider), ("preset", self.preset_select),
                             ("level", self.level_slider), ("width", self.width_slider)):
            control.add_class(f"bmv-{css}")  # stable hooks for browser tests and styling
            control.observe(self._on_control, names="value")

    def _layout_children(self) -> list:
        return [
            widgets.HBox([self.view_select, self.modality_select, self.convention_select]),
            widgets.HBox([self.slice_slider, self.opacity_slider]),
            widgets.HBox([self.preset_select, self.level_slider, self.width_slider]),
            self.image_widget, self.readout_html, self.drawn_html,
        ]

    def _set_window_ranges(self) -> None:
        """Fix the level/width slider ranges once, wide enough for every modality.

        The ranges never change afterwards: a front end that receives a new range
        clamps the old value and sends it back, which would read as a user's change.
        """
        lows = [float(np.nanmin(d)) for d in self._data.values()]
        highs = [float(np.nanmax(d)) for d in self._data.values()]
        lo, hi = min(lows), max(highs)
        span = max(hi - lo, 1e-6)
        finest = max(min(h - low for low, h in zip(lows, highs, strict=True)), 1e-6)
        with self._quiet():
            self.level_slider.min, self.level_slider.max = lo - span, hi + span
            self.width_slider.min, self.width_slider.max = finest / 1000, 2 * span
            self.level_slider.step = self.width_slider.step = finest / 500
            self._show_window()

    def _show_window(self) -> None:
        with self._quiet():
            self.level_slider.value = float(np.clip(self._level, self.level_slider.min,
                                                    self.level_slider.max))
            self.width_slider.value = float(np.clip(self._width, self.width_slider.min,
                                                    self.width_slider.max))

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Change controls from code without a redraw per change."""
        busy, self._busy = self._busy, True
        try:
            yield
        finally:
            self._busy = busy

    def _on_control(self, change: dict) -> None:
        if self._busy:
            return
        owner, new = change["owner"], change["new"]
        with self._quiet():
            if owner is self.view_select:
                self._view = new
                self._sync_slice_slider()
            elif owner is self.slice_slider:
                self.cursor[self._slider_axis()] = int(new)
            elif owner is self.opacity_slider:
                self._opacity = float(new)
            elif owner is self.modality_select:
                self._modality = new
                if self._preset == "custom":
                    self._preset = "1-99 %"
                    self.preset_select.value = self._preset
                self._level, self._width = self._preset_window(new, self._preset)
                self._show_window()
            elif owner is self.convention_select:
                self._radiological = new == "radiological"
            elif owner is self.preset_select:
                self._preset = new
                if new != "custom":
                    self._level, self._width = self._preset_window(self._modality, new)
                    self._show_window()
            elif owner in (self.level_slider, self.width_slider):
                level, width = float(self.level_slider.value), float(self.width_slider.value)
                tol = 0.51 * float(self.level_slider.step or 0)
                if abs(level - self._level) <= tol and abs(width - self._width) <= tol:
                    return  # the front end rounding our own value to its step: not a user change
                self._level, self._width = level, width
                self._preset = "custom"
                self.preset_select.value = "custom"
        self._redraw()

    def _preset_window(self, modality: str, preset: str) -> tuple[float, float]:
        """``window_for`` once per modality and preset (percentiles of a big volume take a while)."""
        key = (modality, preset)
        if key not in self._windows:
            self._windows[key] = window_for(self._data[modality], preset)
        return self._windows[key]

    def _slider_axis(self) -> int:
        return SLICE_AXIS["axial" if self._view == "three" else self._view]

    def _sync_slice_slider(self) -> None:
        axis = self._slider_axis()
        with self._quiet():
            self.slice_slider.max = max(self.shape[axis] - 1, self.slice_slider.min)
            self.slice_slider.value = self.cursor[axis]
            self.slice_slider.description = f"{('sagittal', 'coronal', 'axial')[axis]} slice"

    def _check_cursor(self, voxel: Sequence[int]) -> None:
        if len(voxel) != 3 or any(not 0 <= int(v) < s for v, s in zip(voxel, self.shape, strict=True)):
            raise ValueError(f"cursor {tuple(voxel)} lies outside the volume of shape {self.shape}")

    # ----------------------------------------------------------------- public control from code

    def set_view(self, view: str) -> None:
        """``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"three"`` (three-plane)."""
        if view not in ALL_VIEWS:
            raise ValueError(f"unknown view {view!r}; choose one of {', '.join(ALL_VIEWS)}")
        self.view_select.value = view

    def set_slice(self, index: int) -> None:
        """Move the current view's slice (in three-plane view: the axial slice)."""
        axis = self._slider_axis()
        if not 0 <= int(index) < self.shape[axis]:
            raise ValueError(f"slice {index} is outside 0..{self.shape[axis] - 1}")
        self.slice_slider.value = int(index)

    def set_opacity(self, opacity: float) -> None:
        """Overlay opacity, 0 (invisible) to 1 (opaque)."""
        self.opacity_slider.value = float(np.clip(opacity, 0.0, 1.0))

    def set_modality(self, name: str) -> None:
        """Show another modality of the subject."""
        if name not in self.volumes:
            raise ValueError(f"no modality {name!r}; this viewer has {', '.join(self.volumes)}")
        self.modality_select.value = name

    def set_window(self, preset: str | None = None, level: float | None = None,
                   width: float | None = None) -> None:
        """Choose a window preset, or set the level (centre) and width by hand."""
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown window preset {preset!r}; choose one of {', '.join(PRESETS)}")
            self.preset_select.value = preset
            return
        with self._quiet():
            if level is not None:
                self.level_slider.value = float(level)
            if width is not None:
                self.width_slider.value = float(width)
        self._on_control({"owner": self.level_slider, "new": self.level_slider.value})

    def set_convention(self, radiological: bool) -> None:
        """Radiological (patient's right on screen left) or neurological display."""
        self.convention_select.value = "radiological" if radiological else "neurological"

    def set_cursor(self, voxel: Sequence[int]) -> None:
        """Put the crosshair on a voxel ``(i, j, k)`` of the canonical (RAS) grid."""
        voxel = [int(v) for v in voxel]
        self._check_cursor(voxel)
        self.cursor = voxel
        self._sync_slice_slider()
        self._redraw()

    def set_cursor_mm(self, world: Sequence[float]) -> None:
        """Put the crosshair on the voxel nearest to a world coordinate in millimetres."""
        from helpers.orientation import voxel_index

        self.set_cursor(voxel_index(self.affine, world, self.shape))

    # ----------------------------------------------------------------- readout and pictures

    @property
    def view(self) -> str:
        return self._view

    @property
    def modality(self) -> str:
        return self._modality

    @property
    def window(self) -> tuple[float, float]:
        """``(level, width)`` of the current intensity window."""
        return self._level, self._width

    def readout(self) -> dict[str, Any]:
        """What the readout line shows, as values: view, slice, voxel, mm, intensity..."""
        i, j, k = self.cursor
        out: dict[str, Any] = {
            "view": self._view, "slice": self.cursor[self._slider_axis()],
            "voxel": (i, j, k), "world_mm": tuple(float(round(v, 2)) for v in
                                                  world_coordinate(self.affine, self.cursor)),
            "modality": self._modality, "intensity": float(self._data[self._modality][i, j, k]),
        }
        if self._labels is not None:
            out["label"] = int(self._label_raw[i, j, k])
        if self._heat is not None:
            out["heat"] = float(self._heat[i, j, k])
        return out

    def readout_text(self) -> str:
        """The readout as one line of text."""
        r = self.readout()
        axis = self._slider_axis()
        parts = [
            f"{VIEW_LABELS[self._view]} · slice {r['slice']} / {self.shape[axis] - 1}",
            "voxel ({}, {}, {})".format(*r["voxel"]),
            "({:.1f}, {:.1f}, {:.1f}) mm".format(*r["world_mm"]),
            f"{r['modality']} = {r['intensity']:.4g}",
        ]
        if "label" in r:
            parts.append(f"label {r['label']}")
        if "heat" in r:
            parts.append(f"heat {r['heat']:.3g}")
        if "label" in r or "heat" in r:
            parts.append(f"overlay {self._opacity:.0%}")
        return " · ".join(parts)

    def _state(self, view: str | None = None) -> _DrawState:
        lo = self._level - self._width / 2
        return _DrawState(
            data=self._data[self._modality], labels=self._labels, heat=self._heat,
            heat_threshold=self._heat_threshold, view=view or self._view, cursor=tuple(self.cursor),
            radiological=self._radiological, vmin=lo, vmax=lo + self._width, opacity=self._opacity,
            aspect=self._aspect, crosshair=self._crosshair,
            title=(f"{self._title} · " if self._title else "") + self._modality,
            info=(f"{'radiological' if self._radiological else 'neurological'} · "
                  f"{'x'.join(f'{s:g}' for s in self.spacing)} mm · stored {self.stored_orientation}"),
        )

    def _redraw(self) -> None:
        png = self._renderer.png(self._state())
        self.frames_drawn += 1
        self.image_widget.value = png                                 # the picture first,
        self.readout_html.value = f"<code>{html.escape(self.readout_text())}</code>"
        self.drawn_html.value = f"<small>frame {self.frames_drawn}</small>"  # then the marker

    def frame(self) -> np.ndarray:
        """The pixels (RGB) of the live picture as last drawn."""
        from PIL import Image

        return np.asarray(Image.open(_io.BytesIO(self.image_widget.value)).convert("RGB"))

    @property
    def figure(self) -> Figure:
        """The one matplotlib figure this viewer draws into."""
        return self._renderer.fig

    def static_png(self) -> bytes:
        """A three-plane PNG of the current state (the headless fallback), at full quality."""
        png = self._renderer.png(self._state("three"), level=6)
        self._renderer.set_layout(self._view)
        return png

    def save(self, path: str | os.PathLike) -> Path:
        """Write the static three-plane figure to a PNG file (atomically)."""
        from helpers.io import atomic_write

        with atomic_write(path, "wb") as handle:
            handle.write(self.static_png())
        return Path(path)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["image/png"] = base64.b64encode(self.static_png()).decode("ascii")
        data["text/plain"] = (
            f"SliceViewer of {', '.join(self.volumes)}: {describe_grid(self.shape, self.affine)} "
            f"(stored {self.stored_orientation}); a live widget in Jupyter, a static "
            "three-plane figure elsewhere"
        )
        return data

    def _ipython_display_(self) -> None:
        from IPython import get_ipython
        from IPython.display import display

        ip = get_ipython()
        count = getattr(ip, "execution_count", None)
        if count is not None and count == self._shown_at:
            return  # show() already displayed it in this cell: no second copy for the echo
        display(self._repr_mimebundle_(), raw=True)

    def close(self) -> None:
        """Close the widgets and free the figure."""
        if getattr(self, "_renderer", None) is None:
            return
        self._renderer.close()
        self._renderer = None
        for box in self.children:
            if isinstance(box, widgets.Box):
                for child in box.children:
                    child.close()
            box.close()
        super().close()


def _stored_orientation(image: Any) -> str:
    """Orientation code of the (first) image as stored, before reorientation."""
    if isinstance(image, Mapping):
        image = next(iter(image.values()))
    try:
        if isinstance(image, (str, os.PathLike)):
            return orientation_code(nib.load(image).affine)
        if isinstance(image, nib.spatialimages.SpatialImage):
            return orientation_code(image.affine)
        return orientation_code(np.asarray(image[1], float))
    except Exception:  # noqa: BLE001 (only a caption)
        return "?"


def show(image: ImageLike | Mapping[str, ImageLike], *, labels: ImageLike | None = None,
         heatmap: ImageLike | None = None, label_names: Mapping[int, str] | None = None,
         title: str | None = None, view: str = "axial", **options: Any) -> SliceViewer:
    """Display a slice browser for a volume (and its modalities, labels, heat map); return it.

    In JupyterLab this shows the live widget. Where no widget front end exists
    (papermill, nbconvert HTML, GitHub), the same output carries a static
    three-plane figure. The returned viewer can be driven from code
    (``v.set_slice(40)``, ``v.set_view("coronal")``); echoing it as the cell's last
    line does not display it a second time.

    Args:
        image, labels, heatmap, label_names, title, view: see :class:`SliceViewer`.
        **options: the other :class:`SliceViewer` arguments (``radiological``,
            ``opacity``, ``window``, ``cursor``, ``heatmap_threshold``...).

    Example:
        >>> v = show("scan.nii.gz", labels="mask.nii.gz", label_names={1: "tumour"})  # doctest: +SKIP
    """
    from IPython import get_ipython
    from IPython.display import display

    viewer = SliceViewer(image, labels=labels, heatmap=heatmap, label_names=label_names,
                         title=title, view=view, **options)
    display(viewer)
    ip = get_ipython()
    viewer._shown_at = getattr(ip, "execution_count", None)  # noqa: SLF001
    return viewer


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.viewer",
        description="Write a static three-plane figure of a NIfTI volume (with optional overlays).")
    parser.add_argument("image", nargs="+", help="NIfTI file(s); several are modalities (first shown)")
    parser.add_argument("--labels", help="a label map on the same grid")
    parser.add_argument("--heatmap", help="a continuous map on the same grid")
    parser.add_argument("--out", default=None, help="PNG to write (default: IMAGE.png beside it)")
    parser.add_argument("--radiological", action="store_true", help="patient's right on the left")
    parser.add_argument("--cursor-mm", nargs=3, type=float, help="crosshair at this world point (mm)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    images = {Path(p).name.split(".")[0]: p for p in args.image}
    try:
        viewer = SliceViewer(images, labels=args.labels, heatmap=args.heatmap, title=args.title,
                             radiological=args.radiological)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cursor_mm:
        viewer.set_cursor_mm(args.cursor_mm)
    out = Path(args.out) if args.out else Path(args.image[0]).with_name(
        Path(args.image[0]).name.split(".")[0] + "_views.png")
    viewer.save(out)
    print(f"{viewer.readout_text()}\nwrote {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
