"""One training engine for the whole series: fit, checkpoint, resume, evaluate.

What :func:`fit` does, in the order a training run needs it:

- **Device and speed.** The device comes from ``helpers.runtime.get_device()``;
  ``helpers.runtime.speed_settings`` decides mixed precision (bf16 autocast, or fp16
  with gradient scaling on GPUs without bf16) and channels-last memory.
- **Data on the device.** The preprocessed cohort is a :class:`TensorData` (one big
  tensor of images, one of labels). It is moved to the device *once*; every batch
  is then sliced and augmented there. On a GPU this keeps the GPU busy instead of
  waiting for CPU data loaders; on a CPU the same code runs on CPU tensors. Models
  that predict per voxel can train on random patches (``TrainConfig.patch_size``),
  half of them centred on a lesion.
- **Lesion masks for a classifier.** A model with ``needs_masks`` (the
  ``unet_classifier``) is trained on the lesion masks that classification data
  carries (``TensorData.masks``) and scored on the labels.
- **Optimiser.** AdamW, with a learning rate that rises linearly for a warm-up and
  then follows a cosine curve down to zero, by the end of the planned epochs or of
  the time budget, whichever comes first. Class weights (rarer classes count
  more) for imbalanced labels.
- **Early stopping** on a validation metric (ROC-AUC for two classes, balanced
  accuracy for more, lesion Dice for segmentation), keeping the best weights.
- **Checkpoints** written atomically after every epoch and read with
  ``torch.load(weights_only=True)`` (which cannot run code hidden in a file). They
  hold the model, optimiser, schedule and random-number states, so an interrupted
  run resumes with exactly the continuation of an uninterrupted one (on a CPU,
  bit for bit).
- **A run folder** ``runs/NAME/``: ``checkpoint.pt``, ``config.json``,
  ``history.csv`` (one row per epoch), ``metrics.json`` (validation and test
  scores; the test set is evaluated once, at the end) and ``curves.png``.
- **Progress** with tqdm (a widget in JupyterLab) and learning curves redrawn in
  place after each epoch in a notebook.
- **More than one GPU**: the same code runs under ``torchrun`` with
  DistributedDataParallel (see :mod:`helpers.distributed`).

The command line ``python -m helpers.train --data SOURCE --task classify|segment``
builds all of this from any dataset ``helpers.datasets.load_dataset`` accepts.

Example:
    >>> import torch
    >>> from helpers.models import build_model
    >>> x = torch.randn(16, 1, 8, 8, 8); y = (torch.arange(16) % 2)
    >>> data = TensorData(x, y)
    >>> model = build_model("cnn", 1, 2, dims=3, depth=2, width=4)
    >>> result = fit(model, data, data, TrainConfig(epochs=1, batch_size=4), progress=False)
    >>> len(result.history)
    1
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers import distributed
from helpers.augment import random_patches
from helpers.io import DataError, atomic_path, write_json, write_text
from helpers.runtime import get_device, set_seed, speed_settings

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
CONFIG = "config.json"
METRICS = "metrics.json"
CURVES = "curves.png"
CHECKPOINT_FORMAT = 1
CPU = torch.device("cpu")

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""An augmentation on a batch: ``(images, labels) -> (images, labels)``, on any device."""


# --------------------------------------------------------------------------- data


