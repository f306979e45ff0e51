"""Data augmentation on batched tensors, on whatever device they live on.

Augmentation shows a model slightly different versions of each training scan
(turned, stretched, darker, noisier...) so that it learns what matters rather
than memorising the training images. Every transform here works on a batch
``(B, C, X, Y, Z)`` (3D) or ``(B, C, H, W)`` (2D) with PyTorch operations only,
so the same code runs on the CPU today and on a GPU later, unchanged.

- **spatial**, applied identically to image and mask (the mask with
  nearest-neighbour sampling, so labels stay labels): random flips, a small
  affine (rotation, scaling, translation) and an elastic deformation (a smooth
  random displacement field), all folded into one sampling grid and one
  ``grid_sample`` call;
- **intensity**, image only: a smooth multiplicative bias field, Gaussian noise,
  gamma (a curve that brightens or darkens mid-tones) and contrast.

Random numbers come from a ``torch.Generator`` on the CPU and are then moved to
the tensors' device, so a seed gives the same augmentation on any device.

Example:
    >>> import torch
    >>> x = torch.randn(2, 1, 16, 16, 16)
    >>> y = (x > 0).long()
    >>> xa, ya = augment(x, y, AugmentConfig(), generator=torch.Generator().manual_seed(0))
    >>> xa.shape, ya.dtype, set(ya.unique().tolist()) <= {0, 1}
    (torch.Size([2, 1, 16, 16, 16]), torch.int64, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Which augmentations to apply, how often (``*_p``: probability per sample) and how strongly.

    Attributes:
        flip_axes: spatial axes that may be flipped (0 = left-right in RAS, the
            natural one for brains, which are roughly symmetric).
        flip_p: probability of each flip.
        affine_p: probability of the affine.
        rotate_deg: maximum rotation about each axis, in degrees.
        scale: maximum relative zoom (0.1 = 90% to 110%).
        translate: maximum shift as a fraction of the image size.
        elastic_p: probability of the elastic deformation.
        elastic_control_points: control points per axis of the random displacement grid.
        elastic_magnitude: standard deviation of the displacements, as a fraction of the image size.
        bias_p, bias_strength: probability and strength (log-scale std) of a smooth bias field.
        noise_p, noise_std: probability and std of Gaussian noise, relative to the image's std.
        gamma_p, gamma_range: probability and range of the gamma exponent.
        contrast_p, contrast_range: probability and range of the contrast factor.
    """

    flip_axes: tuple[int, ...] = (0,)
    flip_p: float = 0.5
    affine_p: float = 0.75
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    elastic_p: float = 0.25
    elastic_control_points: int = 5
    elastic_magnitude: float = 0.015
    bias_p: float = 0.3
    bias_strength: float = 0.3
    noise_p: float = 0.3
    noise_std: float = 0.05
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_p: float = 0.3
    contrast_range: tuple[float, float] = (0.75, 1.25)

    def to_dict(self) -> dict[str, Any]:
        """Settings as a JSON-ready dict (for the run folder)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def none(cls) -> AugmentConfig:
        """A config that changes nothing (every probability 0)."""
        return cls(flip_p=0, affine_p=0, elastic_p=0, bias_p=0, noise_p=0, gamma_p=0, contrast_p=0)


def _rand(gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen)


def _randn(gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _rotation(angles: torch.Tensor, nd: int) -> torch.Tensor:
    """(B, nd, nd) rotation matrices from angles (B, 1) in 2D or (B, 3) in 3D (radians)."""
    c, s = torch.cos(angles), torch.sin(angles)
    b = angles.shape[0]
    if nd == 2:
        return torch.stack([torch.stack([c[:, 0], -s[:, 0]], -1), torch.stack([s[:, 0], c[:, 0]], -1)], 1)
    eye = torch.eye(3).expand(b, 3, 3)
    out = eye.clone()
    for ax in range(3):
        i, j = [k for k in range(3) if k != ax]
        r = eye.clone()
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c[:, ax], -s[:, ax], s[:, ax], c[:, ax]
        out = r @ out
    return out


def spatial_grid(shape: tuple[int, ...], config: AugmentConfig, batch: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a random sampling grid per sample; returns ``(grid, changed)`` on the CPU.

    ``grid`` has shape ``(B, *shape, nd)`` in grid_sample's (x, y, z) order;
    ``changed`` flags the samples whose grid is not the identity.
    """
    nd = len(shape)
    g = generator
    size = torch.tensor(shape, dtype=torch.float32)
    # matrix in our axis order (X, Y, Z), acting on coordinates scaled by the size (isotropic space)
    mat = torch.eye(nd).repeat(batch, 1, 1)
    shift = torch.zeros(batch, nd)
    changed = torch.zeros(batch, dtype=torch.bool)
    flips = torch.ones(batch, nd)
    for ax in config.flip_axes:
        if ax < nd:
            hit = _rand(g, batch) < config.flip_p
            flips[hit, ax] = -1
            changed |= hit
    do_aff = _rand(g, batch) < config.affine_p
    n_ang = 1 if nd == 2 else 3
    angles = (_rand(g, batch, n_ang) * 2 - 1) * math.radians(config.rotate_deg)
    zoom = 1 + (_rand(g, batch, 1) * 2 - 1) * config.scale
    trans = (_rand(g, batch, nd) * 2 - 1) * config.translate * 2  # normalised coords span 2
    rot = _rotation(angles, nd) / zoom[:, :, None]
    mat = torch.where(do_aff[:, None, None], rot, mat)
    shift = torch.where(do_aff[:, None], trans, shift)
    changed |= do_aff
    mat = mat * flips[:, None, :]
    # back to normalised coordinates: A = S^-1 M S with S = diag(size)
    a = mat * size[None, None, :] / size[None, :, None]
    perm = list(range(nd))[::-1]  # grid_sample wants (x, y, z) = our (Z, Y, X)
    theta = torch.cat([a[:, perm][:, :, perm], shift[:, perm, None]], dim=2)
    grid = F.affine_grid(theta, [batch, 1, *shape], align_corners=False)
    do_el = _rand(g, batch) < config.elastic_p
    if do_el.any() and config.elastic_magnitude > 0:
        k = config.elastic_control_points
        coarse = _randn(g, batch, nd, *([k] * nd)) * config.elastic_magnitude * 2
        coarse = coarse * do_el.view(batch, *([1] * (nd + 1)))
        mode = "trilinear" if nd == 3 else "bilinear"
        field = F.interpolate(coarse, size=list(shape), mode=mode, align_corners=True)
        grid = grid + field.movedim(1, -1)[..., perm]
        changed |= do_el
    return grid, changed


