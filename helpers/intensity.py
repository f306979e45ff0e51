"""Intensity steps of preprocessing: denoising, bias field, windowing, equalisation, normalisation.

Each function takes a NumPy array (a 3D volume, or a 2D slice where said) and
returns a new array; none changes the voxel grid. They are collected with the
geometric steps in :mod:`helpers.preprocess`.

What each method really is (no more, no less):

- ``denoise(..., "gaussian")``: a Gaussian blur (sigma in mm). Removes noise and
  fine detail alike. ``"median"``: a 3x3x3 median filter, keeps edges better.
  ``"anisotropic"``: Perona-Malik diffusion, smooths inside regions and stops at
  edges. None of them is non-local means.
- ``correct_bias_field``: our own N3-like method: the log image is modelled as a
  piecewise-constant tissue image plus a smooth field (a polynomial in x, y, z);
  the two are estimated in turn. Not N4 (which uses B-splines and a sharpened
  histogram), but it removes low-frequency shading.
- ``clahe``: contrast-limited adaptive histogram equalisation, implemented here
  on 2D slices (tile histograms, clipped, interpolated bilinearly).
- ``learn_histogram_landmarks`` / ``histogram_standardise``: the Nyul-Udupa
  method (2000): percentile landmarks learned on training images, then each image
  mapped piecewise-linearly onto them.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(100, 20, (8, 8, 8)).astype(np.float32)
    >>> z = zscore(x)
    >>> abs(round(float(z.mean()), 3)), round(float(z.std()), 3)
    (0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

NYUL_PERCENTILES = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
NYUL_SCALE = (0.0, 100.0)


# --------------------------------------------------------------------------- masks


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that best separates a histogram into two classes."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_mask(data: np.ndarray, fill: bool = True) -> np.ndarray:
    """The head (everything not air): Otsu threshold on a lightly smoothed image, holes filled.

    Works on a 3D volume or a (C, X, Y, Z) stack (the channels are averaged after
    scaling each to its 99th percentile).
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 4:
        data = np.mean([c / max(float(np.percentile(c, 99)), 1e-6) for c in data], axis=0)
    smooth = ndimage.uniform_filter(data, 3)
    mask = smooth > otsu_threshold(smooth[smooth > smooth.min()] if np.any(smooth > smooth.min()) else smooth) * 0.5
    if fill:
        mask = ndimage.binary_fill_holes(mask)
    return mask


# --------------------------------------------------------------------------- normalisation