@dataclass
class TensorData:
    """A cohort (or one split of it) held as tensors.

    Attributes:
        x: images, ``[N, C, *spatial]`` float.
        y: labels: ``[N]`` class numbers (classification) or ``[N, *spatial]``
            class numbers per voxel (segmentation).
        ids: one name per sample (subject, or subject and slice), for reports.
        masks: for classification data that has lesion masks: ``[N, *spatial]``
            (uint8, 0 = no lesion), which models with ``needs_masks`` (the
            :class:`helpers.models.LesionMapClassifier`) also learn from; else None.
    """

    x: torch.Tensor
    y: torch.Tensor
    ids: list[str] | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"TensorData: {len(self.x)} images but {len(self.y)} labels")
        if self.ids is not None and len(self.ids) != len(self.x):
            raise ValueError(f"TensorData: {len(self.x)} images but {len(self.ids)} ids")
        if self.masks is not None and tuple(self.masks.shape) != (len(self.x), *self.x.shape[2:]):
            raise ValueError(f"TensorData: masks of shape {tuple(self.masks.shape)} do not fit images "
                             f"of shape {tuple(self.x.shape)}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.x.ndim - 2

    def to(self, device: torch.device) -> TensorData:
        """The same data on ``device`` (no copy when it is already there)."""
        masks = self.masks.to(device) if self.masks is not None else None
        return TensorData(self.x.to(device), self.y.to(device), self.ids, masks)

    def subset(self, index: Sequence[int] | torch.Tensor) -> TensorData:
        """The samples at ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        ids = [self.ids[i] for i in index.tolist()] if self.ids is not None else None
        masks = self.masks[index.to(self.masks.device)] if self.masks is not None else None
        return TensorData(self.x[index.to(self.x.device)], self.y[index.to(self.y.device)], ids, masks)


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Every setting of a training run (saved in the checkpoint and config.json).

    Attributes:
        task: ``classify`` (one label per image) or ``segment`` (one per voxel).
        epochs: maximum passes over the training data.
        batch_size: samples per optimiser step (per process under torchrun).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
        class_weighting: weight the classification loss by inverse class frequency.
        dice_weight: weight of the soft-Dice term added to cross-entropy (segmentation).
        monitor: validation metric for early stopping and the best checkpoint
            (None: ``auc`` for two classes, ``balanced_accuracy`` for more, ``dice``
            for segmentation). Ties on it are broken by the lower validation loss.
        patience: epochs without improvement before stopping (None: never stop early). 20:
            with 10, noisy early validation scores stopped runs that later improved (measured).
        max_train_seconds: wall-clock cap on training (None: no cap).
        seed: seeds weights, shuffling, dropout and augmentation.
        mixed_precision: allow bf16/fp16 where the device supports it.
        eval_batch_size: batch size for validation and test (None: 2 x batch_size).
        patch_size: train on random patches of this edge instead of whole volumes or
            images (None: whole). Only for models that predict per voxel (the U-Net
            and the lesion-map classifier); half the patches are centred on a lesion
            (:func:`helpers.augment.random_patches`). Validation and test still use
            whole volumes. Must suit the network (a U-Net of depth 3 needs a multiple of 4).
    """

    task: str = "classify"
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    class_weighting: bool = True
    dice_weight: float = 1.0
    monitor: str | None = None
    patience: int | None = 20
    max_train_seconds: float | None = None
    seed: int = 42
    mixed_precision: bool = True
    eval_batch_size: int | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.task not in ("classify", "segment"):
            raise ValueError(f"task must be 'classify' or 'segment', got {self.task!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_profile(cls, profile: Any, task: str = "classify", dims: int = 3, model: str | None = None,
                     **overrides: Any) -> TrainConfig:
        """Settings from a run profile: epochs, time cap, seed, batch size (4x for 2D); peak lr 3e-3.

        3D models that predict per voxel (segmentation, or a ``model`` that learns
        from masks such as ``unet_classifier``) train on random patches of the
        profile's ``patch_size``, the profile's batch size of them; without patches
        they take half the batch of whole volumes.

        Example:
            >>> from helpers.runtime import get_profile
            >>> TrainConfig.from_profile(get_profile("smoke"), dims=2).batch_size
            16
            >>> TrainConfig.from_profile(get_profile("workshop"), task="segment").patch_size
            32
        """
        from helpers.models import needs_masks

        batch = profile.batch_size * (4 if dims == 2 else 1)
        per_voxel = dims == 3 and (task == "segment" or (model is not None and needs_masks(model)))
        patch = overrides.pop("patch_size", None)
        patch = (getattr(profile, "patch_size", None) if per_voxel else None) if patch is None else patch
        patch = patch or None  # 0: whole volumes
        if per_voxel and patch is None:
            batch = max(2, profile.batch_size // 2)
        values = {"task": task, "epochs": profile.epochs, "batch_size": batch, "patch_size": patch,
                  "max_train_seconds": profile.max_train_seconds, "seed": profile.seed}
        # measured on the workshop cohort: at 1e-3 neither the 3D CNN (validation ROC-AUC
        # about 0.5 after 30 epochs) nor the 3D U-Net (Dice 0 after 11 epochs) got going;
        # at 3e-3 they reached 0.90 and 0.62
        values["lr"] = 3e-3
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model with the best weights loaded (not the DDP wrapper).
        history: one dict per epoch (epoch, lr, train_loss, val_loss, val metrics, seconds).
        best_epoch: the epoch whose weights were kept (1-based).
        best_score: its validation score on the monitored metric.
        monitor: the monitored metric's name.
        stopped: why training ended: ``epochs``, ``early_stopping``, ``time_limit``, ``already_finished``.
        train_seconds: wall-clock time spent training (summed over resumed parts).
        run_dir: the run folder (None when none was given).
        metrics: validation and test scores written to metrics.json.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    best_score: float
    monitor: str
    stopped: str
    train_seconds: float
    run_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def history_frame(self):
        """The history as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.history)


# --------------------------------------------------------------------------- losses and metrics


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``N / (K * count_k)``; a class with no sample gets weight 0.

    Example:
        >>> class_weights(torch.tensor([0, 0, 0, 1]), 2)
        tensor([0.6667, 2.0000])
    """
    counts = torch.bincount(labels.reshape(-1).long().to(CPU), minlength=num_classes).float()
    weights = counts.sum() / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the foreground classes (1..K-1), pooled over the whole batch.

    Cross-entropy alone let a U-Net predict "all background" for small lesions
    (measured on the simulated cohort); adding this term rewards overlap directly.
    The Dice is pooled over the batch (one overlap for all its voxels) rather than
    averaged per case: a per-case Dice gives every lesion-free case a full loss
    for one stray voxel, which pushed the U-Net towards predicting nothing.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = nn.functional.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).float()
    dims = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)[1:]
    denom = (probs + onehot).sum(dims)[1:]
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


