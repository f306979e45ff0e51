"""Preprocessing: from a scan as stored to the tensor a model sees, and back.

Two layers:

1. **Steps**, plain functions on arrays plus their 4x4 affine (voxel -> mm),
   each testable alone (geometric ones in :mod:`helpers.geometry`, intensity ones
   in :mod:`helpers.intensity`, all importable from here). A volume is ``(X, Y, Z)`` or channels-first
   ``(C, X, Y, Z)``; every geometric step returns the new array *and the new
   affine*, so world coordinates are never lost:
   :func:`reorient`, :func:`resample`, :func:`resample_to_grid`, :func:`crop`,
   :func:`foreground_box`, :func:`crop_or_pad`, :func:`resize`,
   :func:`extract_slices`; intensity steps (from :mod:`helpers.intensity`):
   ``denoise``, ``correct_bias_field``, ``window``, ``equalise_histogram``,
   ``clahe``, ``zscore``, ``percentile_normalise``, ``learn_histogram_landmarks``,
   ``histogram_standardise``; brain extraction: :func:`helpers.skullstrip.skull_strip`.
2. **A pipeline**, :class:`PreprocessConfig`: a dataclass naming the steps and
   their settings, saved as JSON (``to_dict`` / ``from_dict`` / ``save`` /
   ``load``) and hashed (``config.hash()``, the key of the tensor cache).
   ``config.apply(images, affine, mask)`` runs the steps in a fixed order and
   returns a :class:`Preprocessed` holding the array, the mask and a
   :class:`Geometry` record; :func:`to_original_grid` maps a prediction made on
   the preprocessed grid back onto the original scan. The training engine saves
   the config beside its checkpoint; the deployment code re-applies it, unchanged,
   to a new scan.

The fixed order of ``apply``: reorient -> denoise -> bias-field correction ->
resample -> brain extraction -> crop to the brain (or head) -> intensity
normalisation -> crop-or-pad / resize to a fixed shape.

Example:
    >>> import numpy as np
    >>> cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), shape=(16, 16, 16))
    >>> vol = np.random.default_rng(0).random((20, 24, 22)).astype(np.float32) + 1
    >>> out = cfg.apply(vol, np.eye(4))
    >>> out.image.shape, out.image.dtype
    ((1, 16, 16, 16), dtype('float32'))
    >>> PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    True

Command line: ``python -m helpers.preprocess IN.nii.gz OUT.nii.gz --spacing 2 --shape 96``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from helpers.geometry import (  # noqa: F401 (re-exported: every step lives in helpers.preprocess)
    _channels_first,
    crop,
    crop_or_pad,
    extract_slices,
    foreground_box,
    orientation_of,
    reorient,
    resample,
    resample_to_grid,
    resize,
    spacing_of,
)
from helpers.intensity import (  # noqa: F401 (re-exported: every step lives in helpers.preprocess)
    clahe,
    correct_bias_field,
    denoise,
    equalise_histogram,
    estimate_bias_field,
    foreground_mask,
    histogram_standardise,
    learn_histogram_landmarks,
    otsu_threshold,
    percentile_normalise,
    window,
    zscore,
)
from helpers.io import DataError, load_nifti, load_volume, read_data, save_nifti, write_json

CONFIG_VERSION = 1


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Geometry:
    """Everything needed to map between the original scan and the preprocessed grid.

    Attributes:
        original_shape: spatial shape of the scan as stored.
        original_affine: its voxel -> mm matrix.
        shape: spatial shape after preprocessing.
        affine: voxel -> mm matrix after preprocessing (the same mm as the original).
        crop_box: the brain/head box cut after resampling, or None.
        steps: what was done, in order, for people.
    """

    original_shape: tuple[int, ...]
    original_affine: np.ndarray
    shape: tuple[int, ...]
    affine: np.ndarray
    crop_box: tuple[tuple[int, int], ...] | None = None
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"original_shape": list(self.original_shape), "original_affine": np.asarray(self.original_affine).tolist(),
                "shape": list(self.shape), "affine": np.asarray(self.affine).tolist(),
                "crop_box": [list(b) for b in self.crop_box] if self.crop_box else None, "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(tuple(d["original_shape"]), np.asarray(d["original_affine"]), tuple(d["shape"]),
                   np.asarray(d["affine"]), tuple(tuple(b) for b in d["crop_box"]) if d.get("crop_box") else None,
                   list(d.get("steps", [])))


@dataclass
class Preprocessed:
    """The output of :meth:`PreprocessConfig.apply`.

    Attributes:
        image: float32 ``(C, X, Y, Z)``.
        mask: the label map on the same grid (integers), or None.
        brain: the brain mask found by skull stripping (or the head mask), same grid.
        geometry: the :class:`Geometry` record (for :func:`to_original_grid`).
    """

    image: np.ndarray
    mask: np.ndarray | None
    brain: np.ndarray | None
    geometry: Geometry


@dataclass
class PreprocessConfig:
    """The preprocessing of a model, as data: save it with the checkpoint, re-apply it anywhere.

    Attributes:
        orientation: axis codes to reorient to (``"RAS"``), or None to keep the stored order.
        spacing: target voxel size in mm (one number or three), or None to keep it.
        image_order: interpolation for images, 1 (linear) or 3 (cubic).
        denoise: None, ``"gaussian"``, ``"median"`` or ``"anisotropic"``.
        denoise_sigma_mm: Gaussian sigma in mm.
        bias_correction: divide each channel by its estimated smooth bias field.
        skull_strip: remove everything outside the brain (found on channel ``reference_channel``).
        reference_channel: the channel used for brain extraction and cropping.
        crop: crop to the brain (or head) bounding box plus ``crop_margin_mm``.
        crop_margin_mm: margin kept around the brain.
        normalise: ``"zscore"``, ``"percentile"``, ``"histogram"`` (Nyul) or ``"none"``;
            statistics come from voxels inside the brain (or head) mask.
        percentiles: (low, high) for ``"percentile"``.
        histogram_landmarks: Nyul landmarks per channel (learn with :meth:`fit_histograms`).
        shape: final spatial shape, or None.
        shape_mode: ``"crop_or_pad"`` (keeps voxel size) or ``"resize"`` (stretches).
        version: format version of this config.
    """

    orientation: str | None = "RAS"
    spacing: float | tuple[float, float, float] | None = None
    image_order: int = 1
    denoise: str | None = None
    denoise_sigma_mm: float = 1.0
    bias_correction: bool = False
    skull_strip: bool = False
    reference_channel: int = 0
    crop: bool = True
    crop_margin_mm: float = 4.0
    normalise: str = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    histogram_landmarks: list[list[float]] | None = None
    shape: tuple[int, int, int] | None = None
    shape_mode: str = "crop_or_pad"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.normalise not in ("zscore", "percentile", "histogram", "none"):
            raise ValueError(f"normalise must be zscore, percentile, histogram or none, not {self.normalise!r}")
        if self.shape_mode not in ("crop_or_pad", "resize"):
            raise ValueError(f"shape_mode must be crop_or_pad or resize, not {self.shape_mode!r}")
        if isinstance(self.spacing, list):
            self.spacing = tuple(float(s) for s in self.spacing)
        if isinstance(self.shape, int):
            self.shape = (self.shape,) * 3
        if isinstance(self.shape, list):
            self.shape = tuple(int(s) for s in self.shape)
        if isinstance(self.percentiles, list):
            self.percentiles = tuple(self.percentiles)

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Rebuild a config from :meth:`to_dict`; unknown keys are an error (a newer format?)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown preprocessing setting(s) {unknown}; is this config from a newer version?")
        return cls(**d)

    def hash(self) -> str:
        """A short, stable hash of the settings (change any setting, get another hash)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreprocessConfig:
        """Read a config written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"not a readable preprocessing config ({exc})") from exc

    # ---- learning from the training split
    def fit_histograms(self, images: Sequence[np.ndarray], affines: Sequence[np.ndarray]) -> PreprocessConfig:
        """Learn Nyul landmarks per channel on (training) images; returns a new config using them.

        Each image goes through this config's steps up to, not including,
        normalisation, so the landmarks match what :meth:`apply` sees.
        """
        base = dataclasses.replace(self, normalise="none", shape=None)
        per_channel: list[list[np.ndarray]] = []
        masks = []
        for img, aff in zip(images, affines, strict=True):
            out = base.apply(img, aff)
            per_channel.append(list(out.image))
            masks.append(out.brain)
        n_ch = len(per_channel[0])
        landmarks = [learn_histogram_landmarks([p[c] for p in per_channel], masks) for c in range(n_ch)]
        return dataclasses.replace(self, normalise="histogram", histogram_landmarks=landmarks)

    # ---- running
    def apply(self, image: np.ndarray | Sequence[np.ndarray], affine: np.ndarray,
              mask: np.ndarray | None = None) -> Preprocessed:
        """Run the pipeline on one case.

        Args:
            image: a 3D volume or channels ``(C, X, Y, Z)`` (all on one grid).
            affine: its voxel -> mm matrix.
            mask: an optional label map on the same grid (resampled nearest).
        """
        from helpers.skullstrip import skull_strip

        img = np.asarray(image, dtype=np.float32)
        img, _ = _channels_first(img)
        affine = np.asarray(affine, dtype=np.float64)
        geom = Geometry(tuple(img.shape[1:]), affine.copy(), (), affine)
        steps = geom.steps
        lab = None if mask is None else np.asarray(mask)
        if lab is not None and lab.shape != img.shape[1:]:
            raise ValueError(f"mask shape {lab.shape} differs from image shape {img.shape[1:]}")
        if self.orientation:
            before = orientation_of(affine)
            img, new_aff = reorient(img, affine, self.orientation)
            if lab is not None:
                lab, _ = reorient(lab, affine, self.orientation)
            affine = new_aff
            steps.append(f"reorient {before} -> {self.orientation}")
        if self.denoise:
            sp = spacing_of(affine)
            img = np.stack([denoise(c, self.denoise, self.denoise_sigma_mm, sp) for c in img])
            steps.append(f"denoise ({self.denoise})")
        if self.bias_correction:
            head = foreground_mask(img[self.reference_channel])
            img = np.stack([correct_bias_field(c, head & (c > 0))[0] for c in img])
            steps.append("bias-field correction (polynomial log-field, degree 3)")
        if self.spacing is not None:
            before = spacing_of(affine)
            img, new_aff = resample(img, affine, self.spacing, order=self.image_order)
            if lab is not None:
                lab, _ = resample(lab, affine, self.spacing, is_label=True)
            affine = new_aff
            steps.append(f"resample {np.round(before, 2).tolist()} -> {np.round(spacing_of(affine), 2).tolist()} mm")
        brain = None
        if self.skull_strip:
            brain = skull_strip(img[self.reference_channel], affine)
            img = img * brain[None]
            steps.append("brain extraction")
        elif self.crop or self.normalise != "none":
            brain = foreground_mask(img[self.reference_channel])  # the head: statistics and crop box
        else:
            brain = np.ones(img.shape[1:], dtype=bool)
        if self.crop and brain.any():
            margin = np.ceil(self.crop_margin_mm / spacing_of(affine)).astype(int)
            box = foreground_box(brain, margin)
            img, new_aff = crop(img, affine, box)
            brain, _ = crop(brain, affine, box)
            if lab is not None:
                lab, _ = crop(lab, affine, box)
            affine = new_aff
            geom.crop_box = box
            steps.append(f"crop to {'brain' if self.skull_strip else 'head'} box {[list(b) for b in box]}")
        img = self._normalise(img, brain)
        if self.shape is not None:
            if self.shape_mode == "crop_or_pad":
                img, new_aff = crop_or_pad(img, affine, self.shape, pad_value="min")
                brain, _ = crop_or_pad(brain, affine, self.shape)
                if lab is not None:
                    lab, _ = crop_or_pad(lab, affine, self.shape)
            else:
                img, new_aff = resize(img, affine, self.shape, order=1)
                brain, _ = resize(brain.astype(np.uint8), affine, self.shape, order=0)
                brain = brain.astype(bool)
                if lab is not None:
                    lab, _ = resize(lab, affine, self.shape, order=0)
            affine = new_aff
            steps.append(f"{self.shape_mode} to {list(self.shape)}")
        geom.shape = tuple(img.shape[1:])
        geom.affine = affine
        return Preprocessed(np.ascontiguousarray(img, dtype=np.float32), lab, brain.astype(bool), geom)

    def _normalise(self, img: np.ndarray, brain: np.ndarray) -> np.ndarray:
        m = brain if brain.any() else None
        if self.normalise == "zscore":
            return np.stack([zscore(c, m) for c in img])
        if self.normalise == "percentile":
            lo, hi = self.percentiles
            return np.stack([percentile_normalise(c, lo, hi, m) for c in img])
        if self.normalise == "histogram":
            if not self.histogram_landmarks:
                raise ValueError("normalise='histogram' needs histogram_landmarks: call fit_histograms() "
                                 "on the training images first")
            if len(self.histogram_landmarks) != len(img):
                raise ValueError(f"histogram_landmarks are for {len(self.histogram_landmarks)} channel(s), "
                                 f"the image has {len(img)}")
            return np.stack([histogram_standardise(c, lm, m) for c, lm in
                             zip(img, self.histogram_landmarks, strict=True)])
        return img


def to_original_grid(prediction: np.ndarray, geometry: Geometry, order: int = 0) -> np.ndarray:
    """Map a prediction on the preprocessed grid back onto the original scan's voxels.

    Args:
        prediction: ``(X, Y, Z)`` label map (``order=0``) or ``(C, X, Y, Z)``
            probabilities (``order=1``) on ``geometry.shape``.
        geometry: the record from :meth:`PreprocessConfig.apply`.

    Returns:
        the same on ``geometry.original_shape``, aligned with the stored scan
        (save it with ``geometry.original_affine``). Outside the cropped box: 0.
    """
    return resample_to_grid(prediction, geometry.affine, geometry.original_shape,
                            geometry.original_affine, order=order)


# --------------------------------------------------------------------------- cases from a table


def read_case_arrays(table: Any, row: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The stored images of one case as ``(C, X, Y, Z)`` float32, its affine and its mask.

    Every file is checked (:func:`helpers.io.load_volume`); modalities on other
    grids than the first are resampled onto it. 2D tables give ``(C, H, W)`` and
    an identity affine.
    """
    from helpers.datasets import read_image_2d

    if not hasattr(row, "index"):
        row = table.df.iloc[int(row)]
    if table.dims == 2:
        chans = [read_image_2d(row[m]) for m in table.modalities]
        return np.stack(chans), np.eye(4), None
    channels, affine, shape = [], None, None
    cache: dict[str, nib.Nifti1Image] = {}
    for m in table.modalities:
        path = str(row[m])
        if m in table.volume_index:
            if path not in cache:
                cache[path] = load_volume(path, ndim=4)
            vol = cache[path]
            data = np.asarray(vol.dataobj[..., table.volume_index[m]], dtype=np.float32)
        else:
            vol = load_volume(path)
            data = np.asarray(vol.dataobj, dtype=np.float32)
        if affine is None:
            affine, shape = vol.affine, data.shape
        elif data.shape != shape or not np.allclose(vol.affine, affine, atol=1e-3):
            data = resample_to_grid(data, vol.affine, shape, affine, order=1)
        channels.append(data)
    mask = None
    if str(row.get("mask", "") or ""):
        mimg = load_nifti(row["mask"])
        mask = np.rint(read_data(mimg, row["mask"])).astype(np.int16)
        if mask.ndim == 4 and mask.shape[3] == 1:
            mask = mask[..., 0]
        if mask.shape != shape:
            raise DataError(row["mask"], f"mask shape {mask.shape} differs from the image {shape}")
    return np.stack(channels), np.asarray(affine), mask


