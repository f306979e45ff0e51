"""Geometric preprocessing steps: every one returns the new array *and its new affine*.

A volume is ``(X, Y, Z)`` or channels-first ``(C, X, Y, Z)``; the affine is the
4x4 voxel -> mm matrix. Because each step also returns the updated affine, a
voxel keeps its position in millimetres through reorientation, resampling,
cropping and padding, and :func:`resample_to_grid` can map any result back onto
any other grid. Collected, with the intensity steps, in :mod:`helpers.preprocess`.

Example:
    >>> import numpy as np
    >>> lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    >>> data, affine = reorient(np.zeros((4, 5, 6)), lps)
    >>> orientation_of(affine), data.shape
    ('RAS', (4, 5, 6))
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (the lengths of the affine's columns)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _channels_first(data: np.ndarray) -> tuple[np.ndarray, bool]:
    data = np.asarray(data)
    if data.ndim == 3:
        return data[None], True
    if data.ndim == 4:
        return data, False
    raise ValueError(f"expected a 3D volume or a (C, X, Y, Z) stack, got shape {data.shape}")


def _translate(offset: Sequence[float]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = offset
    return t


def orientation_of(affine: np.ndarray) -> str:
    """The axis codes of an affine, e.g. ``"RAS"`` or ``"LPS"`` (where each array axis points)."""
    return "".join(nib.aff2axcodes(affine))


def reorient(data: np.ndarray, affine: np.ndarray, target: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Flip and permute array axes so that they point to ``target`` (default RAS+).

    Only axis flips and swaps (no interpolation), so voxel values are unchanged and
    every voxel keeps its position in mm. Works on (X, Y, Z) and (C, X, Y, Z).

    Example:
        >>> lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        >>> _, aff = reorient(np.zeros((4, 5, 6)), lps)
        >>> orientation_of(aff)
        'RAS'
    """
    arr, squeeze = _channels_first(data)
    current = nib.orientations.io_orientation(affine)
    wanted = nib.orientations.axcodes2ornt(tuple(target))
    transform = nib.orientations.ornt_transform(current, wanted)
    moved = np.moveaxis(arr, 0, -1)
    out = nib.orientations.apply_orientation(moved, transform)
    out = np.ascontiguousarray(np.moveaxis(out, -1, 0))
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(transform, arr.shape[1:])
    return (out[0] if squeeze else out), new_affine


def _torch_resample(arr: np.ndarray, factors: Sequence[float], order: int) -> np.ndarray:
    """Resample (C, X, Y, Z) by ``1/factors`` (factor = new spacing / old spacing)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    scale = [1.0 / float(f) for f in factors]
    mode = "trilinear" if order == 1 else "nearest-exact"
    kwargs = {"align_corners": False} if order == 1 else {}
    with torch.no_grad():
        out = F.interpolate(t, scale_factor=scale, mode=mode, recompute_scale_factor=False, **kwargs)
    return out[0].numpy()


def resample(data: np.ndarray, affine: np.ndarray, spacing: float | Sequence[float],
             order: int = 1, is_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Resample to a new voxel size in mm, keeping the field of view and world coordinates.

    The outer edge of the first voxel stays where it was; the number of voxels
    along each axis is ``floor(n * old_spacing / new_spacing)``. Images use linear
    interpolation (``order=1``, PyTorch, fast) or cubic B-splines (``order=3``,
    SciPy); label maps (``is_label=True``) take the nearest voxel, so they stay
    integer-valued.

    Returns:
        the resampled array and its affine.
    """
    arr, squeeze = _channels_first(data)
    old = spacing_of(affine)
    new = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    factors = new / old
    if np.allclose(factors, 1.0, atol=1e-6):
        return np.asarray(data), np.asarray(affine, dtype=np.float64)
    if is_label or order == 0:
        out = _torch_resample(arr, factors, 0)
    elif order == 1:
        out = _torch_resample(arr, factors, 1)
    else:
        from scipy import ndimage

        size = np.floor(np.array(arr.shape[1:]) / factors + 1e-6).astype(int)
        out = np.stack([ndimage.affine_transform(
            c.astype(np.float32), factors, offset=0.5 * (factors - 1), output_shape=tuple(size),
            order=order, mode="nearest") for c in arr])
    step = np.diag([*factors, 1.0])
    step[:3, 3] = 0.5 * (factors - 1)
    new_affine = np.asarray(affine, dtype=np.float64) @ step
    out = out.astype(data.dtype if is_label else np.float32)
    return (out[0] if squeeze else out), new_affine


