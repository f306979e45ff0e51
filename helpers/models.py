"""The networks of the series, each configurable in depth and width by one number each.

Five families, from simplest to most structured:

- :class:`MLP`: a multilayer perceptron on a downsampled image (pooled to a small
  fixed grid, then flattened): the first neural network of notebook 03.
- :class:`CNN`: a 2D or 3D convolutional classifier. Each of its ``depth`` stages is
  convolution -> batch norm -> ReLU -> 2x max-pooling; the first stage has
  ``width`` channels and every later stage twice as many. The head is a *global
  max pool*: measured on the simulated cohort, an average-pool head did not learn
  small lesions (averaging dilutes a small bright spot among thousands of
  healthy voxels), a max-pool head did.
- :class:`CNNGRU`: a 2D CNN reads each axial slice of a volume, and a GRU (a
  recurrent network, which reads a sequence one element at a time while keeping a
  memory) reads the sequence of slice summaries from bottom to top and back.
- :class:`UNet`: a 2D or 3D U-Net for segmentation (a label per voxel).
- :class:`LesionMapClassifier`: a U-Net used as a healthy-versus-lesion
  classifier. It draws a lesion map and answers with its most suspicious voxel;
  it is trained on lesion masks, so it needs a dataset that has them. Measured on the simulated cohort, this finds small faint lesions that a
  CNN trained on one label per scan misses (benchmarks/RESULTS.md).

:func:`build_model` builds any of them by name (the name, the number of input
channels and classes and the dimensionality are all a checkpoint needs to rebuild a
model), and :func:`summarize` prints a per-layer table (output shape, parameters,
receptive field) for notebook 04.

The forward passes avoid Python branching on tensor values, so every model can be
exported with ``torch.jit.trace`` and ``torch.onnx.export``.

Example:
    >>> import torch
    >>> model = build_model("cnn", in_channels=1, num_classes=2, dims=3, depth=3, width=8)
    >>> model(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 2])
    >>> count_parameters(model)
    17674
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

MODEL_NAMES = ("mlp", "cnn", "cnn_gru", "unet", "unet_classifier")
"""The names :func:`build_model` accepts."""

DEFAULTS: dict[str, dict[str, int]] = {
    "mlp": {"depth": 2, "width": 256},
    "cnn": {"depth": 4, "width": 16},
    "cnn_gru": {"depth": 3, "width": 16},
    "unet": {"depth": 3, "width": 16},
    "unet_classifier": {"depth": 3, "width": 16},
}
"""Default depth (layers or stages) and width (units or first-stage channels) per model."""


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(dims: int) -> type[nn.Module]:
    return nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d


def _pool(dims: int) -> type[nn.Module]:
    return nn.MaxPool3d if dims == 3 else nn.MaxPool2d


def _check_dims(dims: int) -> int:
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
    return dims


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")


NORMS = ("batch", "instance", "none")
"""Normalisation layers ConvBlock accepts (``True`` means batch, ``False`` none)."""


def _make_norm(dims: int, kind: bool | str, channels: int) -> nn.Module | None:
    kind = {True: "batch", False: "none"}.get(kind, kind)
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (or True/False), got {kind!r}")
    if kind == "batch":
        return _norm(dims)(channels)
    if kind == "instance":  # per sample and channel: no dependence on the rest of the batch
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    return None


class ConvBlock(nn.Sequential):
    """Convolution (3 wide, padded so the size is kept) -> normalisation -> ReLU.

    ``norm``: ``True``/``"batch"`` (batch norm, the default), ``"instance"``
    (instance norm: statistics per sample, so train and eval behave alike), or
    ``False``/``"none"``.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, norm: bool | str = True):
        layer = _make_norm(dims, norm, out_channels)
        layers: list[nn.Module] = [
            _conv(dims)(in_channels, out_channels, kernel_size=3, padding=1, bias=layer is None)
        ]
        if layer is not None:
            layers.append(layer)
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class GlobalMaxPool(nn.Module):
    """The largest value of each channel over all positions: ``[B, C, ...] -> [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(x.flatten(2), dim=2)


class GlobalAvgPool(nn.Module):
    """The mean of each channel over all positions: ``[B, C, ...] -> [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2)


