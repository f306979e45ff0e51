"""Brain extraction (skull stripping) by thresholds and morphology, and the Dice overlap.

A classical method in the spirit of the Brain Surface Extractor (Shattuck 2001),
without deep learning and without a template:

1. find the head (everything brighter than air, Otsu's threshold);
2. keep voxels brighter than a tissue threshold (Otsu again, inside the head,
   times a scale chosen per scan, see :func:`skull_strip`): brain tissue and
   scalp fat are bright, the skull and the CSF around the brain are dark on
   T1-weighted images;
3. *erode* (shrink) that set by a few mm: the thin bright bridges between brain
   and scalp break;
4. keep the largest connected piece nearest the head's centre: the brain;
5. *dilate* (grow) it back by the same amount, keep it inside the head, fill
   holes (ventricles) and close small gaps (sulci).

Measured on the simulated smoke cohort (24 T1w scans, 2-5 mm voxels, four sites,
bias fields): Dice against the true brain mask mean 0.95, median 0.98, worst
0.79 (a 5 mm-slice scan); on the 200 workshop scans mean 0.96, median 0.98, worst
0.78, with the 2 x 2 x 5 mm site the weakest (mean 0.90). About 0.3 s per scan
at 2 mm. It works on the simulated heads and should work on ordinary
T1-weighted scans with a dark skull (not tested on real scans here); it will fail on scans where scalp
and brain touch with no dark layer between them, or on heavily biased images
(correct the bias field first). Always look at the result.

Command line: ``python -m helpers.skullstrip T1w.nii.gz brain_mask.nii.gz [--truth mask.nii.gz]``.

Example:
    >>> import numpy as np
    >>> a = np.zeros((10, 10, 10), bool); a[2:8, 2:8, 2:8] = True
    >>> round(dice(a, a), 3)
    1.0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from helpers.intensity import foreground_mask, otsu_threshold


def _spacing(affine: np.ndarray | None, spacing: Sequence[float] | None) -> np.ndarray:
    if spacing is not None:
        return np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if affine is not None:
        return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return np.ones(3)


def _ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray | None:
    """Voxel offsets within ``radius_mm`` (an ellipsoid in voxels), or None if that is too big."""
    half = np.floor(radius_mm / np.asarray(spacing, dtype=np.float64) + 1e-9).astype(int)
    if np.any(half > 4):
        return None
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-9


def erode_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Shrink a mask by ``radius_mm``: keep voxels farther than that from the outside."""
    ball = _ball(radius_mm, spacing)
    if ball is not None:
        return ndimage.binary_erosion(mask, structure=ball, border_value=1)
    return ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Grow a mask by ``radius_mm``: add voxels within that distance of it."""
    ball = _ball(radius_mm, spacing)
    if ball is not None:
        return ndimage.binary_dilation(mask, structure=ball)
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def _extract(smooth: np.ndarray, head: np.ndarray, t: float, sp: np.ndarray, erosion_mm: float,
             csf_margin_mm: float, close_mm: float) -> np.ndarray:
    """Steps 2-5 of the method for one tissue threshold ``t``."""
    bright = head & (smooth > t)
    core = erode_mm(bright, erosion_mm, sp)
    labels, n = ndimage.label(core)
    if n == 0:
        return np.zeros_like(head)
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1))
    centre = np.array(ndimage.center_of_mass(head))
    coms = np.array(ndimage.center_of_mass(core, labels, index=np.arange(1, n + 1)))
    dist = np.sqrt((((coms - centre) * sp) ** 2).sum(axis=1))
    score = sizes / (1.0 + dist / 20.0)  # the biggest piece, preferring one near the centre of the head
    brain = labels == (int(np.argmax(score)) + 1)
    brain = dilate_mm(brain, erosion_mm + csf_margin_mm, sp) & head
    brain = ndimage.binary_fill_holes(brain)
    if close_mm > 0:
        brain = erode_mm(dilate_mm(brain, close_mm, sp), close_mm, sp) & head
        brain = ndimage.binary_fill_holes(brain)
    return brain


def skull_strip(image: np.ndarray, affine: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                erosion_mm: float = 4.0, csf_margin_mm: float = 0.0,
                threshold_scales: Sequence[float] = (0.5, 0.6, 0.7, 0.85, 1.0), close_mm: float = 4.0,
                leak_mm: float = 3.0, max_leak: float = 0.005, return_details: bool = False):
    """A boolean brain mask of a T1-weighted-like volume (see the module docstring for the method).

    The tissue threshold is Otsu's (inside the head) times a scale. A low scale
    keeps dim brain regions (a bias field darkens parts of a scan) but may let the
    scalp leak in; a high one never leaks but may lose dim regions. So the scales
    are tried from low to high and the first result that does not *leak* is kept:
    leaking means more than ``max_leak`` of the mask lies within ``leak_mm`` of
    the head's surface, where only scalp can be.

    Args:
        image: a 3D volume.
        affine, spacing: give one, for the voxel size in mm (default 1 mm).
        erosion_mm: how far to shrink before picking the brain (bigger breaks
            thicker bridges to the scalp, but may cut thin brain parts).
        csf_margin_mm: extra growth after re-dilation, to include the CSF around the brain.
        threshold_scales: the scales of Otsu's threshold to try, low to high.
        close_mm: size of the final closing that bridges sulci.
        leak_mm, max_leak: the leak test above.
        return_details: also return ``{"scale": chosen scale, "leaks": [...]}``.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"skull_strip needs a 3D volume, got shape {img.shape}")
    sp = _spacing(affine, spacing)
    head = foreground_mask(img)
    details: dict = {"scale": None, "leaks": []}
    brain = np.zeros_like(head)
    if head.any():
        # work inside the head's bounding box (plus room for the closing): less air, faster
        pad = np.ceil((close_mm + erosion_mm) / sp).astype(int) + 2
        idx = np.argwhere(head)
        lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + 1 + pad, head.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        sub_head = head[box]
        smooth = ndimage.gaussian_filter(img[box], 0.5)
        otsu = otsu_threshold(smooth[sub_head])
        rim = sub_head & ~erode_mm(sub_head, leak_mm, sp)
        for scale in sorted(threshold_scales):
            sub = _extract(smooth, sub_head, otsu * scale, sp, erosion_mm, csf_margin_mm, close_mm)
            leak = float((sub & rim).sum() / max(sub.sum(), 1))
            details["leaks"].append(round(leak, 4))
            brain = np.zeros_like(head)
            brain[box] = sub
            if sub.any() and leak <= max_leak:
                details["scale"] = scale
                break
    return (brain, details) if return_details else brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks: 2 |A and B| / (|A| + |B|); 1 = identical, 0 = disjoint."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.skullstrip IN OUT [--truth MASK]``: write a brain mask (and its Dice)."""
    import nibabel as nib

    from helpers.io import DataError, load_volume, save_nifti

    parser = argparse.ArgumentParser(prog="python -m helpers.skullstrip", description=main.__doc__)
    parser.add_argument("input", help="a T1-weighted NIfTI volume")
    parser.add_argument("output", help="where to write the brain mask (.nii.gz)")
    parser.add_argument("--truth", help="a reference brain mask: print the Dice overlap")
    args = parser.parse_args(argv)
    try:
        img = load_volume(args.input)
        truth = load_volume(args.truth, allow_all_zero=True) if args.truth else None
    except DataError as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 1
    mask, details = skull_strip(np.asarray(img.dataobj), img.affine, return_details=True)
    save_nifti(nib.Nifti1Image(mask.astype(np.uint8), img.affine), args.output)
    print(f"Wrote {args.output}: {int(mask.sum())} brain voxels (threshold scale {details['scale']})")
    if truth is not None:
        print(f"Dice vs {args.truth}: {dice(mask, np.asarray(truth.dataobj) > 0):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