class TaskLoss(nn.Module):
    """Cross-entropy (optionally class-weighted), plus soft Dice for segmentation."""

    def __init__(self, task: str, weight: torch.Tensor | None = None, dice_weight: float = 1.0):
        super().__init__()
        self.task = task
        self.dice_weight = dice_weight
        self.ce = nn.CrossEntropyLoss(weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits.float(), target.long())
        if self.task == "segment" and self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target)
        return loss


def dice_score(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-case Dice of two binary masks ``[N, ...]`` (NaN where both are empty)."""
    pred, truth = pred.reshape(len(pred), -1).bool(), truth.reshape(len(truth), -1).bool()
    inter = (pred & truth).sum(1).float()
    total = pred.sum(1).float() + truth.sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.full_like(total, float("nan")))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and ROC-AUC (binary, or macro one-versus-rest).

    ROC-AUC is NaN when a class is missing from ``labels``.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = probs.argmax(1)
    out = {"accuracy": float((pred == labels).mean()),
           "balanced_accuracy": float(balanced_accuracy_score(labels, pred))}
    k = probs.shape[1]
    present = np.unique(labels)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif k == 2:
        out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    elif len(present) == k:
        out["auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    else:
        out["auc"] = float("nan")
    return out


def segmentation_metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Lesion Dice: any lesion class versus background.

    ``dice``: mean per-case Dice over cases with a lesion in the truth;
    ``dice_pooled``: Dice over all voxels of all cases together;
    ``empty_cases_clean``: the share of lesion-free cases predicted lesion-free.
    """
    pred, truth = pred > 0, truth > 0
    per_case = dice_score(pred, truth)
    has_lesion = truth.reshape(len(truth), -1).any(1)
    inter = (pred & truth).sum().float()
    total = pred.sum().float() + truth.sum().float()
    empty = ~has_lesion
    clean = (~pred.reshape(len(pred), -1).any(1))[empty]
    return {
        "dice": float(per_case[has_lesion].mean()) if has_lesion.any() else float("nan"),
        "dice_pooled": float(2 * inter / total) if total > 0 else float("nan"),
        "empty_cases_clean": float(clean.float().mean()) if empty.any() else float("nan"),
    }


LOWER_IS_BETTER = frozenset({"loss"})
"""Validation metrics where a smaller value is better (early stopping then minimises)."""


def _oriented(value: float, monitor: str) -> float:
    """A score where higher is always better (NaN stays NaN)."""
    return -value if monitor in LOWER_IS_BETTER else value


def _improved(score: float, loss: float, best: dict[str, Any], monitor: str) -> bool:
    """Is this epoch better than the best so far? The monitored score first; on a tie, the lower loss.

    With 30 validation subjects, ROC-AUC often reaches 1.0 early and stays there:
    without a tie-break the first such epoch is kept (often one with the learning
    rate still high and the probabilities poorly set) and early stopping counts the
    later, equally ranked but better-settled epochs as "no improvement". The
    validation loss breaks the tie (measured, benchmarks/RESULTS.md).
    """
    if math.isnan(score):
        return False
    new, old = _oriented(score, monitor), _oriented(best["score"], monitor)
    if new > old and not math.isclose(new, old, rel_tol=0.0, abs_tol=1e-12):
        return True
    tied = math.isclose(new, old, rel_tol=0.0, abs_tol=1e-12)
    return tied and monitor != "loss" and not math.isnan(loss) and (math.isnan(best["loss"]) or loss < best["loss"])


def default_monitor(task: str, num_classes: int) -> str:
    """The validation metric early stopping watches by default."""
    if task == "segment":
        return "dice"
    return "auc" if num_classes == 2 else "balanced_accuracy"


# --------------------------------------------------------------------------- inference


@torch.no_grad()
def _batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                    mixed_precision: bool):
    """Yield ``(start, logits)`` per batch, computed on ``device`` in eval mode."""
    speed = speed_settings(device, mixed_precision=mixed_precision)
    fmt = speed.memory_format(x.ndim - 2)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device).contiguous(memory_format=fmt)
            with speed.autocast():
                logits = model(xb)
            yield start, logits.float()
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 16, device: torch.device | None = None,
            mixed_precision: bool = True) -> torch.Tensor:
    """Class probabilities for every sample, as float32 on the CPU.

    Args:
        model: a classifier (``[B, K]`` out) or segmenter (``[B, K, *spatial]`` out).
        x: images ``[N, C, *spatial]`` on any device.
        batch_size: samples per forward pass.
        device: where to compute (default: where the model is).
        mixed_precision: use the device's autocast setting.
    """
    device = device or next(model.parameters()).device
    out = [torch.softmax(logits, dim=1).to(CPU)
           for _, logits in _batched_logits(model, x, batch_size, device, mixed_precision)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, task: str, batch_size: int = 16,
             loss_fn: nn.Module | None = None, mixed_precision: bool = True) -> dict[str, float]:
    """Scores of a model on a dataset: the task's metrics, and the loss if ``loss_fn`` is given.

    Classification: ``loss``, ``accuracy``, ``balanced_accuracy``, ``auc``.
    Segmentation: ``loss``, ``dice``, ``dice_pooled``, ``empty_cases_clean``.
    """
    device = next(model.parameters()).device
    probs, total = [], 0.0
    for start, logits in _batched_logits(model, data.x, batch_size, device, mixed_precision):
        if loss_fn is not None:
            yb = data.y[start:start + batch_size].to(device)
            total += float(loss_fn(logits, yb)) * len(yb)
        probs.append(torch.softmax(logits, dim=1).to(CPU))
    y = data.y.to(CPU)
    out: dict[str, float] = {}
    if loss_fn is not None:
        out["loss"] = total / max(1, len(y))
    if task == "classify":
        p = torch.cat(probs)
        out.update(classification_metrics(p.numpy(), y.numpy()))
    else:
        out.update(segmentation_metrics(torch.cat([q.argmax(1) for q in probs]), y))
    return out


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (augmentations may use the legacy global generator)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["accelerator"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["accelerator"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a crash mid-write leaves the old file intact)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: Any = CPU) -> dict[str, Any]:
    """Read a checkpoint safely: ``weights_only=True`` refuses anything but tensors and plain data.

    Raises:
        DataError: the file is missing, truncated, or not a checkpoint of this series.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise DataError(path, "checkpoint not found (train a model first, or check the run folder)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle refused by weights_only, ...
        raise DataError(path, f"not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise DataError(path, "is not a checkpoint written by helpers.train (no model or model_config)")
    return state


def load_run(run_dir: str | Path, device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run folder (or checkpoint file), ready for inference.

    Returns:
        ``(model, checkpoint)``: the model in eval mode on ``device`` (default
        ``get_device()``) with the best weights, and the checkpoint dict (``classes``,
        ``task``, ``preprocess``, ``train_config``, ``history``, ``metrics``...).

    Example:
        >>> model, ckpt = load_run("runs/cls3d_binary")     # doctest: +SKIP
        >>> ckpt["classes"], ckpt["preprocess"]             # doctest: +SKIP
    """
    from helpers.models import build_model

    device = device or get_device(verbose=False)
    ckpt = load_checkpoint(run_dir)
    model = build_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# --------------------------------------------------------------------------- learning curves


