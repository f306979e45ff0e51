"""Why does the model say what it says? Heat maps, and a check that they mean something.

Two ways to draw a heat map over a scan, showing which regions drove a decision:

- **Grad-CAM** (gradient-weighted class activation mapping, Selvaraju et al. 2017):
  take a late convolution layer, whose channels each respond to some pattern at
  each position; weight each channel by how much the class score rises when that
  channel rises (its average gradient); sum, keep the positive part, and stretch
  the coarse map back to the scan's size. One forward and one backward pass.
- **Occlusion sensitivity** (Zeiler and Fergus 2014): cover one patch of the scan
  at a time with a plain value and measure how much the class probability drops.
  Slow (one forward pass per patch position) but asks the model directly, with no
  gradients, so it works for any model.
- A model that draws a lesion map (the ``unet_classifier``) explains itself:
  :func:`lesion_map` returns that map.

A heat map is not proof of anything. :func:`heat_in_mask` measures how much of
the heat falls inside the true lesion, and :func:`sanity_check` compares that
with the same model after its weights are replaced by random ones (the "model
randomisation test" of Adebayo et al. 2018, *Sanity checks for saliency maps*):
a method whose maps look the same for a trained and a random model is showing the
image, not the model's reasoning.

Command line (a heat map for one subject of a trained 3D run, as NIfTI and PNG)::

    python -m helpers.explain --run runs/NAME --subject sub-003 [--method occlusion|lesion_map] [--out DIR]

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    >>> heat = grad_cam(net, torch.randn(2, 1, 16, 16), class_index=1)
    >>> heat.shape
    (2, 16, 16)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

CONV_TYPES = (nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- layers


def find_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """The layer whose activations Grad-CAM weighs.

    Args:
        model: the classifier.
        layer: a module of ``model``, its dotted name (``"features.3.0"``), or None
            for the default: the last convolution block (convolution, normalisation,
            ReLU, as in :class:`helpers.models.ConvBlock`) or, failing that, the last
            convolution layer. The last one sees the largest context at the
            coarsest resolution, which is the usual choice.

    Raises:
        ValueError: the name is unknown or the model has no convolution layer.
    """
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer not in named:
            raise ValueError(f"model has no layer {layer!r}; some names: {list(named)[-8:]}")
        return named[layer]
    last_block = last_conv = None
    for module in model.modules():
        if isinstance(module, CONV_TYPES):
            last_conv = module
        if isinstance(module, nn.Sequential) and any(isinstance(m, CONV_TYPES) for m in module.children()) \
                and not any(isinstance(m, nn.Sequential) for m in module.children()) \
                and isinstance(list(module.children())[-1], nn.ReLU):
            last_block = module
    chosen = last_block if last_block is not None else last_conv
    if chosen is None:
        raise ValueError(f"{type(model).__name__} has no convolution layer: Grad-CAM needs one "
                         "(use occlusion() for models without convolutions)")
    return chosen


def _as_batch(x: torch.Tensor | np.ndarray, spatial_dims: int | None) -> torch.Tensor:
    """[C, *spatial] or [B, C, *spatial] -> [B, C, *spatial] float tensor."""
    t = torch.as_tensor(x, dtype=torch.float32)
    if spatial_dims is not None and t.ndim == spatial_dims + 1:
        t = t.unsqueeze(0)
    if t.ndim not in (4, 5):
        raise ValueError(f"expected [B, C, H, W] or [B, C, X, Y, Z] input, got shape {tuple(t.shape)}")
    return t


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------- Grad-CAM


def grad_cam(model: nn.Module, x: torch.Tensor | np.ndarray, class_index: int | None = None,
             layer: str | nn.Module | None = None, normalize: bool = False) -> np.ndarray:
    """Grad-CAM heat maps at the input's size, one per image.

    Works for 2D and 3D convolutional classifiers, and for models that run a 2D
    network over the slices of a volume (such as :class:`helpers.models.CNNGRU`,
    recognised by its ``slice_axis``): then each slice gets its own map and the
    maps are stacked back into a volume.

    Args:
        model: a classifier returning one score (logit) per class.
        x: images ``[B, C, *spatial]`` (or one image ``[C, *spatial]``).
        class_index: the class to explain; None explains each image's predicted class.
        layer: see :func:`find_layer`.
        normalize: scale each map to a maximum of 1 (for display; the sums used by
            :func:`heat_in_mask` do not need it).

    Returns:
        ``(B, *spatial)`` non-negative float32 array.
    """
    model_was_training = model.training
    model.eval()
    target = find_layer(model, layer)
    spatial_dims = getattr(model, "dims", None)
    batch = _as_batch(x, spatial_dims).to(_model_device(model))
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        captured["act"] = output

    handle = target.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(batch.requires_grad_(False))
            cls = logits.argmax(dim=1) if class_index is None else torch.full(
                (len(batch),), int(class_index), device=logits.device)
            score = logits.gather(1, cls[:, None]).sum()
            act = captured["act"]
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(model_was_training)
    act, grad = act.detach().float(), grad.detach().float()
    weights = grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)  # one weight per channel
    cam = F.relu((weights * act).sum(dim=1))  # [N, *coarse]
    spatial = tuple(batch.shape[2:])
    if cam.shape[0] != batch.shape[0]:  # a 2D network over slices: N = B x slices
        cam = _slices_to_volume(model, cam, batch.shape[0], spatial)
    else:
        mode = "bilinear" if cam.ndim == 3 else "trilinear"
        cam = F.interpolate(cam[:, None], size=spatial, mode=mode, align_corners=False)[:, 0]
    heat = cam.clamp_min(0).cpu().numpy().astype(np.float32)
    return _normalize(heat) if normalize else heat


def _slices_to_volume(model: nn.Module, cam: torch.Tensor, batch: int,
                      spatial: tuple[int, ...]) -> torch.Tensor:
    """Per-slice 2D maps [B*S, h, w] -> volumes [B, X, Y, Z] for a slice-sequence model."""
    axis = getattr(model, "slice_axis", None)
    if axis is None or len(spatial) != 3:
        raise ValueError("the target layer's batch size differs from the input's, and the model "
                         "has no slice_axis: cannot place its maps back into the image")
    plane = tuple(s for i, s in enumerate(spatial) if i != axis)
    n_slices = spatial[axis]
    maps = F.interpolate(cam[:, None], size=plane, mode="bilinear", align_corners=False)[:, 0]
    maps = maps.reshape(batch, n_slices, *plane)  # [B, S, a, b]
    return maps.movedim(1, axis + 1)


def _normalize(heat: np.ndarray) -> np.ndarray:
    peak = heat.reshape(len(heat), -1).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)
    return heat / peak.reshape((-1,) + (1,) * (heat.ndim - 1))


# --------------------------------------------------------------------------- lesion map


def lesion_map(model: nn.Module, x: torch.Tensor | np.ndarray, class_index: int | None = None,
               normalize: bool = False) -> np.ndarray:
    """The lesion probability per voxel of a model that draws one (the ``unet_classifier``).

    Such a model explains itself: its "lesion" answer is the probability of its
    most suspicious voxel, so its own map is the explanation, at full resolution,
    with no gradients or occlusion needed. ``class_index`` is accepted for the
    same call as the other methods (the map is always the lesion class).

    Raises:
        ValueError: if the model has no ``lesion_map`` (use Grad-CAM or occlusion).
    """
    if not hasattr(model, "lesion_map"):
        raise ValueError(f"{type(model).__name__} draws no lesion map; use grad_cam or occlusion")
    batch = _as_batch(x, getattr(model, "dims", None))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            heat = model.lesion_map(batch.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    return _normalize(heat) if normalize else heat


# --------------------------------------------------------------------------- occlusion


def occlusion(model: nn.Module, x: torch.Tensor | np.ndarray, class_index: int | None = None,
              patch: int = 8, stride: int | None = None, baseline: float | str = "mean",
              batch_size: int = 32) -> np.ndarray:
    """Occlusion sensitivity: how much the class probability drops when a patch is hidden.

    A cube (3D) or square (2D) of ``patch`` voxels slides over the image in steps
    of ``stride``; at each position the patch is replaced by ``baseline`` and the
    model is run again. Each voxel's heat is the mean drop in probability over the
    positions that covered it: positive where hiding the region makes the model
    less sure, negative where hiding it makes the model more sure.

    Args:
        model: a classifier returning one score per class.
        x: images ``[B, C, *spatial]`` or one image ``[C, *spatial]``.
        class_index: the class to explain (None: each image's predicted class).
        patch: patch edge in voxels.
        stride: step between patches (default ``patch // 2``).
        baseline: the fill value, or ``"mean"`` for each channel's own mean over the image.
        batch_size: occluded copies per forward pass.

    Returns:
        ``(B, *spatial)`` float32 array of probability drops.
    """
    model_was_training = model.training
    model.eval()
    device = _model_device(model)
    batch = _as_batch(x, getattr(model, "dims", None))
    spatial = tuple(batch.shape[2:])
    stride = max(1, patch // 2) if stride is None else int(stride)
    starts = [sorted(set(list(range(0, max(s - patch, 0) + 1, stride)) + [max(s - patch, 0)]))
              for s in spatial]
    grid = np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(spatial))
    out = np.zeros((len(batch),) + spatial, np.float32)
    try:
        with torch.no_grad():
            for i, image in enumerate(batch):
                image = image.to(device)
                probs = torch.softmax(model(image[None]).float(), dim=1)[0]
                cls = int(probs.argmax()) if class_index is None else int(class_index)
                fill = (image.mean(dim=tuple(range(1, image.ndim)), keepdim=True)  # per channel
                        if baseline == "mean" else torch.full((1,) * image.ndim, float(baseline), device=device))
                drop = torch.zeros(spatial, device=device)
                hits = torch.zeros(spatial, device=device)
                for first in range(0, len(grid), batch_size):
                    corners = grid[first:first + batch_size]
                    copies = image[None].repeat(len(corners), *([1] * image.ndim))
                    boxes = [tuple(slice(int(c), int(c) + patch) for c in corner) for corner in corners]
                    for j, box in enumerate(boxes):
                        copies[(j, slice(None)) + box] = fill
                    p = torch.softmax(model(copies).float(), dim=1)[:, cls]
                    for j, box in enumerate(boxes):
                        drop[box] += probs[cls] - p[j]
                        hits[box] += 1
                out[i] = (drop / hits.clamp_min(1)).cpu().numpy()
    finally:
        model.train(model_was_training)
    return out


# --------------------------------------------------------------------------- do the maps mean something?


def heat_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the (positive) heat that falls inside a mask, from 0 to 1.

    Compare it with the mask's share of the image (:func:`mask_share`): a map that
    ignored the lesion would put about that share inside it by chance.

    Example:
        >>> heat = np.zeros((4, 4)); heat[0, 0] = 3.0; heat[3, 3] = 1.0
        >>> mask = np.zeros((4, 4), bool); mask[0, 0] = True
        >>> heat_in_mask(heat, mask)
        0.75
    """
    h = np.clip(np.asarray(heat, dtype=float), 0, None)
    m = np.asarray(mask, dtype=bool)
    if h.shape != m.shape:
        raise ValueError(f"heat map shape {h.shape} differs from mask shape {m.shape}")
    total = h.sum()
    return float(h[m].sum() / total) if total > 0 else math.nan


def mask_share(mask: np.ndarray, region: np.ndarray | None = None) -> float:
    """The mask's share of the image (or of ``region``, e.g. the brain): the chance level."""
    m = np.asarray(mask, dtype=bool)
    r = np.ones_like(m) if region is None else np.asarray(region, dtype=bool)
    return float((m & r).sum() / max(r.sum(), 1))


def peak_in_mask(heat: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool:
    """The "pointing game": does the hottest voxel fall in the mask (grown by ``tolerance`` voxels)?"""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if tolerance > 0:
        m = ndimage.binary_dilation(m, iterations=tolerance)
    return bool(m.flat[int(np.argmax(heat))])


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of the model with every weight re-drawn at random (the original is untouched).

    Each layer is re-initialised the way PyTorch initialises a fresh layer
    (``reset_parameters``), so the architecture is the same and only what was
    learnt is gone.
    """
    clone = copy.deepcopy(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in clone.modules():
            if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    return clone.eval()


def sanity_check(model: nn.Module, images: torch.Tensor | np.ndarray,
                 masks: Sequence[np.ndarray] | np.ndarray, method: str = "grad_cam",
                 class_index: int | None = 1, seed: int = 0, **method_kwargs: Any) -> dict[str, Any]:
    """Does the heat land on the lesion, and more so than for a randomised model?

    Args:
        model: the trained classifier.
        images: ``[B, C, *spatial]`` cases that hold a lesion.
        masks: the true lesion masks, ``(B, *spatial)``.
        method: ``"grad_cam"``, ``"occlusion"`` or ``"lesion_map"`` (models that draw one).
        class_index: the class to explain (default 1, "lesion").
        seed: seed for the random weights.
        **method_kwargs: passed to the method (``layer``, ``patch``...).

    Returns:
        dict with per-case arrays ``trained`` and ``random`` (heat share inside
        the lesion), ``chance`` (lesion share of the image), their means, and
        ``rank_correlation``: the mean Spearman correlation between each case's
        trained and random maps (near 1 means the map barely depends on the weights).
    """
    explain = {"grad_cam": grad_cam, "occlusion": occlusion, "lesion_map": lesion_map}.get(method)
    if explain is None:
        raise ValueError(f"method must be 'grad_cam', 'occlusion' or 'lesion_map', not {method!r}")
    masks = np.asarray(masks, dtype=bool)
    random_model = randomized_copy(model, seed)
    heat_t = explain(model, images, class_index=class_index, **method_kwargs)
    heat_r = explain(random_model, images, class_index=class_index, **method_kwargs)
    trained = np.array([heat_in_mask(h, m) for h, m in zip(heat_t, masks, strict=True)])
    random = np.array([heat_in_mask(h, m) for h, m in zip(heat_r, masks, strict=True)])
    chance = np.array([mask_share(m) for m in masks])
    corr = []
    for a, b in zip(heat_t, heat_r, strict=True):
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            corr.append(stats.spearmanr(a.ravel(), b.ravel()).statistic)
    return {
        "method": method, "trained": trained, "random": random, "chance": chance,
        "trained_mean": float(np.nanmean(trained)), "random_mean": float(np.nanmean(random)),
        "chance_mean": float(chance.mean()),
        "rank_correlation": float(np.mean(corr)) if corr else math.nan,
        "heat_trained": heat_t, "heat_random": heat_r,
    }


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.explain --run runs/NAME --subject SUB [--method grad_cam|occlusion|lesion_map] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.explain",
        description="Explain a trained 3D classifier's decision for one subject: writes the heat map and "
                    "the preprocessed scan as NIfTI (same grid) and a three-plane PNG.")
    parser.add_argument("--run", required=True, help="the run folder written by helpers.train")
    parser.add_argument("--subject", required=True, help="a subject of the run's dataset, e.g. sub-003")
    parser.add_argument("--method", default="grad_cam", choices=("grad_cam", "occlusion", "lesion_map"),
                        help="lesion_map: the model's own map (unet_classifier runs only)")
    parser.add_argument("--class-index", type=int, default=None,
                        help="class to explain (default: the predicted class)")
    parser.add_argument("--patch", type=int, default=None, help="occlusion cube edge (default: volume edge / 4)")
    parser.add_argument("--data", default=None, help="dataset (default: the one the run was trained on)")
    parser.add_argument("--out", default=None, help="output folder (default RUN/explain)")
    args = parser.parse_args(argv)

    import nibabel as nib

    from helpers.evaluate import case_data, load_run_data
    from helpers.io import DataError, save_nifti
    from helpers.viewer import SliceViewer

    try:
        data = load_run_data(args.run, args.data)
        if data.prep.input != "volume" or data.checkpoint["task"] != "classify":
            raise ValueError(f"{args.run}: the command line explains 3D classifiers (volume input); "
                             "use grad_cam() in Python for slice models")
        case = case_data(data, args.subject)
    except (DataError, ValueError) as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 1
    x = torch.from_numpy(case["image"])[None]
    if args.method == "grad_cam":
        heat = grad_cam(data.model, x, class_index=args.class_index, normalize=True)[0]
    elif args.method == "lesion_map":
        try:
            heat = lesion_map(data.model, x)[0]
        except ValueError as exc:
            print(f"Problem: {args.run}: {exc}", file=sys.stderr)
            return 1
    else:
        patch = args.patch or max(4, x.shape[-1] // 4)
        heat = occlusion(data.model, x, class_index=args.class_index, patch=patch, stride=max(1, patch // 2))[0]
    out = Path(args.out) if args.out else Path(args.run) / "explain"
    stem = f"{args.subject}_{args.method}"
    affine = case["affine"]
    save_nifti(nib.Nifti1Image(heat.astype(np.float32), affine), out / f"{stem}.nii.gz")
    modalities = list(case["images"])
    save_nifti(nib.Nifti1Image(np.stack([case["images"][m][0] for m in modalities], -1).astype(np.float32),
                               affine), out / f"{args.subject}_preprocessed.nii.gz")
    viewer = SliceViewer(case["images"], heatmap=(heat, affine), labels=case["labels"],
                         label_names=data.table.label_names, title=f"{args.method}: {args.subject}",
                         heatmap_threshold=0.0 if args.method == "occlusion" else 0.2)
    viewer.save(out / f"{stem}.png")
    viewer.close()
    print(f"heat map {out / (stem + '.nii.gz')} (on the preprocessed grid; channels of "
          f"{args.subject}_preprocessed.nii.gz: {', '.join(modalities)}); figure {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