def resample_to_grid(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                     order: int = 1, fill: float = 0.0) -> np.ndarray:
    """Resample onto any other voxel grid (shape + affine), through world coordinates.

    For each target voxel the position in mm is computed with ``target_affine``
    and looked up in ``data`` through the inverse of ``affine``: reorientation,
    resampling and cropping are all undone at once. ``order`` 0 (nearest, for
    label maps) or 1 (linear). Outside the source: ``fill``.
    """
    import torch
    import torch.nn.functional as F

    arr, squeeze = _channels_first(data)
    src = np.array(arr.shape[1:], dtype=np.float64)
    dst = np.array(shape, dtype=np.float64)
    vox = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    # normalised target coords u (align_corners=False) -> target voxel -> source voxel -> normalised
    to_vox = np.diag([*(dst / 2), 1.0])
    to_vox[:3, 3] = dst / 2 - 0.5
    to_norm = np.diag([*(2 / src), 1.0])
    to_norm[:3, 3] = 1 / src - 1
    theta_xyz = to_norm @ vox @ to_vox
    perm = np.eye(4)[[2, 1, 0, 3]]  # grid_sample's (x, y, z) are our (Z, Y, X)
    theta = (perm @ theta_xyz @ perm)[:3]
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    th = torch.from_numpy(theta).float()[None]
    with torch.no_grad():
        grid = F.affine_grid(th, [1, arr.shape[0], *[int(s) for s in shape]], align_corners=False)
        out = F.grid_sample(t - fill, grid, mode="nearest" if order == 0 else "bilinear",
                            padding_mode="zeros", align_corners=False) + fill
    out = out[0].numpy()
    if order == 0:
        out = out.astype(np.asarray(data).dtype)
    return out[0] if squeeze else out


def foreground_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[tuple[int, int], ...]:
    """The bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of a mask, grown by ``margin`` voxels."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        raise ValueError("foreground_box: the mask is empty")
    margin = np.broadcast_to(np.asarray(margin, dtype=int), (3,))
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return tuple((int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def crop(data: np.ndarray, affine: np.ndarray, box: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Cut out ``box`` (from :func:`foreground_box`); the affine moves so voxels keep their mm."""
    arr, squeeze = _channels_first(data)
    sl = tuple(slice(a, b) for a, b in box)
    out = np.ascontiguousarray(arr[(slice(None), *sl)])
    new_affine = np.asarray(affine, dtype=np.float64) @ _translate([a for a, _ in box])
    return (out[0] if squeeze else out), new_affine


def crop_or_pad(data: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                pad_value: float | str = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop or pad each axis to ``shape``; ``pad_value="min"`` pads with each channel's minimum."""
    arr, squeeze = _channels_first(data)
    start = []
    out_shape = (arr.shape[0], *[int(s) for s in shape])
    if pad_value == "min":
        fill = arr.reshape(arr.shape[0], -1).min(axis=1)
    else:
        fill = np.full(arr.shape[0], float(pad_value))
    out = np.empty(out_shape, dtype=arr.dtype)
    out[:] = fill.reshape(-1, 1, 1, 1).astype(arr.dtype)
    src_sl, dst_sl = [], []
    for n, m in zip(arr.shape[1:], shape, strict=True):
        offset = (n - m) // 2  # >0: crop from offset; <0: pad -offset before
        start.append(offset)
        s0, d0 = max(offset, 0), max(-offset, 0)
        length = min(n - s0, m - d0)
        src_sl.append(slice(s0, s0 + length))
        dst_sl.append(slice(d0, d0 + length))
    out[(slice(None), *dst_sl)] = arr[(slice(None), *src_sl)]
    new_affine = np.asarray(affine, dtype=np.float64) @ _translate(start)
    return (out[0] if squeeze else out), new_affine


def resize(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Stretch to exactly ``shape`` (voxel size changes, the field of view does not)."""
    import torch
    import torch.nn.functional as F

    arr, squeeze = _channels_first(data)
    size = [int(s) for s in shape]
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    with torch.no_grad():
        if order == 0:
            out = F.interpolate(t, size=size, mode="nearest-exact")
        else:
            out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    out = out[0].numpy().astype(arr.dtype if order == 0 else np.float32)
    factors = np.array(arr.shape[1:], dtype=np.float64) / np.array(size)
    step = np.diag([*factors, 1.0])
    step[:3, 3] = 0.5 * (factors - 1)
    return (out[0] if squeeze else out), np.asarray(affine, dtype=np.float64) @ step


def extract_slices(data: np.ndarray, axis: int = 2, mask: np.ndarray | None = None,
                   min_fraction: float = 0.0, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """2D slices of a volume along ``axis`` (2 = axial in RAS); returns ``(slices, indices)``.

    With ``mask``, keep only slices where at least ``min_fraction`` of the pixels
    are inside it (e.g. skip slices above the head). Slices come out as
    ``(N, [C,] H, W)``.
    """
    arr, squeeze = _channels_first(data)
    n = arr.shape[1 + axis]
    keep = np.arange(0, n, step)
    if mask is not None:
        frac = np.moveaxis(np.asarray(mask, bool), axis, 0).reshape(n, -1).mean(axis=1)
        keep = keep[frac[keep] > min_fraction] if min_fraction > 0 else keep[frac[keep] > 0]
    slices = np.moveaxis(np.take(arr, keep, axis=1 + axis), 1 + axis, 0)
    return (slices[:, 0] if squeeze else slices), keep
