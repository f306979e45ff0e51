"""The run-time frame every notebook shares: device, seeds, run profiles, CPU speed settings.

One ``get_device()`` and one ``set_seed()`` for the whole series: notebooks never
name a device themselves, so the same notebook runs on a laptop CPU, on an Apple
GPU and on an NVIDIA GPU.

Run profiles hold every size that changes how long a notebook takes (number of
subjects, image size, epochs, batch size...). There are three, kept here and
nowhere else:

- ``smoke``: the CI profile, each notebook in at most about 60 s on 2 CPU cores;
  the numbers it produces mean nothing, it only proves the code runs.
- ``workshop``: a laptop CPU, each notebook in about 5 minutes (notebook 05, which
  trains six networks, about 16), with results that mean something.
- ``full``: one GPU, the best results the series can show.

``profile="auto"`` picks ``full`` when a CUDA GPU is present, else ``workshop``.

Example:
    >>> p = get_profile("smoke", epochs=1)
    >>> p.name, p.epochs
    ('smoke', 1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

DEVICE_ENV_VAR = "BRAINMRI_DEVICE"
"""Set this environment variable (``cpu``, ``cuda``, ``cuda:1``, ``mps``) to force a device."""


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """Every knob that changes the size (and so the run time) of a notebook.

    Attributes:
        name: ``smoke``, ``workshop`` or ``full`` (or one of them with overrides).
        n_subjects: subjects in the simulated cohort.
        spacing_mm: voxel spacing of the simulated cohort, in mm.
        volume_size: edge of the cube that 3D models see (voxels).
        slice_size: edge of the square that 2D models see (pixels).
        epochs: maximum training epochs.
        batch_size: volumes per step for 3D models (2D models use 4x this).
        patch_size: edge of the random patches that 3D models predicting per voxel
            (the U-Net, the lesion-map classifier) train on, instead of whole volumes
            (None: whole volumes). Cheaper steps, so a time-capped run sees far more
            examples; measured on the workshop cohort: RESULTS.md.
        max_train_seconds: wall-clock cap for one training run (None: no cap).
        bootstrap: resamples for bootstrap confidence intervals.
        cv_folds: cross-validation folds for the classical baselines.
        seed: the seed notebooks pass to ``set_seed`` and to data generation.
        description: one line for people.
    """

    name: str
    n_subjects: int
    spacing_mm: float
    volume_size: int
    slice_size: int
    epochs: int
    batch_size: int
    patch_size: int | None
    max_train_seconds: float | None
    bootstrap: int
    cv_folds: int
    seed: int
    description: str

    def as_dict(self) -> dict[str, Any]:
        """The profile as a plain dict (for tables, JSON and papermill)."""
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        n_subjects=24,
        spacing_mm=2.0,
        volume_size=32,
        slice_size=64,
        epochs=2,
        batch_size=4,
        patch_size=16,
        max_train_seconds=15.0,
        bootstrap=100,
        cv_folds=3,
        seed=42,
        description="CI: proves each notebook runs, in about a minute on 2 CPU cores; numbers mean nothing.",
    ),
    "workshop": Profile(
        name="workshop",
        n_subjects=200,
        spacing_mm=2.0,
        volume_size=48,
        slice_size=96,
        epochs=100,  # the 180 s cap binds first on 2 CPU cores; 30 epochs stopped the 3D CNN while still improving
        batch_size=8,
        patch_size=32,
        max_train_seconds=180.0,
        bootstrap=1000,
        cv_folds=5,
        seed=42,
        description="A laptop CPU: each notebook in about 5 minutes (05: about 16), with results that mean something.",
    ),
    "full": Profile(
        name="full",
        n_subjects=800,
        spacing_mm=1.0,
        volume_size=96,
        slice_size=192,
        epochs=100,
        batch_size=16,
        patch_size=64,
        max_train_seconds=None,
        bootstrap=2000,
        cv_folds=5,
        seed=42,
        description="One GPU: the best results the series can show.",
    ),
}


def resolve_profile_name(name: str) -> str:
    """Turn ``auto`` into ``full`` (CUDA present) or ``workshop``; check the others."""
    name = name.strip().lower()
    if name == "auto":
        return "full" if _cuda_available() else "workshop"
    if name not in PROFILES:
        raise ValueError(
            f"Unknown run profile {name!r}: choose one of {', '.join(PROFILES)} or 'auto'."
        )
    return name


def get_profile(name: str | Profile = "auto", **overrides: Any) -> Profile:
    """Return a named run profile, with any field overridden.

    Overrides whose value is ``None`` are ignored, so a notebook's ``parameters``
    cell can hold ``epochs = None`` meaning "whatever the profile says".

    Args:
        name: ``smoke``, ``workshop``, ``full`` or ``auto``; or a Profile to adjust.
        **overrides: field names of :class:`Profile` with new values.

    Raises:
        ValueError: for an unknown profile name or field name.

    Example:
        >>> get_profile("smoke", n_subjects=None, epochs=3).epochs
        3
    """
    base = name if isinstance(name, Profile) else PROFILES[resolve_profile_name(name)]
    fields = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown profile setting(s) {', '.join(unknown)}; the settings are: {', '.join(sorted(fields))}."
        )
    changes = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(base, **changes) if changes else base


# --------------------------------------------------------------------------- device


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def get_device(verbose: bool = True):
    """Pick the device to compute on: CUDA, then Apple MPS, then the CPU.

    The environment variable ``BRAINMRI_DEVICE`` (for example ``cpu``) overrides
    the choice, which is how a workshop can keep a shared GPU free.

    Args:
        verbose: print which device was picked and why.

    Returns:
        a ``torch.device``.
    """
    import torch

    forced = os.environ.get(DEVICE_ENV_VAR, "").strip()
    if forced:
        device = torch.device(forced)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"{DEVICE_ENV_VAR}={forced} asks for a CUDA GPU, but PyTorch sees none. "
                f"Unset {DEVICE_ENV_VAR} to let the series choose."
            )
        if device.type == "mps" and not _mps_available():
            raise RuntimeError(f"{DEVICE_ENV_VAR}={forced} asks for Apple MPS, which is not available.")
        reason = f"forced by the environment variable {DEVICE_ENV_VAR}={forced}"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        reason = f"a CUDA GPU is available ({name}, {torch.cuda.device_count()} visible)"
    elif _mps_available():
        device = torch.device("mps")
        reason = "an Apple-silicon GPU (MPS) is available and there is no CUDA GPU"
    else:
        device = torch.device("cpu")
        reason = f"no GPU found; computing on the CPU with {torch.get_num_threads()} threads"
    if verbose:
        print(f"Device: {device} ({reason})")
    return device


def set_seed(seed: int = 42, deterministic: bool = True, verbose: bool = True) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated.

    On the CPU this makes training bit-for-bit repeatable. On GPUs some operations
    (for example 3D pooling backward passes) have no deterministic version; they
    still run, with a warning, and results can differ in the last digits.

    Args:
        seed: the seed.
        deterministic: also ask PyTorch for deterministic algorithms.
        verbose: print the GPU caveat when a GPU is present.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the legacy global generator users may call)
    torch.manual_seed(seed)  # seeds every device, CUDA included
    if not deterministic:
        return
    if torch.cuda.is_available():
        # cuBLAS needs this to be repeatable; set it before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        if verbose:
            print(
                "Seeded. Note: on a GPU a few operations have no deterministic version; "
                "repeated runs can differ slightly."
            )
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- CPU speed


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX).

    Without them bf16 autocast still runs but is emulated and slower than float32.
    """
    flags = _cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    # Apple silicon M2 and later have bf16; PyTorch runs it well on arm64 macOS.
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@dataclass(frozen=True)
class SpeedSettings:
    """How training code should run on a device.

    Attributes:
        device_type: ``cpu``, ``cuda`` or ``mps``.
        amp_dtype: the autocast dtype (None: plain float32).
        channels_last: use channels-last memory format for conv nets.
        grad_scaler: fp16 needs gradient scaling; bf16 does not.
        threads: CPU threads PyTorch uses.
    """

    device_type: str
    amp_dtype: Any
    channels_last: bool
    grad_scaler: bool
    threads: int

    def autocast(self):
        """A context manager for the forward pass (a no-op when amp_dtype is None)."""
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def memory_format(self, spatial_dims: int):
        """The memory format for a batch with 2 or 3 spatial dimensions."""
        import torch

        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def speed_settings(device=None, mixed_precision: bool = True, threads: int | None = None) -> SpeedSettings:
    """Choose mixed precision, memory format and threads for a device.

    - CUDA: bf16 autocast when the GPU supports it, else fp16 with gradient scaling.
    - CPU: bf16 autocast and channels-last when the CPU has native bf16
      (measured here: about 2x faster 3D conv steps), else float32.
    - MPS: float32 (mixed precision there is still patchy).

    Args:
        device: a torch.device or string; default ``get_device(verbose=False)``.
        mixed_precision: set False to train in float32 everywhere.
        threads: CPU threads for PyTorch (default: leave PyTorch's choice).
    """
    import torch

    device = torch.device(device) if device is not None else get_device(verbose=False)
    if threads is not None:
        torch.set_num_threads(int(threads))
    n_threads = torch.get_num_threads()
    if device.type == "cuda":
        if not mixed_precision:
            return SpeedSettings("cuda", None, True, False, n_threads)
        if torch.cuda.is_bf16_supported():
            return SpeedSettings("cuda", torch.bfloat16, True, False, n_threads)
        return SpeedSettings("cuda", torch.float16, True, True, n_threads)
    if device.type == "cpu":
        fast = mixed_precision and cpu_supports_bf16()
        return SpeedSettings("cpu", torch.bfloat16 if fast else None, fast, False, n_threads)
    return SpeedSettings(device.type, None, False, False, n_threads)