def _per_sample(x: torch.Tensor, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """A (B, 1, 1, ...) 0/1 tensor: which samples get a transform."""
    hit = (_rand(gen, x.shape[0]) < p).to(x.device, x.dtype)
    return hit.view(-1, *([1] * (x.dim() - 1)))


def intensity(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random bias field, noise, gamma and contrast on an image batch (never on masks)."""
    g = generator
    b, c, *spatial = x.shape
    nd = len(spatial)
    view = (b, c, *([1] * nd))
    lo = x.flatten(2).amin(-1).view(view)
    hi = x.flatten(2).amax(-1).view(view)
    span = (hi - lo).clamp_min(1e-6)
    if config.bias_p > 0:
        hit = _per_sample(x, config.bias_p, g)
        coarse = (_randn(g, b, 1, *([3] * nd)) * config.bias_strength).to(x.device, x.dtype)
        mode = "trilinear" if nd == 3 else "bilinear"
        field = torch.exp(F.interpolate(coarse, size=spatial, mode=mode, align_corners=True) * hit)
        x = lo + (x - lo) * field
    if config.gamma_p > 0:
        hit = _per_sample(x, config.gamma_p, g)
        lo_g, hi_g = math.log(config.gamma_range[0]), math.log(config.gamma_range[1])
        gamma = torch.exp(lo_g + _rand(g, b) * (hi_g - lo_g)).to(x.device, x.dtype).view(-1, *([1] * (nd + 1)))
        gamma = torch.where(hit > 0, gamma, torch.ones_like(gamma))
        x = lo + span * ((x - lo) / span).clamp(0, 1) ** gamma
    if config.contrast_p > 0:
        hit = _per_sample(x, config.contrast_p, g)
        factor = config.contrast_range[0] + _rand(g, b) * (config.contrast_range[1] - config.contrast_range[0])
        factor = factor.to(x.device, x.dtype).view(-1, *([1] * (nd + 1)))
        factor = torch.where(hit > 0, factor, torch.ones_like(factor))
        mean = x.flatten(2).mean(-1).view(view)
        x = mean + (x - mean) * factor
    if config.noise_p > 0:
        hit = _per_sample(x, config.noise_p, g)
        std = x.flatten(2).std(-1).view(view)
        noise = _randn(g, *x.shape).to(x.device, x.dtype)
        x = x + hit * noise * std * config.noise_std
    return x


def augment(image: torch.Tensor, mask: torch.Tensor | None = None, config: AugmentConfig | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch: spatial transforms on image and mask together, then intensity on the image.

    Args:
        image: float ``(B, C, X, Y, Z)`` or ``(B, C, H, W)``, on any device.
        mask: optional label map ``(B, 1, ...)`` or ``(B, ...)`` (any dtype), same device.
        config: the :class:`AugmentConfig` (default settings if None).
        generator: a CPU ``torch.Generator`` for repeatable draws.

    Returns:
        ``(image, mask)`` on the input device; the mask keeps its dtype and values.
    """
    config = config or AugmentConfig()
    if image.dim() not in (4, 5):
        raise ValueError(f"augment expects (B, C, H, W) or (B, C, X, Y, Z), got shape {tuple(image.shape)}")
    spatial = tuple(image.shape[2:])
    squeeze_mask = mask is not None and mask.dim() == image.dim() - 1
    m = mask.unsqueeze(1) if squeeze_mask else mask
    grid, changed = spatial_grid(spatial, config, image.shape[0], generator)
    if changed.any():
        grid = grid.to(image.device, image.dtype if image.is_floating_point() else torch.float32)
        sel = changed.to(image.device).view(-1, *([1] * (image.dim() - 1)))
        warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        image = torch.where(sel, warped, image)
        if m is not None:
            mw = F.grid_sample(m.to(grid.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
            m = torch.where(sel, mw.round().to(m.dtype), m)
    image = intensity(image, config, generator)
    if m is not None and squeeze_mask:
        m = m.squeeze(1)
    return image, m


def random_patches(image: torch.Tensor, mask: torch.Tensor, size: int | Sequence[int],
                   foreground_p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """One random patch per sample, cut from the image and its mask alike.

    Training a fully convolutional network (a U-Net) on patches instead of whole
    volumes makes each step several times cheaper, so a time-capped run sees many
    more examples. Lesions are a tiny share of the voxels, so with probability
    ``foreground_p`` a sample's patch is centred on one of its lesion voxels,
    chosen at random (when it has any); otherwise the patch is placed uniformly at
    random. The network still predicts whole volumes afterwards.

    Args:
        image: ``[B, C, *spatial]``.
        mask: ``[B, *spatial]`` (a label per voxel; 0 = background).
        size: patch edge (or one per axis); axes smaller than it are kept whole.
        foreground_p: chance of centring a patch on a lesion.

    Returns:
        ``(image_patches [B, C, *size], mask_patches [B, *size])``, on the input's device.
        Random numbers come from torch's global generator, so a seeded run repeats.

    Example:
        >>> x, m = torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 16, 16, 16, dtype=torch.long)
        >>> [tuple(t.shape) for t in random_patches(x, m, 8)]
        [(2, 1, 8, 8, 8), (2, 8, 8, 8)]
    """
    spatial = tuple(image.shape[2:])
    sizes = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
    if len(sizes) != len(spatial) or mask.shape[1:] != image.shape[2:]:
        raise ValueError(f"random_patches: image {tuple(image.shape)}, mask {tuple(mask.shape)}, size {size}")
    sizes = tuple(min(s, p) for s, p in zip(spatial, sizes, strict=True))
    xs, ms = [], []
    for b in range(len(image)):
        lesion = mask[b].nonzero() if float(torch.rand(())) < foreground_p else None
        if lesion is not None and len(lesion):
            centre = lesion[int(torch.randint(len(lesion), ()))].tolist()
            starts = [min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, sizes, spatial, strict=True)]
        else:
            starts = [int(torch.randint(s - p + 1, ())) for p, s in zip(sizes, spatial, strict=True)]
        window = tuple(slice(a, a + p) for a, p in zip(starts, sizes, strict=True))
        xs.append(image[(b, slice(None), *window)])
        ms.append(mask[(b, *window)])
    return torch.stack(xs), torch.stack(ms)
