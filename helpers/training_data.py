"""From a dataset on disk to the tensors the training engine needs, for each task.

:func:`prepare` reads any source ``helpers.datasets.load_dataset`` accepts (the
simulated BIDS cohort, BIDS, Decathlon, BraTS, a CSV manifest, folders of PNG/JPG
images), preprocesses every case with one :class:`helpers.preprocess.PreprocessConfig`
and returns a :class:`Prepared`: ``train``, ``val`` and ``test``
:class:`helpers.train.TensorData`, the class names and the preprocessing record
that the checkpoint keeps.

Inputs (``input=``):

- ``"volume"``: one 3D volume per case, resized to ``volume_size`` per axis.
- ``"slices"``: 2D axial slices of each volume (``slice_size`` pixels square,
  ``n_slices`` per case spread over the head). A slice's label comes from the
  lesion mask where there is one: "lesion" if the slice shows at least
  ``min_lesion_pixels`` lesion pixels, else "healthy" (for the multi-class task:
  the subject's diagnosis if the slice shows its lesion, else "healthy"). Without
  masks every slice carries its subject's label.
- ``"image"``: 2D image collections (PNG/JPG folders), resized to ``slice_size``.

Labels (``labels=``, classification): ``"diagnosis"`` keeps every class of the
dataset; ``"binary"`` merges them into healthy versus lesion (the healthy class is
found by name: healthy, normal, no_tumor...). Segmentation targets are the lesion
masks, any lesion label versus background.

Example:
    >>> prep = prepare("data/simulated/n24_2mm_seed42", task="classify", profile="smoke")  # doctest: +SKIP
    >>> prep.train.x.shape, prep.classes                                                     # doctest: +SKIP
    (torch.Size([16, 3, 32, 32, 32]), ['healthy', 'lesion'])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.datasets import CaseTable, load_dataset
from helpers.preprocess import PreprocessConfig, load_case
from helpers.runtime import Profile, get_profile
from helpers.train import TensorData

HEALTHY_NAMES = ("healthy", "normal", "control", "no_tumor", "notumor", "no_tumour", "no tumor", "no")
"""Class names taken to mean "no lesion" when labels are merged into healthy versus lesion."""
INPUTS = ("volume", "slices", "image")
LABEL_MODES = ("diagnosis", "binary")


@dataclass
class Prepared:
    """Everything a training run needs from the data.

    Attributes:
        train, val, test: the three splits as tensors (CPU).
        classes: class names in label order (``["background", "lesion"]`` for segmentation).
        task: ``classify`` or ``segment``.
        input: ``volume``, ``slices`` or ``image``.
        dims: 2 or 3 (what the model sees).
        modalities: channel names.
        preprocess: the record saved with the checkpoint (pipeline config and how
            inputs were made) so deployment re-applies exactly the same steps.
        info: the source, its kind and the split sizes, for people and config.json.
        subjects: per split, the subject of each sample (slices: one per slice).
        brains: per split, the head masks of volumes (found by
            ``helpers.intensity.foreground_mask``), for handcrafted features.
    """

    train: TensorData
    val: TensorData
    test: TensorData
    classes: list[str]
    task: str
    input: str
    dims: int
    modalities: list[str]
    preprocess: dict[str, Any]
    info: dict[str, Any]
    subjects: dict[str, list[str]] = field(default_factory=dict)
    brains: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        """One line per split: samples and samples per class."""
        lines = []
        for name in ("train", "val", "test"):
            data = getattr(self, name)
            if self.task == "classify":
                counts = torch.bincount(data.y, minlength=self.num_classes).tolist()
                per = ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts, strict=True))
            else:
                per = f"{int((data.y.reshape(len(data), -1) > 0).any(1).sum())} with a lesion"
            lines.append(f"{name}: {len(data)} samples ({per}), tensor {tuple(data.x.shape)}")
        return "\n".join(lines)


def healthy_class(classes: Sequence[str]) -> str:
    """The class name meaning "no lesion" (raises ValueError naming the classes if none)."""
    for c in classes:
        if c.strip().lower().replace("-", "_") in HEALTHY_NAMES:
            return c
    raise ValueError(
        f"Cannot merge classes {list(classes)} into healthy versus lesion: none is named like "
        f"{', '.join(HEALTHY_NAMES[:5])}. Use labels='diagnosis'."
    )


def preprocess_config(profile: Profile, input: str = "volume", n_slices: int = 16) -> PreprocessConfig:
    """The pipeline for a profile: RAS, the profile's spacing, crop to the head, z-score, fixed shape.

    Volumes are resized (stretched) to ``volume_size`` per axis; slices to
    ``slice_size`` in-plane with ``n_slices`` axial positions; 2D image files to
    ``slice_size`` squared.
    """
    if input == "volume":
        shape = (profile.volume_size,) * 3
    elif input == "image":  # 2D files: load_case resizes them to the last two sizes
        shape = (1, profile.slice_size, profile.slice_size)
    else:
        shape = (profile.slice_size, profile.slice_size, n_slices)
    return PreprocessConfig(orientation="RAS", spacing=profile.spacing_mm, crop=True, normalise="zscore",
                            shape=shape, shape_mode="resize")


def _case_arrays(table: CaseTable, rows, config: PreprocessConfig, cache):
    """Preprocess the rows (or read them from the tensor cache): images, masks, head masks."""
    from helpers.intensity import foreground_mask

    images, masks, heads = [], [], []
    for _, row in rows.iterrows():
        if cache is not None:
            item = cache.get(table, row)
            image, mask = item["image"], item["mask"]
        else:
            out = load_case(table, row, config)
            image = torch.from_numpy(out.image)
            mask = torch.from_numpy(np.asarray(out.mask, dtype=np.int64)) if out.mask is not None else None
        images.append(image)
        masks.append(mask)
        heads.append(torch.from_numpy(foreground_mask(image.numpy())) if image.ndim == 4 else None)
    return images, masks, heads


def _class_index(table: CaseTable, labels: str) -> tuple[list[str], dict[str, int]]:
    classes = list(table.classes)
    if not classes:
        raise ValueError(f"{table.source}: the dataset has no class labels; use task='segment' or a labelled source")
    if labels == "binary":
        healthy = healthy_class(classes)
        return ["healthy", "lesion"], {c: (0 if c == healthy else 1) for c in classes}
    return classes, {c: i for i, c in enumerate(classes)}


def prepare(source: str | os.PathLike | CaseTable, task: str = "classify", profile: str | Profile = "auto",
            input: str | None = None, labels: str = "binary", n_slices: int = 16,
            min_lesion_pixels: int = 5, cache: bool = True, seed: int | None = None,
            verbose: bool = True, modalities: Sequence[str] | None = None) -> Prepared:
    """Load, preprocess and tensorise a dataset for one task.

    Args:
        source: anything :func:`helpers.datasets.load_dataset` accepts, or a CaseTable.
        task: ``classify`` or ``segment``.
        profile: run profile (sizes) or its name.
        input: ``volume``, ``slices`` or ``image`` (None: ``image`` for 2D data, else ``volume``).
        labels: ``binary`` (healthy versus lesion) or ``diagnosis`` (all classes).
        n_slices: axial positions per volume for ``slices``.
        min_lesion_pixels: lesion pixels a slice needs to count as showing the lesion.
        cache: keep preprocessed cases in :class:`helpers.cache.TensorCache`
            (``data/cache/tensors/``, keyed by the pipeline settings and the source
            files) so the next run reads them in a moment.
        seed: split seed (None: the profile's).
        verbose: print what was prepared.
        modalities: the contrasts to use as channels, in this order (None: all of
            the dataset's). Saved in the preprocessing record, so deployment asks
            for the same ones.
    """
    profile = get_profile(profile)
    if task not in ("classify", "segment"):
        raise ValueError(f"task must be 'classify' or 'segment', got {task!r}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    table = source if isinstance(source, CaseTable) else load_dataset(source, seed=profile.seed if seed is None else seed)
    if modalities is not None:
        missing = [m for m in modalities if m not in table.modalities]
        if missing or not modalities:
            raise ValueError(f"{table.source}: modalities {list(modalities)} not all found; "
                             f"the dataset has {table.modalities}")
        table = replace(table, modalities=list(modalities))
    input = input or ("image" if table.dims == 2 else "volume")
    if input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
    if (input == "image") != (table.dims == 2):
        raise ValueError(f"input={input!r} does not fit {table.dims}D data from {table.source}")
    if task == "segment" and not table.df["mask"].astype(str).str.len().gt(0).any():
        raise ValueError(f"{table.source}: no lesion masks found, so there is nothing to segment")
    config = preprocess_config(profile, input, n_slices)
    tensor_cache = None
    if cache:
        from helpers.cache import TensorCache

        tensor_cache = TensorCache(config, verbose=verbose)
    healthy_index = 0
    if task == "classify":
        classes, index = _class_index(table, labels)
        try:
            healthy_index = classes.index(healthy_class(classes))
        except ValueError:
            healthy_index = -1  # no healthy class: slice labels and lesion masks do not apply
        if input == "slices" and healthy_index < 0:
            raise ValueError(f"{table.source}: slices are labelled healthy or not from lesion masks, but no "
                             f"class of {classes} is named like a healthy one")
    else:
        classes, index = ["background", "lesion"], {}
    splits: dict[str, TensorData] = {}
    keep_masks = task == "classify" and _masks_cover_lesions(table, index, healthy_index)
    subjects: dict[str, list[str]] = {}
    brains: dict[str, torch.Tensor] = {}
    for split in ("train", "val", "test"):
        rows = table.split(split)
        if rows.empty:
            raise ValueError(f"{table.source}: the {split} split is empty; the dataset is too small to train on")
        images, masks, brain = _case_arrays(table, rows, config, tensor_cache)
        cases, subs = rows["case"].astype(str).tolist(), rows["subject"].astype(str).tolist()
        lesion_masks = None
        if input == "slices":
            x, y, ids, sub, lesion_masks = _slices(images, masks, brain, rows, task, index, healthy_index,
                                                   min_lesion_pixels, keep_masks)
        else:
            x = torch.stack(images)
            if task == "segment":
                y = torch.stack([(m > 0).long() if m is not None else torch.zeros(x.shape[2:], dtype=torch.long)
                                 for m in masks])
            else:
                y = torch.tensor([index[str(v)] for v in rows["label"]], dtype=torch.long)
                if keep_masks:
                    lesion_masks = torch.stack([_lesion_mask(m, x.shape[2:]) for m in masks])
            ids, sub = cases, subs
            if brain[0] is not None:
                brains[split] = torch.stack(brain)
        splits[split] = TensorData(x, y, ids, lesion_masks)
        subjects[split] = sub
    record = {"pipeline": config.to_dict(), "input": input, "modalities": list(table.modalities),
              "labels": labels if task == "classify" else "lesion", "n_slices": n_slices if input == "slices" else None,
              "slice_axis": 2 if input == "slices" else None, "min_lesion_pixels": min_lesion_pixels,
              "dims": 2 if input in ("slices", "image") else 3}
    info = {"source": str(table.source), "kind": table.kind, "profile": profile.name,
            "samples": {k: len(v) for k, v in splits.items()},
            "subjects": {k: len(set(v)) for k, v in subjects.items()}, "dataset_classes": list(table.classes),
            "lesion_masks": task == "segment" or keep_masks}
    prep = Prepared(splits["train"], splits["val"], splits["test"], classes, task, input, record["dims"],
                    list(table.modalities), record, info, subjects, brains)
    if verbose:
        print(f"{table.kind} data from {table.source}: {input} input, task {task}, classes {classes}")
        print(prep.summary())
    return prep


def _slices(images, masks, brains, rows, task, index, healthy_index, min_lesion_pixels, keep_masks=False):
    """Axial slices with brain in them; labels from the lesion mask where there is one.

    ``keep_masks``: also return each slice's lesion mask (uint8), else None.
    """
    xs, ys, ids, subs, slice_masks = [], [], [], [], []
    for image, mask, brain, (_, row) in zip(images, masks, brains, rows.iterrows(), strict=True):
        z_keep = range(image.shape[-1])
        if brain is not None:
            frac = brain.reshape(-1, brain.shape[-1]).float().mean(0)
            z_keep = [z for z in z_keep if frac[z] > 0.05]
        for z in z_keep:
            xs.append(image[..., z])
            lesion_pixels = int((mask[..., z] > 0).sum()) if mask is not None else None
            if task == "segment":
                ys.append((mask[..., z] > 0).long() if mask is not None else torch.zeros(image.shape[1:3], dtype=torch.long))
            else:
                subject_class = index[str(row["label"])]
                if lesion_pixels is None:
                    ys.append(subject_class)
                else:
                    ys.append(subject_class if lesion_pixels >= min_lesion_pixels else healthy_index)
            ids.append(f"{row['case']}:z{z}")
            subs.append(str(row["subject"]))
            if keep_masks:
                slice_masks.append(_lesion_mask(mask[..., z] if mask is not None else None, image.shape[1:3]))
    x = torch.stack(xs)
    y = torch.stack(ys) if task == "segment" else torch.tensor(ys, dtype=torch.long)
    return x, y, ids, subs, torch.stack(slice_masks) if keep_masks else None


def _masks_cover_lesions(table: CaseTable, index: dict[str, int], healthy_index: int) -> bool:
    """Whether every lesion case has a mask file (healthy cases may lack one).

    Only then are masks kept for classification (for models that learn from them):
    a lesion case without a mask would get an empty one, teaching "no lesion here"
    where there is one.
    """
    if healthy_index < 0:
        return False
    df = table.df
    has_mask = df["mask"].astype(str).str.len().gt(0)
    healthy = df["label"].astype(str).map(index).eq(healthy_index)
    return bool((has_mask | healthy).all())


def _lesion_mask(mask: torch.Tensor | None, shape) -> torch.Tensor:
    """Any lesion label -> 1, as uint8; an empty mask where there is no mask file (a healthy case)."""
    return (mask > 0).to(torch.uint8) if mask is not None else torch.zeros(tuple(shape), dtype=torch.uint8)


AUGMENT_LEVELS = ("none", "flip", "light", "full")


def default_augment(task: str, model: str | None = None) -> str:
    """The augmentation level measured to work on the simulated cohort, for a task and model.

    ``flip`` for segmentation and for models that learn from lesion masks (the
    ``unet_classifier``); ``light`` for other classifiers (RESULTS.md has the runs).
    """
    from helpers.models import needs_masks

    return "flip" if task == "segment" or (model is not None and needs_masks(model)) else "light"


def make_augment(task: str, level: str = "light"):
    """A batch augmentation for the training engine, built on :mod:`helpers.augment`.

    Levels: ``none``; ``flip`` (left-right mirror only, nearly free);
    ``light`` (mirror plus intensity changes: bias field, noise, gamma, contrast;
    no resampling, so cheap on a CPU); ``full`` (also small rotations, zooms,
    shifts and elastic warps, one ``grid_sample`` per batch: best on a GPU).
    Masks (a label per voxel: segmentation targets, or the lesion masks a
    :class:`helpers.models.LesionMapClassifier` learns from) move with the image;
    class labels are left alone. ``task`` only names the use.
    """
    from helpers.augment import AugmentConfig, augment

    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augmentation level must be one of {AUGMENT_LEVELS}, got {level!r}")
    if level == "none":
        return None
    if level == "flip":
        return flip_left_right
    config = AugmentConfig() if level == "full" else AugmentConfig(affine_p=0.0, elastic_p=0.0)

    def apply(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y.ndim == x.ndim - 1:  # a label per voxel (a mask): it moves with the image
            xa, ya = augment(x, y, config)
            return xa, ya
        xa, _ = augment(x, None, config)
        return xa, y

    apply.settings = {"level": level, **config.to_dict()}
    return apply


def flip_left_right(x: torch.Tensor, y: torch.Tensor, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a random half of a batch left-right (axis X in RAS), masks too; on the batch's device.

    Brains are nearly symmetric and lesions occur on both sides, so a mirrored
    scan is a plausible new scan: the simplest augmentation there is.
    """
    flip = torch.rand(len(x), device=x.device) < p
    view = (-1,) + (1,) * (x.ndim - 1)
    x = torch.where(flip.view(view), torch.flip(x, dims=[2]), x)
    if y.ndim == x.ndim - 1:  # a mask per voxel: flip it the same way
        y = torch.where(flip.view((-1,) + (1,) * (y.ndim - 1)), torch.flip(y, dims=[1]), y)
    return x, y


def subject_scores(probs: torch.Tensor, subjects: Sequence[str], reduce: str = "max") -> dict[str, torch.Tensor]:
    """Combine slice-level probabilities into one per subject (max, or mean, over its slices)."""
    out: dict[str, list[torch.Tensor]] = {}
    for p, s in zip(probs, subjects, strict=True):
        out.setdefault(s, []).append(p)
    fn = (lambda t: t.max(0).values) if reduce == "max" else (lambda t: t.mean(0))
    return {s: fn(torch.stack(v)) for s, v in out.items()}


def export_png_slices(prep: Prepared, folder: str | os.PathLike, channel: int | None = None,
                      max_per_split: int | None = None) -> Path:
    """Write the slices of a ``slices`` dataset as 8-bit PNG files in class folders.

    The layout is ``folder/<split>/<class>/<sample>.png`` (split ``train``, ``val``,
    ``test``), which :func:`helpers.datasets.load_dataset` reads back as an image
    collection with the same subject-wise split, so slices of one subject never
    end up on both sides. This is how the series shows 2D training "from image
    files" on data that ships with it.

    Args:
        prep: the result of :func:`prepare` with ``input="slices"``.
        folder: where to write (created).
        channel: which contrast to keep (default FLAIR if present, else the first).
        max_per_split: keep at most this many slices per split (None: all).
    """
    from PIL import Image

    if prep.input != "slices" or prep.task != "classify":
        raise ValueError("export_png_slices needs prepare(..., task='classify', input='slices')")
    folder = Path(folder)
    if channel is None:
        channel = prep.modalities.index("FLAIR") if "FLAIR" in prep.modalities else 0
    for split in ("train", "val", "test"):
        data = getattr(prep, split)
        count = len(data) if max_per_split is None else min(len(data), max_per_split)
        for i in range(count):
            img = data.x[i, channel].numpy()
            lo, hi = np.percentile(img, [0.5, 99.5])
            png = np.clip((img - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
            name = str(data.ids[i]).replace(":", "_").replace(os.sep, "_")
            target = folder / split / prep.classes[int(data.y[i])] / f"{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.flipud(png.T)).save(target)
    return folder