class MLP(nn.Module):
    """A multilayer perceptron on a downsampled image.

    The input is first average-pooled to ``pool_size`` per spatial axis (so any
    input size works and the number of inputs stays small), flattened, then passed
    through ``depth`` hidden layers of ``width`` units (Linear -> ReLU -> dropout).

    Args:
        in_channels: image channels (MRI contrasts).
        num_classes: output classes.
        dims: 2 or 3.
        depth: hidden layers.
        width: units per hidden layer.
        pool_size: grid edge after downsampling (8 -> 8x8x8 = 512 inputs per channel in 3D).
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 3, depth: int = 2,
                 width: int = 256, pool_size: int = 8, dropout: float = 0.2):
        super().__init__()
        _check_dims(dims)
        _check_positive(depth=depth, width=width, pool_size=pool_size)
        self.dims = dims
        pool = nn.AdaptiveAvgPool3d if dims == 3 else nn.AdaptiveAvgPool2d
        self.downsample = pool(pool_size)
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = in_channels * pool_size**dims
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            n_in = width
        layers.append(nn.Linear(n_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.downsample(x))


class CNN(nn.Module):
    """A 2D or 3D convolutional classifier.

    ``depth`` stages of ConvBlock + 2x max-pooling; stage ``i`` has
    ``width * 2**i`` channels. Then a global pool (``head="max"`` by default),
    dropout and one linear layer giving one score (logit) per class.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        dims: 2 or 3.
        depth: convolution stages (each halves the image size).
        width: channels of the first stage.
        head: ``"max"`` (global max pool) or ``"avg"`` (global average pool).
        dropout: dropout probability before the last layer.
        norm: ``True`` or ``"batch"`` (batch norm), ``"instance"``, ``False`` or ``"none"``.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 3, depth: int = 4,
                 width: int = 16, head: str = "max", dropout: float = 0.3, norm: bool | str = True):
        super().__init__()
        _check_dims(dims)
        _check_positive(depth=depth, width=width)
        if head not in ("max", "avg"):
            raise ValueError(f"head must be 'max' or 'avg', got {head!r}")
        self.dims = dims
        stages: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2**i
            stages.append(nn.Sequential(ConvBlock(dims, channels, out, norm), _pool(dims)(2)))
            channels = out
        self.features = nn.Sequential(*stages)
        self.pool = GlobalMaxPool() if head == "max" else GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)
        self.out_features = channels

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One feature vector per image: ``[B, C, ...] -> [B, out_features]``."""
        return self.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(x)))


class CNNGRU(nn.Module):
    """A 2D CNN on each axial slice, then a bidirectional GRU over the slice sequence.

    The input is a volume ``[B, C, X, Y, Z]``; slices are taken along ``slice_axis``
    (the last axis, Z, is axial in the canonical RAS orientation the series uses).
    Each slice becomes a feature vector (shared 2D CNN with global max pooling); the
    GRU reads the vectors in order, and the largest GRU output over the slices
    (max over time) is classified.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        dims: must be 3 (the model reads volumes as slice sequences).
        depth: stages of the per-slice 2D CNN.
        width: channels of its first stage; the GRU has ``2 * width`` hidden units per direction.
        slice_axis: spatial axis (0, 1 or 2 for X, Y, Z) along which slices are read.
        dropout: dropout probability before the last layer.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 3, depth: int = 3,
                 width: int = 16, slice_axis: int = 2, dropout: float = 0.3):
        super().__init__()
        if dims != 3:
            raise ValueError("cnn_gru reads a volume as a sequence of slices: it needs dims=3")
        _check_positive(depth=depth, width=width)
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (X, Y, Z), got {slice_axis!r}")
        self.dims = 3
        self.slice_axis = slice_axis
        self.encoder = CNN(in_channels, 1, dims=2, depth=depth, width=width)
        self.encoder.classifier = nn.Identity()
        self.encoder.dropout = nn.Identity()
        hidden = 2 * width
        self.gru = nn.GRU(self.encoder.out_features, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, X, Y, Z] -> [B, S, C, H, W] with S the slices along slice_axis
        order = {0: (0, 2, 1, 3, 4), 1: (0, 3, 1, 2, 4), 2: (0, 4, 1, 2, 3)}[self.slice_axis]
        seq = x.permute(*order)
        b, s = seq.shape[0], seq.shape[1]
        feats = self.encoder.embed(seq.reshape((b * s,) + tuple(seq.shape[2:])))
        out, _ = self.gru(feats.reshape(b, s, -1))
        return self.classifier(self.dropout(torch.amax(out, dim=1)))