def zscore(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Subtract the mean and divide by the standard deviation, both measured inside ``mask``."""
    data = np.asarray(data, dtype=np.float32)
    values = data[mask] if mask is not None else data
    if values.size == 0:
        raise ValueError("zscore: the mask selects no voxel")
    std = float(values.std())
    return ((data - float(values.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


def percentile_normalise(data: np.ndarray, low: float = 0.5, high: float = 99.5,
                         mask: np.ndarray | None = None, clip: bool = True) -> np.ndarray:
    """Map the ``low`` percentile to 0 and the ``high`` percentile to 1 (then clip)."""
    data = np.asarray(data, dtype=np.float32)
    values = data[mask] if mask is not None else data
    lo, hi = np.percentile(values, [low, high])
    out = (data - lo) / max(float(hi - lo), 1e-6)
    return np.clip(out, 0, 1).astype(np.float32) if clip else out.astype(np.float32)


def window(data: np.ndarray, level: float, width: float) -> np.ndarray:
    """Intensity windowing: show ``level +- width/2`` as 0..1, clip the rest (like a radiology viewer)."""
    lo = level - width / 2
    return np.clip((np.asarray(data, dtype=np.float32) - lo) / max(width, 1e-6), 0, 1)


def equalise_histogram(data: np.ndarray, mask: np.ndarray | None = None, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation: each value replaced by its rank (0..1) among ``mask`` voxels."""
    data = np.asarray(data, dtype=np.float32)
    values = data[mask] if mask is not None else data.ravel()
    hist, edges = np.histogram(values, bins=bins)
    cdf = np.cumsum(hist).astype(np.float64)
    cdf /= cdf[-1]
    out = np.interp(data.ravel(), edges[1:], cdf).reshape(data.shape).astype(np.float32)
    if mask is not None:
        out[~mask] = 0
    return out


def clahe(image: np.ndarray, tiles: int = 8, clip_limit: float = 0.01, bins: int = 256) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a 2D image (output 0..1).

    The image is cut into ``tiles`` x ``tiles`` regions; each gets its own
    equalisation, with every histogram bin clipped at ``clip_limit`` times the
    tile's pixel count (the excess spread over all bins) so noise is not blown up;
    each pixel then blends the mappings of the four nearest tile centres.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"clahe works on 2D images; got shape {img.shape} (apply it slice by slice)")
    lo, hi = float(img.min()), float(img.max())
    q = np.clip(((img - lo) / max(hi - lo, 1e-12) * (bins - 1)).round().astype(int), 0, bins - 1)
    h, w = q.shape
    ys = np.linspace(0, h, tiles + 1).astype(int)
    xs = np.linspace(0, w, tiles + 1).astype(int)
    maps = np.zeros((tiles, tiles, bins))
    for i in range(tiles):
        for j in range(tiles):
            tile = q[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            hist = np.bincount(tile.ravel(), minlength=bins).astype(np.float64)
            limit = max(clip_limit * tile.size, 1.0)
            excess = np.clip(hist - limit, 0, None).sum()
            hist = np.minimum(hist, limit) + excess / bins
            cdf = np.cumsum(hist)
            maps[i, j] = cdf / max(cdf[-1], 1e-12)
    cy = (ys[:-1] + ys[1:]) / 2 - 0.5
    cx = (xs[:-1] + xs[1:]) / 2 - 0.5
    fy = np.clip(np.interp(np.arange(h), cy, np.arange(tiles)), 0, tiles - 1)
    fx = np.clip(np.interp(np.arange(w), cx, np.arange(tiles)), 0, tiles - 1)
    y0 = np.minimum(np.floor(fy).astype(int), tiles - 2) if tiles > 1 else np.zeros(h, int)
    x0 = np.minimum(np.floor(fx).astype(int), tiles - 2) if tiles > 1 else np.zeros(w, int)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy = (fy - y0)[:, None]
    wx = (fx - x0)[None, :]
    top = (1 - wx) * maps[y0[:, None], x0[None, :], q] + wx * maps[y0[:, None], x1[None, :], q]
    bottom = (1 - wx) * maps[y1[:, None], x0[None, :], q] + wx * maps[y1[:, None], x1[None, :], q]
    return ((1 - wy) * top + wy * bottom).astype(np.float32)


def learn_histogram_landmarks(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None,
                              percentiles: Sequence[float] = NYUL_PERCENTILES,
                              scale: tuple[float, float] = NYUL_SCALE) -> list[float]:
    """Nyul-Udupa training: the average percentile landmarks of the (training!) images.

    Each image's lowest and highest percentile are mapped onto ``scale``; the
    standard landmarks are the mean of every image's mapped percentiles. Learn
    them on the training split only, then apply them to every split.
    """
    masks = masks if masks is not None else [None] * len(images)
    rows = []
    for img, m in zip(images, masks, strict=True):
        values = np.asarray(img)[m] if m is not None else np.asarray(img).ravel()
        p = np.percentile(values, percentiles)
        rows.append(scale[0] + (p - p[0]) / max(p[-1] - p[0], 1e-6) * (scale[1] - scale[0]))
    return np.mean(rows, axis=0).astype(float).tolist()


def histogram_standardise(data: np.ndarray, landmarks: Sequence[float], mask: np.ndarray | None = None,
                          percentiles: Sequence[float] = NYUL_PERCENTILES) -> np.ndarray:
    """Nyul-Udupa mapping: this image's percentiles -> the learned landmarks, piecewise linearly.

    Values beyond the first and last landmark are extended with the end segments' slopes.
    """
    data = np.asarray(data, dtype=np.float32)
    values = data[mask] if mask is not None else data.ravel()
    src = np.maximum.accumulate(np.percentile(values, percentiles))
    src = src + np.arange(len(src)) * 1e-6 * max(1.0, float(np.abs(src).max()))
    dst = np.asarray(landmarks, dtype=np.float64)
    out = np.interp(data, src, dst)
    lo, hi = data < src[0], data > src[-1]
    slope_lo = (dst[1] - dst[0]) / (src[1] - src[0])
    slope_hi = (dst[-1] - dst[-2]) / (src[-1] - src[-2])
    out[lo] = dst[0] + (data[lo] - src[0]) * slope_lo
    out[hi] = dst[-1] + (data[hi] - src[-1]) * slope_hi
    return out.astype(np.float32)


# --------------------------------------------------------------------------- cleaning


def denoise(data: np.ndarray, method: str = "gaussian", sigma_mm: float = 1.0,
            spacing: Sequence[float] = (1.0, 1.0, 1.0), iterations: int = 5, kappa: float = 0.1) -> np.ndarray:
    """Reduce noise: ``gaussian`` (blur, sigma in mm), ``median`` (3 voxels) or ``anisotropic``.

    ``anisotropic`` is Perona-Malik diffusion: ``iterations`` small smoothing
    steps whose strength falls where the local gradient is larger than ``kappa``
    times the image's intensity range, so edges survive.
    """
    data = np.asarray(data, dtype=np.float32)
    if method == "gaussian":
        sig = [sigma_mm / float(s) for s in spacing][: data.ndim]
        return ndimage.gaussian_filter(data, sig).astype(np.float32)
    if method == "median":
        return ndimage.median_filter(data, size=3).astype(np.float32)
    if method == "anisotropic":
        out = data.copy()
        k = kappa * max(float(np.percentile(out, 99) - np.percentile(out, 1)), 1e-6)
        step = 1.0 / (2 * out.ndim + 1)
        for _ in range(iterations):
            total = np.zeros_like(out)
            for ax in range(out.ndim):
                fwd = np.diff(out, axis=ax, append=np.take(out, [-1], axis=ax))
                bwd = -np.diff(out, axis=ax, prepend=np.take(out, [0], axis=ax))
                total += fwd * np.exp(-(fwd / k) ** 2) + bwd * np.exp(-(bwd / k) ** 2)
            out += step * total
        return out
    raise ValueError(f"Unknown denoising method {method!r}: gaussian, median or anisotropic")


def _poly_basis(coords: np.ndarray, degree: int) -> np.ndarray:
    """Monomials x^a y^b z^c with a+b+c <= degree, for coords (N, 3) in [-1, 1]."""
    x, y, z = coords.T
    cols = [x**a * y**b * z**c for a in range(degree + 1) for b in range(degree + 1 - a)
            for c in range(degree + 1 - a - b)]
    return np.stack(cols, axis=1)


def estimate_bias_field(data: np.ndarray, mask: np.ndarray | None = None, degree: int = 3,
                        classes: int = 4, iterations: int = 4, max_samples: int = 200_000,
                        edge_percentile: float = 60.0, seed: int = 0) -> np.ndarray:
    """Estimate a smooth multiplicative bias field (mean 1 inside ``mask``).

    Model: ``log(image) = log(tissue) + log(field)``, where ``tissue`` takes one
    of ``classes`` values and ``log(field)`` is a polynomial of ``degree`` in
    x, y, z. Alternately: classify voxels by their corrected intensity
    (k-means), then fit the polynomial to what the classes do not explain.
    Voxels on tissue edges (the top ``100 - edge_percentile`` % of the log-image
    gradient) are left out: they mix two tissues and would bias the fit.
    """
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = foreground_mask(data)
    mask = mask & (data > 0)
    # voxels on tissue boundaries mix two tissues (partial volume): leave them out of the fit
    logimg = np.log(np.where(mask, data, 1.0))
    grad = ndimage.gaussian_gradient_magnitude(logimg, 1.0)
    flat = mask & (grad <= np.percentile(grad[mask], edge_percentile))
    idx = np.argwhere(flat if flat.sum() >= 50 else mask)
    if len(idx) < 50:
        raise ValueError("estimate_bias_field: fewer than 50 voxels inside the mask")
    rng = np.random.default_rng(seed)
    if len(idx) > max_samples:
        idx = idx[rng.choice(len(idx), max_samples, replace=False)]
    shape = np.array(data.shape, dtype=np.float64)
    norm = lambda i: 2 * (i + 0.5) / shape - 1  # noqa: E731 (voxel index -> [-1, 1])
    basis = _poly_basis(norm(idx.astype(np.float64)), degree)
    logv = np.log(data[tuple(idx.T)].astype(np.float64))
    coef = np.zeros(basis.shape[1])
    for _ in range(iterations):
        corrected = logv - basis @ coef
        centres = np.percentile(corrected, np.linspace(15, 85, classes))
        for _ in range(10):  # 1D k-means
            label = np.argmin(np.abs(corrected[:, None] - centres[None]), axis=1)
            centres = np.array([corrected[label == k].mean() if np.any(label == k) else centres[k]
                                for k in range(classes)])
        residual = logv - centres[label]
        coef, *_ = np.linalg.lstsq(basis, residual, rcond=None)
    axes = [(2 * (np.arange(n) + 0.5) / n - 1).astype(np.float32) for n in data.shape]
    terms = [(a, b, c) for a in range(degree + 1) for b in range(degree + 1 - a)
             for c in range(degree + 1 - a - b)]
    log_field = np.zeros(data.shape, dtype=np.float32)
    for k, (a, b, c) in enumerate(terms):  # same order as _poly_basis
        log_field += np.float32(coef[k]) * (axes[0][:, None, None] ** a * axes[1][None, :, None] ** b
                                            * axes[2][None, None, :] ** c)
    log_field -= log_field[mask].mean()
    return np.exp(log_field).astype(np.float32)


def correct_bias_field(data: np.ndarray, mask: np.ndarray | None = None, degree: int = 3,
                       **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Divide the image by its estimated bias field; return ``(corrected, field)``."""
    field = estimate_bias_field(data, mask, degree=degree, **kwargs)
    return (np.asarray(data, dtype=np.float32) / field).astype(np.float32), field
