"""Brain extraction (skull stripping) by thresholds and morphology, and the Dice overlap.

A classical method in the spirit of the Brain Surface Extractor (Shattuck 2001),
without deep learning and without a template:

1. find the head (everything brighter than air, Otsu's threshold);
2. keep voxels brighter than a tissue threshold (Otsu again, inside the head):
   brain tissue and scalp fat are bright, the skull and the CSF around the brain
   are dark on T1-weighted images;
3. *erode* (shrink) that set by a few mm: the thin bright bridges between brain
   and scalp break;
4. keep the largest connected piece nearest the head's centre: the brain;
5. *dilate* (grow) it back by the same amount plus the CSF margin, keep it inside
   the head, fill holes (ventricles) and close small gaps (sulci).

It is fast (well under a second at 2 mm) and works on the simulated heads and on
ordinary T1-weighted scans with a dark skull; it will fail on scans where scalp
and brain touch with no dark layer between them, or on heavily biased images
(correct the bias field first). Always look at the result.

Example:
    >>> import numpy as np
    >>> a = np.zeros((10, 10, 10), bool); a[2:8, 2:8, 2:8] = True
    >>> round(dice(a, a), 3)
    1.0
"""

from __future__ import annotations

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


def erode_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Shrink a mask by ``radius_mm`` (a ball, through the Euclidean distance transform)."""
    return ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm


def dilate_mm(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Grow a mask by ``radius_mm``."""
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def skull_strip(image: np.ndarray, affine: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                erosion_mm: float = 4.0, csf_margin_mm: float = 2.0, threshold_scale: float = 1.0,
                close_mm: float = 4.0) -> np.ndarray:
    """A boolean brain mask of a T1-weighted-like volume (see the module docstring for the method).

    Args:
        image: a 3D volume.
        affine, spacing: give one, for the voxel size in mm (default 1 mm).
        erosion_mm: how far to shrink before picking the brain (bigger breaks
            thicker bridges to the scalp, but may cut thin brain parts).
        csf_margin_mm: extra growth after re-dilation, to include the CSF around the brain.
        threshold_scale: multiply the tissue threshold (lower it, e.g. 0.8, if
            parts of the brain are missing; raise it if the scalp leaks in).
        close_mm: size of the final closing that bridges sulci.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"skull_strip needs a 3D volume, got shape {img.shape}")
    sp = _spacing(affine, spacing)
    head = foreground_mask(img)
    if not head.any():
        return head
    smooth = ndimage.gaussian_filter(img, 0.5)
    t = otsu_threshold(smooth[head]) * threshold_scale
    bright = head & (smooth > t)
    core = erode_mm(bright, erosion_mm, sp)
    labels, n = ndimage.label(core)
    if n == 0:
        return np.zeros_like(head)
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1))
    centre = np.array(ndimage.center_of_mass(head))
    coms = np.array(ndimage.center_of_mass(core, labels, index=np.arange(1, n + 1)))
    dist = np.sqrt((((coms - centre) * sp) ** 2).sum(axis=1))
    # the biggest pieces, preferring the one near the centre of the head
    score = sizes / (1.0 + dist / 20.0)
    brain = labels == (int(np.argmax(score)) + 1)
    brain = dilate_mm(brain, erosion_mm + csf_margin_mm, sp) & head
    brain = ndimage.binary_fill_holes(brain)
    if close_mm > 0:
        brain = erode_mm(dilate_mm(brain, close_mm, sp), close_mm, sp) & head
        brain = ndimage.binary_fill_holes(brain)
    return brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks: 2 |A and B| / (|A| + |B|); 1 = identical, 0 = disjoint."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0