class UNet(nn.Module):
    """A 2D or 3D U-Net: an encoder that halves the size ``depth - 1`` times, a decoder
    that doubles it back, and skip connections that hand each decoder level the
    encoder's detail at the same size. Output: one score per class per voxel.

    The input size must be divisible by ``2 ** (depth - 1)``.

    Args:
        in_channels: image channels.
        num_classes: classes per voxel (2 for lesion versus background).
        dims: 2 or 3.
        depth: levels (3 -> sizes 1, 1/2, 1/4).
        width: channels at the first level; doubled at each level down.
        norm: ``True`` or ``"batch"`` (batch norm), ``"instance"``, ``False`` or ``"none"``.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: int = 3, depth: int = 3,
                 width: int = 16, norm: bool | str = True):
        super().__init__()
        _check_dims(dims)
        _check_positive(depth=depth, width=width)
        self.dims = dims
        self.depth = depth
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for c in chans:
            self.down.append(nn.Sequential(ConvBlock(dims, c_in, c, norm), ConvBlock(dims, c, c, norm)))
            c_in = c
        self.pool = _pool(dims)(2)
        up_conv = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for c_low, c_high in zip(chans[:0:-1], chans[-2::-1], strict=True):
            self.up.append(up_conv(c_low, c_high, kernel_size=2, stride=2))
            self.up_blocks.append(
                nn.Sequential(ConvBlock(dims, 2 * c_high, c_high, norm), ConvBlock(dims, c_high, c_high, norm))
            )
        self.head = _conv(dims)(chans[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.up_blocks, skips[-2::-1], strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class LesionMapClassifier(nn.Module):
    """Healthy versus lesion, answered by looking for the lesion: a U-Net plus a max readout.

    The U-Net gives every voxel a lesion score (log-odds); the scan's lesion score
    is the *largest* of them, so the answer "lesion" always points at a place.
    ``forward(x)`` returns two class scores per scan, ``[0, lesion log-odds]``
    (softmax of them = the probability of the most suspicious voxel), so for
    evaluation, calibration, export and deployment it is an ordinary classifier.

    It learns from the lesion masks, voxel by voxel (cross-entropy plus soft Dice,
    as the segmentation U-Net; see :func:`helpers.train.fit`): a scan's label is
    just "its mask is not empty", but the mask also says *where* the lesion is,
    which a label never does. With 140 training scans that is the difference
    between missing and finding small faint lesions (measured, see
    benchmarks/RESULTS.md). It therefore needs training data with a lesion mask for
    every lesion case; it is validated, tested and deployed on the labels alone.
    ``forward(x, return_map=True)`` returns the scores and the per-voxel map
    ``[B, 2, ...]`` (background, lesion) that the mask loss needs.

    Args:
        in_channels: image channels.
        num_classes: must be 2 (healthy, lesion).
        dims: 2 or 3.
        depth, width, norm: of the U-Net (see :class:`UNet`).
    """

    needs_masks = True
    """:func:`helpers.train.fit` trains it on the lesion masks of the training data."""

    def __init__(self, in_channels: int, num_classes: int = 2, dims: int = 3, depth: int = 3,
                 width: int = 16, norm: bool | str = True):
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"the lesion-map classifier answers healthy versus lesion (2 classes), "
                             f"got num_classes={num_classes}; use labels='binary' or the cnn model")
        self.dims = dims
        self.unet = UNet(in_channels, 2, dims=dims, depth=depth, width=width, norm=norm)

    def lesion_map(self, x: torch.Tensor) -> torch.Tensor:
        """The per-voxel lesion probability ``[B, ...]`` (the explanation this model gives itself)."""
        return torch.softmax(self.unet(x).float(), dim=1)[:, 1]

    def forward(self, x: torch.Tensor, return_map: bool = False):
        voxel_logits = self.unet(x)
        margin = (voxel_logits[:, 1] - voxel_logits[:, 0]).flatten(1).amax(dim=1)
        logits = torch.stack([torch.zeros_like(margin), margin], dim=1)
        if return_map:
            return logits, voxel_logits
        return logits


# --------------------------------------------------------------------------- registry


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "mlp": MLP, "cnn": CNN, "cnn_gru": CNNGRU, "unet": UNet, "unet_classifier": LesionMapClassifier,
}
"""The class behind each name of :data:`MODEL_NAMES`."""


def needs_masks(name: str) -> bool:
    """Whether the model of this name learns from lesion masks (so its training data must have them)."""
    key = name.strip().lower().replace("-", "_")
    return bool(getattr(MODEL_CLASSES.get(key), "needs_masks", False))


def build_model(name: str, in_channels: int, num_classes: int, dims: int = 3,
                depth: int | None = None, width: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a model of the series by name.

    Args:
        name: one of :data:`MODEL_NAMES` (``mlp``, ``cnn``, ``cnn_gru``, ``unet``,
            ``unet_classifier``).
        in_channels: image channels (one per MRI contrast).
        num_classes: output classes (per image, or per voxel for ``unet``).
        dims: 2 (images, slices) or 3 (volumes).
        depth: layers or stages (None: the model's default in :data:`DEFAULTS`).
        width: units or first-stage channels (None: the default).
        **kwargs: passed to the model class (``dropout``, ``head``, ``pool_size``...).

    Returns:
        the model; ``model.dims`` is its dimensionality and ``model.config`` the
        dict that rebuilds it (``build_model(**model.config)``).

    Example:
        >>> build_model("unet", 3, 2, dims=2, depth=2, width=4).config["depth"]
        2
    """
    key = name.strip().lower().replace("-", "_")
    if key not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}.")
    depth = DEFAULTS[key]["depth"] if depth is None else int(depth)
    width = DEFAULTS[key]["width"] if width is None else int(width)
    cls = MODEL_CLASSES[key]
    model = cls(int(in_channels), int(num_classes), dims=int(dims), depth=depth, width=width, **kwargs)
    model.config = {"name": key, "in_channels": int(in_channels), "num_classes": int(num_classes),
                    "dims": int(dims), "depth": depth, "width": width, **kwargs}
    return model