def load_case(table: Any, row: Any, config: PreprocessConfig | None = None) -> Preprocessed:
    """Read one case of a :class:`helpers.datasets.CaseTable` and preprocess it.

    Returns a :class:`Preprocessed`: ``image`` float32 ``(C, ...)``, ``mask``
    (or None), ``geometry``. For 2D tables, images are scaled to 0..1 by their
    percentiles and, when ``config.shape`` is set, resized to its last two sizes.
    """
    config = config or PreprocessConfig()
    image, affine, mask = read_case_arrays(table, row)
    if table.dims == 2:
        out = np.stack([percentile_normalise(c, 0.5, 99.5) for c in image])
        if config.shape is not None:
            import torch
            import torch.nn.functional as F

            out = F.interpolate(torch.from_numpy(out)[None], size=list(config.shape[-2:]), mode="bilinear",
                                align_corners=False, antialias=True)[0].numpy()
        geom = Geometry(tuple(image.shape[1:]), affine, tuple(out.shape[1:]), affine, steps=["2D: percentile 0.5-99.5"])
        return Preprocessed(out.astype(np.float32), None, None, geom)
    return config.apply(image, affine, mask)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.preprocess IN OUT [--config cfg.json | --spacing 2 --shape 96 ...]``."""
    parser = argparse.ArgumentParser(prog="python -m helpers.preprocess", description=main.__doc__)
    parser.add_argument("input", help="a NIfTI volume")
    parser.add_argument("output", help="where to write the preprocessed volume (.nii.gz)")
    parser.add_argument("--config", help="a PreprocessConfig JSON (from a trained model)")
    parser.add_argument("--spacing", type=float, default=None)
    parser.add_argument("--shape", type=int, default=None)
    parser.add_argument("--normalise", default="zscore", choices=("zscore", "percentile", "none"))
    parser.add_argument("--skull-strip", action="store_true")
    parser.add_argument("--bias", action="store_true", help="bias-field correction")
    args = parser.parse_args(argv)
    if args.config:
        cfg = PreprocessConfig.load(args.config)
    else:
        cfg = PreprocessConfig(spacing=args.spacing, shape=args.shape, normalise=args.normalise,
                               skull_strip=args.skull_strip, bias_correction=args.bias)
    try:
        img = load_volume(args.input)
    except DataError as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 1
    out = cfg.apply(np.asarray(img.dataobj), img.affine)
    save_nifti(nib.Nifti1Image(np.moveaxis(out.image, 0, -1).squeeze(-1) if out.image.shape[0] == 1
                               else np.moveaxis(out.image, 0, -1), out.geometry.affine), args.output)
    print("\n".join(out.geometry.steps))
    print(f"Wrote {args.output}: shape {out.geometry.shape}, spacing {spacing_of(out.geometry.affine).round(2).tolist()} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