def plot_history(history: Sequence[dict[str, Any]], monitor: str | None = None, axes=None, title: str = ""):
    """Learning curves: losses (left) and the validation metrics (right) per epoch.

    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    else:
        fig = axes[0].figure
    for ax in axes:
        ax.clear()
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    if history and "val_loss" in history[0]:
        axes[0].plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss (lower is better)")
    axes[0].legend()
    names = [k for k in (history[0] if history else {}) if k.startswith("val_") and k != "val_loss"]
    for name in names:
        style = "-" if name == f"val_{monitor}" else "--"
        axes[1].plot(epochs, [h[name] for h in history], style, marker="o", label=name[4:])
    axes[1].set(xlabel="epoch", ylabel="score", ylim=(-0.02, 1.02),
                title=f"Validation (early stopping on {monitor})" if monitor else "Validation")
    if names:
        axes[1].legend(loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return fig


class _LiveCurves:
    """Redraws one figure in place after each epoch when running in a notebook."""

    def __init__(self, enabled: bool, monitor: str, title: str):
        self.handle = None
        self.fig = None
        self.monitor = monitor
        self.title = title
        self.enabled = enabled and _in_notebook()

    def update(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        import matplotlib.pyplot as plt
        from IPython.display import display

        if self.fig is None:
            self.fig, _ = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
            plt.close(self.fig)  # shown through the display handle only, not again at cell end
        plot_history(history, self.monitor, self.fig.axes, self.title)
        if self.handle is None:
            self.handle = display(self.fig, display_id=True)
        else:
            self.handle.update(self.fig)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


# --------------------------------------------------------------------------- the engine


def set_memory_format(model: nn.Module, speed: Any) -> nn.Module:
    """Store 2D and 3D convolution weights channels-last when ``speed.channels_last`` says so.

    Works per weight (4D weights get ``channels_last``, 5D ``channels_last_3d``), so
    models that mix 2D and 3D layers, like the CNN + GRU, are handled too.
    """
    if not speed.channels_last:
        return model
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.ndim in (4, 5):
                param.data = param.data.contiguous(memory_format=speed.memory_format(param.ndim - 2))
    return model


def lr_schedule(warmup_steps: int, total_steps: int) -> list[float]:
    """The learning-rate factor (times the peak rate) at every step: linear warm-up, then cosine.

    Example:
        >>> [round(f, 2) for f in lr_schedule(2, 6)]
        [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    """
    return [lr_factor(s, warmup_steps, total_steps) for s in range(total_steps)]


def overfit_one_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "classify",
                      steps: int = 40, lr: float = 3e-3, device: torch.device | None = None) -> list[float]:
    """Train on one small batch only and return the loss at each step.

    A sanity check before any real training: a model that cannot drive the loss
    on a handful of samples towards zero has a bug (wrong shapes, labels, or a
    broken layer). Dropout is switched off (eval mode for dropout only) so the
    curve is smooth; batch norm still learns. Mixed precision and memory format
    follow ``speed_settings`` as in :func:`fit`.
    """
    device = device or get_device(verbose=False)
    model = model.to(device).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    speed = speed_settings(device)
    fmt = speed.memory_format(x.ndim - 2)
    model = set_memory_format(model, speed)
    x, y = x.to(device).contiguous(memory_format=fmt), y.to(device)
    loss_fn = TaskLoss(task)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        with speed.autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def lr_factor(step: int, warmup_steps: int, total_steps: int, seconds: float = 0.0,
              max_seconds: float | None = None) -> float:
    """The learning-rate factor (times the peak rate) at a step: linear warm-up, then cosine to zero.

    The cosine follows whichever runs out first, the steps or the time budget: its
    progress is the larger of "steps done / steps planned" and "training seconds /
    ``max_seconds``". Under a time cap (a workshop laptop stops after 3 minutes,
    long before 100 planned epochs) the rate therefore still ends near zero when
    the time is up, instead of being cut off at its peak. Measured on the simulated
    cohort: see benchmarks/RESULTS.md. Without a cap the schedule depends on the
    step only, so training stays exactly reproducible.

    Example:
        >>> round(lr_factor(10, 2, 100), 2), round(lr_factor(10, 2, 100, seconds=90, max_seconds=180), 2)
        (0.98, 0.5)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if max_seconds:
        progress = max(progress, seconds / max_seconds)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _num_classes(model: nn.Module, data: TensorData) -> int:
    config = getattr(model, "config", None)
    if config and "num_classes" in config:
        return int(config["num_classes"])
    return int(data.y.max().item()) + 1


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    write_text(run_dir / HISTORY, pd.DataFrame(history).to_csv(index=False))


