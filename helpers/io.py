"""Reading and writing files safely: NIfTI volumes, JSON, anything.

Two promises the whole series relies on:

- **Atomic writes.** A file is written to a temporary name in the same folder and
  renamed into place only when complete, so an interrupted run never leaves a
  half-written file that looks finished.
- **Clear errors.** A bad file raises :class:`DataError`, whose message names the
  file and the problem (missing, truncated, wrong dimensions, NaN values...).

Example:
    >>> import numpy as np, nibabel as nib, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    >>> save_nifti(img, folder / "ones.nii.gz")
    PosixPath('...ones.nii.gz')
    >>> load_volume(folder / "ones.nii.gz").shape
    (4, 4, 4)
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DataError(ValueError):
    """A data file is missing or unusable. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def full_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz`` for ``scan.nii.gz`` (``Path.suffix`` would give ``.gz``)."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".tar.gz"):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def _default_mode() -> int:
    """The permissions a plain ``open()`` would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; move it onto ``path`` only on success.

    The temporary name keeps the final suffix (``.tmp-XXXX.nii.gz``) so that
    libraries choosing a format by suffix still do the right thing, and starts with
    a dot so folder listings skip it. On any error the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.tmp-", suffix=full_suffix(path)
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; finished files get the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_write`, for libraries that want a file name, not a handle.

    Example:
        >>> with atomic_path("/tmp/x.pt") as tmp:      # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.tmp-", suffix=full_suffix(path)
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically, indented and with a final newline."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} as JSON")


def save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Save a NIfTI image atomically (``.nii`` or ``.nii.gz``, chosen by the suffix)."""
    path = Path(path)
    if full_suffix(path) not in NIFTI_SUFFIXES:
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file and check that its header can be read.

    The voxel data is not read yet (see :func:`load_volume` for a full check).

    Raises:
        DataError: the file is missing, empty, not NIfTI, or its header is corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, expected a NIfTI file (.nii or .nii.gz)")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    try:
        img = nib.load(path)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(path, f"not a readable NIfTI image ({exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"is a {type(img).__name__}, expected NIfTI")
    return img


def read_data(img: nib.Nifti1Image, path: str | os.PathLike, dtype=np.float32) -> np.ndarray:
    """Read an image's voxels (scaling applied), turning I/O failures into DataError."""
    try:
        return np.asanyarray(img.dataobj, dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise DataError(path, f"voxel data is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def check_array(data: np.ndarray, path: str | os.PathLike, ndim: int | None = 3,
                allow_nonfinite: bool = False, allow_all_zero: bool = False) -> None:
    """Raise DataError if an image array is unusable for the series.

    Args:
        data: the voxels.
        path: the file they came from (for the message).
        ndim: the number of dimensions expected (None: any). A 4D image with a
            single volume counts as 3D.
        allow_nonfinite: accept NaN or Inf values.
        allow_all_zero: accept an image whose voxels are all zero.
    """
    if ndim is not None and data.ndim != ndim:
        what = {2: "a 2D image", 3: "a 3D volume", 4: "a 4D series"}.get(data.ndim, f"{data.ndim}D data")
        raise DataError(path, f"is {what} of shape {tuple(data.shape)}, expected {ndim}D")
    if not allow_nonfinite:
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise DataError(path, f"contains {bad} NaN or infinite voxel value(s)")
    if not allow_all_zero and not np.any(data):
        raise DataError(path, "every voxel is zero (an empty image)")


def load_volume(path: str | os.PathLike, ndim: int | None = 3, dtype=np.float32,
                allow_nonfinite: bool = False, allow_all_zero: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI image and check it fully: readable, right dimensions, finite, not empty.

    A 4D file holding a single volume is squeezed to 3D. The returned image holds
    the voxels in memory as ``dtype`` with the original affine and header.

    Raises:
        DataError: naming the file and what is wrong with it.
    """
    img = load_nifti(path)
    data = read_data(img, path, dtype=dtype)
    if ndim == 3 and data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    check_array(data, path, ndim=ndim, allow_nonfinite=allow_nonfinite, allow_all_zero=allow_all_zero)
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(dtype)
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 checksum of a file, for manifests that detect corrupted files."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