def default_model_name(task: str, dims: int) -> str:
    """The sensible default model for a task and data kind.

    ``segment`` -> ``unet``; ``classify`` -> ``cnn`` (2D for images, 3D for volumes).
    """
    if task == "segment":
        return "unet"
    if task == "classify":
        return "cnn"
    raise ValueError(f"Unknown task {task!r}: choose 'classify' or 'segment'.")


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """The number of (trainable) parameters of a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- summary


def _kernel_stride(module: nn.Module) -> tuple[int, int] | None:
    """Kernel size and stride along one axis for layers that change the receptive field."""

    def first(v: Any) -> int:
        return int(v[0] if isinstance(v, (tuple, list)) else v)

    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)):
        dilation = first(getattr(module, "dilation", 1))
        return dilation * (first(module.kernel_size) - 1) + 1, first(module.stride)
    return None


GLOBAL_LAYERS = (GlobalMaxPool, GlobalAvgPool, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def summarize(model: nn.Module, input_shape: Sequence[int], depth_limit: int | None = None):
    """A per-layer table: output shape, parameters and receptive field.

    The receptive field is how many input pixels (voxels) along one axis can
    influence one output position of a layer. It is followed through the layers in
    the order they run, so for a U-Net it is the field of the deepest path.

    Args:
        model: the network.
        input_shape: one input batch's shape, e.g. ``(1, 1, 48, 48, 48)``.
        depth_limit: unused levels of nesting are hidden (None: every leaf layer).

    Returns:
        a pandas DataFrame with columns layer, type, output shape, parameters,
        receptive field; its ``attrs["total_parameters"]`` is the model's count.

    Example:
        >>> table = summarize(build_model("cnn", 1, 2, dims=2, depth=2, width=4), (1, 1, 32, 32))
        >>> table["receptive field"].tolist()[:4]
        ['3', '3', '3', '4']
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {"rf": 1, "jump": 1, "global": False}
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            ks = _kernel_stride(module)
            if ks is not None:
                kernel, stride = ks
                state["rf"] += (kernel - 1) * state["jump"]
                state["jump"] *= stride
            elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                state["jump"] = max(1, state["jump"] // int(module.stride[0]))
            out = output[0] if isinstance(output, tuple) else output
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            params = sum(p.numel() for p in module.parameters(recurse=False))
            if isinstance(module, (nn.GRU, nn.LSTM)):
                state["global"] = True
                field = "all slices"
            elif isinstance(module, GLOBAL_LAYERS):
                state["global"] = True
                field = "whole input"
            elif state["global"]:
                field = "all slices" if any(r["receptive field"] == "all slices" for r in rows) else "whole input"
            else:
                field = str(state["rf"])
            rows.append({"layer": name, "type": type(module).__name__, "output shape": shape,
                         "parameters": params, "receptive field": field})

        return record

    for name, module in model.named_modules():
        leaf = not list(module.children()) or isinstance(module, (nn.GRU, nn.LSTM))
        if name and leaf and not (depth_limit is not None and name.count(".") >= depth_limit):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(tuple(input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    table = pd.DataFrame(rows)
    table.attrs["total_parameters"] = count_parameters(model)
    return table


def receptive_field(model: nn.Module, input_shape: Sequence[int]) -> int:
    """The receptive field (voxels along one axis) after the last convolution or pooling layer."""
    table = summarize(model, input_shape)
    numeric = [int(v) for v in table["receptive field"] if str(v).isdigit()]
    return numeric[-1] if numeric else 1