def _comparable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def fit(model: nn.Module, train: TensorData, val: TensorData, config: TrainConfig,
        run_dir: str | Path | None = None, *, test: TensorData | None = None,
        augment: Augment | None = None, classes: Sequence[str] | None = None,
        preprocess: dict[str, Any] | None = None, data_info: dict[str, Any] | None = None,
        resume: bool = True, device: torch.device | None = None, progress: bool = True,
        live_plot: bool = True, on_epoch_end: Callable[[int, list[dict[str, Any]]], None] | None = None,
        ) -> FitResult:
    """Train a model, keeping the best weights on the validation metric.

    Args:
        model: a model from :func:`helpers.models.build_model` (its ``config`` is
            saved so the run can be rebuilt).
        train, val: the training and validation data.
        config: the settings (:class:`TrainConfig`).
        run_dir: the run folder for checkpoint, history, config and metrics
            (None: nothing is written and nothing can be resumed).
        test: evaluated once, at the end, with the best weights (into metrics.json).
        augment: a batch augmentation ``(x, y) -> (x, y)``, run on the device.
        classes: class names, in label order (saved in the checkpoint).
        preprocess: the preprocessing configuration (saved, so deployment applies
            exactly the same preprocessing).
        data_info: anything else about the data worth keeping (source, sizes...).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists and was made
            with the same settings (a finished run is then reused, not retrained).
        device: where to train (default ``get_device()``).
        progress: show a progress bar.
        live_plot: redraw learning curves after each epoch (in a notebook).
        on_epoch_end: called with (epoch, history) after each epoch's checkpoint.

    Returns:
        a :class:`FitResult`.
    """
    ctx = distributed.context()
    device = distributed.local_device(device or get_device(verbose=ctx.is_main and progress), ctx)
    distributed.setup(device, ctx)
    speed = speed_settings(device, mixed_precision=config.mixed_precision)
    num_classes = _num_classes(model, train)
    monitor = config.monitor or default_monitor(config.task, num_classes)
    run_dir = Path(run_dir) if run_dir is not None else None
    model_config = dict(getattr(model, "config", {}) or {})
    settings = {"train_config": config.as_dict(), "model_config": model_config}

    set_seed(config.seed, verbose=False)
    fmt = speed.memory_format(train.dims)
    model = set_memory_format(model.to(device), speed)
    train, val = train.to(device), val.to(device)

    weight = class_weights(train.y, num_classes).to(device) \
        if config.task == "classify" and config.class_weighting else None
    loss_fn = TaskLoss(config.task, weight, config.dice_weight).to(device)
    # models that learn from lesion masks as well as labels (LesionMapClassifier)
    map_loss = None
    if config.task == "classify" and getattr(model, "needs_masks", False):
        if train.masks is None:
            raise ValueError(f"{type(model).__name__} learns from lesion masks, but the training data has "
                             "none: use a dataset with lesion masks, or the cnn model")
        map_loss = TaskLoss("segment", dice_weight=config.dice_weight).to(device)
    if config.patch_size is not None and config.task != "segment" and map_loss is None:
        raise ValueError("patch_size needs a label per voxel: use it for segmentation or the unet_classifier, "
                         "not for a classifier that gives one answer per image")
    sampler = torch.utils.data.DistributedSampler(
        range(len(train)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
        seed=config.seed, drop_last=False)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = min(total_steps, max(1, round(config.warmup_epochs * steps_per_epoch)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def set_lr(step: int, seconds: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, warmup, total_steps, seconds, config.max_train_seconds)

    scaler = torch.amp.GradScaler(device.type, enabled=speed.grad_scaler)
    net = nn.parallel.DistributedDataParallel(model) if ctx.is_distributed else model

    history: list[dict[str, Any]] = []
    best = {"score": _oriented(-math.inf, monitor), "loss": math.nan, "epoch": 0, "state": None, "bad_epochs": 0}
    start_epoch, train_seconds, stopped = 0, 0.0, ""
    ckpt_path = run_dir / CHECKPOINT if run_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        same = _comparable(settings) == _comparable(
            {"train_config": ckpt.get("train_config"), "model_config": ckpt.get("model_config")})
        if not same:
            if ctx.is_main:
                print(f"{ckpt_path} was made with other settings: training from scratch.")
        elif ckpt.get("finished"):
            model.load_state_dict(ckpt["model"])
            if ctx.is_main:
                print(f"Reusing the finished run in {run_dir} (delete it, or pass resume=False, to retrain).")
            distributed.barrier(ctx)
            metrics = ckpt.get("metrics", {})
            return FitResult(model.eval(), list(ckpt["history"]), ckpt["best_epoch"], ckpt["best_score"],
                             monitor, "already_finished", ckpt["train_seconds"], run_dir, metrics)
        else:
            resume_state = ckpt["resume"]
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scaler.load_state_dict(resume_state["scaler"])
            _set_rng_state(resume_state["rng"])
            history = list(ckpt["history"])
            start_epoch, train_seconds = int(ckpt["epoch"]), float(ckpt["train_seconds"])
            best_epoch = int(ckpt["best_epoch"])
            best = {"score": float(ckpt["best_score"]), "epoch": best_epoch,
                    "loss": float(history[best_epoch - 1].get("val_loss", math.nan)) if best_epoch > 0 else math.nan,
                    "state": ckpt["model"] if best_epoch > 0 else None,
                    "bad_epochs": int(resume_state["bad_epochs"])}
            if ctx.is_main:
                print(f"Resuming {run_dir} after epoch {start_epoch} of {config.epochs}.")

    if run_dir is not None and ctx.is_main:
        write_json(run_dir / CONFIG, {**settings, "task": config.task, "classes": list(classes or []),
                                       "preprocess": preprocess, "data": data_info or {},
                                       "device": str(device), "world_size": ctx.world_size,
                                       "amp_dtype": str(speed.amp_dtype), "channels_last": speed.channels_last})

    def checkpoint(finished: bool, metrics: dict[str, Any] | None = None) -> None:
        if ckpt_path is None or not ctx.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "model": best["state"] or _cpu_state(model),
            "model_config": model_config, "train_config": config.as_dict(), "task": config.task,
            "classes": list(classes or []), "preprocess": preprocess, "data": _comparable(data_info or {}),
            "history": history, "epoch": len(history), "best_epoch": best["epoch"],
            "best_score": best["score"], "monitor": monitor, "train_seconds": train_seconds,
            "finished": finished, "stopped": stopped, "metrics": metrics or {},
            "resume": None if finished else {
                "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(), "bad_epochs": best["bad_epochs"]},
        }
        save_checkpoint(ckpt_path, state)
        _write_history(run_dir, history)

    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc="training",
                   unit="step", file=sys.stdout)
    live = _LiveCurves(live_plot and ctx.is_main, monitor, run_dir.name if run_dir else "")
    eval_bs = config.eval_batch_size or 2 * config.batch_size
    for epoch in range(start_epoch, config.epochs):
        net.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        started, losses, seen = time.perf_counter(), [], 0
        for step in range(steps_per_epoch):
            clock = 0.0
            if config.max_train_seconds is not None:  # every rank follows rank 0's clock
                clock = distributed.broadcast_value(train_seconds + time.perf_counter() - started, device, ctx)
            set_lr(epoch * steps_per_epoch + step, clock)
            index = order[step * config.batch_size:(step + 1) * config.batch_size].to(device)
            xb, yb = train.x[index], train.y[index]
            if map_loss is not None:
                # the masks alone: a scan's label is "its mask is not empty", so it adds nothing,
                # and a loss on the max readout as well fought the mask loss (measured: validation
                # ROC-AUC 0.77 with both terms, RESULTS.md)
                yb = train.masks[index].long()
            if config.patch_size is not None:  # cut patches before augmenting: cheaper
                xb, yb = random_patches(xb, yb, config.patch_size)
            if augment is not None:  # a mask moves with the image; a class label stays
                xb, yb = augment(xb, yb)
            xb = xb.contiguous(memory_format=fmt)
            with speed.autocast():
                out = net(xb, return_map=True)[1] if map_loss is not None else net(xb)
            loss = (loss_fn if map_loss is None else map_loss)(out, yb)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
            seen += len(index)
            if bar is not None:
                bar.update(1)
            if config.max_train_seconds is not None:
                over = train_seconds + time.perf_counter() - started > config.max_train_seconds
                if distributed.broadcast_flag(over, device, ctx):
                    stopped = "time_limit"
                    break
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds
        scores = evaluate(model, val, config.task, eval_bs, loss_fn, config.mixed_precision)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": float(torch.stack(losses).float().mean()),
               **{f"val_{k}": v for k, v in scores.items()},
               "seconds": round(epoch_seconds, 3), "samples_per_second": round(seen / max(epoch_seconds, 1e-9), 2)}
        history.append(row)
        if monitor not in scores:
            raise ValueError(f"monitor {monitor!r} is not a validation metric; choose one of {', '.join(scores)}")
        score = scores[monitor]
        if _improved(score, scores.get("loss", math.nan), best, monitor):
            best.update(score=score, loss=scores.get("loss", math.nan), epoch=epoch + 1,
                        state=_cpu_state(model), bad_epochs=0)
        else:
            best["bad_epochs"] += 1
        if config.patience is not None and best["bad_epochs"] >= config.patience:
            stopped = stopped or "early_stopping"
        stop = distributed.broadcast_flag(bool(stopped), device, ctx)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{row['train_loss']:.3f}",
                            **{monitor: f"{score:.3f}"})
        live.update(history)
        checkpoint(finished=False)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
        if stop:
            break
    if bar is not None:
        bar.close()
    stopped = stopped or "epochs"
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    metrics = {"monitor": monitor, "best_epoch": best["epoch"], "stopped": stopped,
               "train_seconds": round(train_seconds, 2), "epochs_run": len(history),
               "validation": evaluate(model, val, config.task, eval_bs, loss_fn, config.mixed_precision)}
    if test is not None:
        metrics["test"] = evaluate(model, test.to(device), config.task, eval_bs, loss_fn,
                                   config.mixed_precision)
    checkpoint(finished=True, metrics=metrics)
    if run_dir is not None and ctx.is_main:
        write_json(run_dir / METRICS, metrics)
        if history:
            import matplotlib.pyplot as plt

            fig = plot_history(history, monitor, title=run_dir.name)
            fig.savefig(run_dir / CURVES, dpi=100)
            plt.close(fig)
    distributed.barrier(ctx)
    return FitResult(model.eval(), history, best["epoch"], best["score"], monitor, stopped,
                     train_seconds, run_dir, metrics)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights on the CPU (plain contiguous tensors)."""
    return {k: v.detach().to(CPU).contiguous().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- command line


def default_run_name(task: str, model: str, dims: int, labels: str | None = None) -> str:
    """A run folder name such as ``classify_binary_cnn_3d`` or ``segment_unet_3d``."""
    parts = [task] + ([labels] if task == "classify" and labels else []) + [model, f"{dims}d"]
    return "_".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.train --data SOURCE --task classify|segment [--model NAME] --profile P --out DIR``."""
    import argparse

    from helpers.models import MODEL_NAMES, build_model, default_model_name
    from helpers.paths import runs_dir
    from helpers.runtime import get_profile

    parser = argparse.ArgumentParser(
        prog="python -m helpers.train",
        description="Train a model on a dataset and write a run folder (checkpoint, history, config, "
                    "metrics). Runs under torchrun --nproc_per_node=N too.")
    parser.add_argument("--data", required=True, help="a dataset folder or CSV manifest (anything load_dataset reads)")
    parser.add_argument("--task", default="classify", choices=("classify", "segment"))
    parser.add_argument("--model", default=None, choices=MODEL_NAMES,
                        help="default: cnn for classification, unet for segmentation; unet_classifier (healthy "
                             "versus lesion, learns from lesion masks) is the most accurate classifier where a "
                             "dataset has masks")
    parser.add_argument("--profile", default="auto", help="smoke, workshop, full or auto")
    parser.add_argument("--out", default=None, help="run folder (default: runs/<task>_<labels>_<model>_<dims>d)")
    parser.add_argument("--input", default=None, choices=("volume", "slices", "image"),
                        help="volume (3D), slices (2D axial slices of volumes) or image (2D files); "
                             "default: image for 2D data, volume otherwise")
    parser.add_argument("--labels", default="binary", choices=("binary", "diagnosis"),
                        help="binary: healthy versus lesion; diagnosis: every class of the dataset")
    parser.add_argument("--depth", type=int, default=None, help="model depth (layers or stages)")
    parser.add_argument("--width", type=int, default=None, help="model width (units or first-stage channels)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="per process under torchrun")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap on training")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--augment", default=None, choices=("none", "flip", "light", "full"),
                        help="training augmentation (see helpers.training_data.make_augment); default: light "
                             "for classification, flip for segmentation and the unet_classifier (what was "
                             "measured to work)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="train the 3D U-Net or unet_classifier on random patches of this edge (half centred "
                             "on lesions): cheaper steps; 0: whole volumes (default: the profile's patch_size)")
    parser.add_argument("--modalities", nargs="+", default=None,
                        help="contrasts to use as input channels, e.g. FLAIR (default: all of the dataset's)")
    parser.add_argument("--no-resume", action="store_true", help="start again even if the run folder has a checkpoint")
    parser.add_argument("--no-cache", action="store_true", help="do not keep preprocessed cases in data/cache/")
    args = parser.parse_args(argv)

    from helpers.training_data import default_augment, make_augment, prepare

    ctx = distributed.context()
    profile = get_profile(args.profile, seed=args.seed)
    try:
        prep = prepare(args.data, task=args.task, profile=profile, input=args.input, labels=args.labels,
                       cache=not args.no_cache, verbose=ctx.is_main, modalities=args.modalities)
        name = args.model or default_model_name(args.task, prep.dims)
        model = build_model(name, prep.in_channels, prep.num_classes, dims=prep.dims,
                            depth=args.depth, width=args.width)
        if getattr(model, "needs_masks", False) and prep.train.masks is None:
            raise ValueError(f"{args.data}: the {name} model learns from lesion masks, and this dataset has "
                             "none for some lesion cases; use --model cnn")
    except (DataError, ValueError) as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 1
    config = TrainConfig.from_profile(profile, task=args.task, dims=prep.dims, model=name, epochs=args.epochs,
                                      batch_size=args.batch_size, lr=args.lr,
                                      max_train_seconds=args.max_seconds, patch_size=args.patch_size)
    labels = args.labels if args.task == "classify" else None
    augment = args.augment or default_augment(args.task, name)
    out = Path(args.out) if args.out else runs_dir() / default_run_name(args.task, name, prep.dims, labels)
    result = fit(model, prep.train, prep.val, config, out, test=prep.test,
                 augment=make_augment(args.task, augment), classes=prep.classes,
                 preprocess=prep.preprocess, data_info={**prep.info, "augment": augment}, resume=not args.no_resume, live_plot=False)
    if ctx.is_main:
        m = result.metrics
        print(f"Stopped: {result.stopped} after {len(result.history)} epoch(s), {result.train_seconds:.1f} s; "
              f"best epoch {result.best_epoch} ({result.monitor} {result.best_score:.3f})")
        for split in ("validation", "test"):
            if split in m:
                print(f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in m[split].items()))
        print(f"Run folder: {out}")
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
