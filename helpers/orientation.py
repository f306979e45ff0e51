"""Display geometry for brain volumes: canonical orientation, planes, letters, millimetres.

Every picture of a scan in the series goes through these few rules, kept once here
(``helpers.viewer`` draws with them):

- **Canonical first.** A NIfTI file may store its voxels in any axis order and
  direction (RAS, LPS, a permuted order...). Before display, voxels are reordered
  to the closest *canonical* order, RAS+: the first array axis runs from the
  patient's Left to Right, the second from Posterior to Anterior, the third from
  Inferior to Superior. The affine (voxel -> millimetre map) is updated with them,
  so a voxel keeps its world coordinate.
- **Planes on screen.** Axial slices are shown with Anterior at the top, coronal
  and sagittal slices with Superior at the top, sagittal slices with Anterior on
  the left. Left-right follows a *convention*: **neurological** puts the patient's
  right on the screen's right (as if looking from behind); **radiological** puts
  the patient's right on the screen's left (as if facing the patient).
- **Aspect from voxel spacing**, **letters on the edges**, and coordinates
  **in millimetres** from the affine.

Example:
    >>> import numpy as np, nibabel as nib
    >>> lps = np.diag([-2.0, -2.0, 3.0, 1.0])           # stored L->R reversed, P->A reversed
    >>> img = canonical(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), lps))
    >>> orientation_code(img.affine), voxel_spacing(img.affine)
    ('RAS', (2.0, 2.0, 3.0))
    >>> edge_letters("axial", radiological=True)
    {'left': 'R', 'right': 'L', 'top': 'A', 'bottom': 'P'}
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

VIEWS = ("axial", "coronal", "sagittal")
"""The three single-plane views; ``"three"`` (all three side by side) is the fourth view."""
SLICE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Which canonical array axis a view slices through (its slider moves along it)."""
AXIS_NAMES = ("x (left-right)", "y (posterior-anterior)", "z (inferior-superior)")


def canonical(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """The image with voxels reordered to the closest canonical (RAS+) order.

    Only flips and axis swaps are applied (no resampling), so every voxel value is
    kept exactly and keeps its world (millimetre) coordinate.
    """
    return nib.as_closest_canonical(img)


def orientation_code(affine: np.ndarray) -> str:
    """Three letters naming where each array axis points, e.g. ``'RAS'`` or ``'LPS'``."""
    return "".join(nib.aff2axcodes(np.asarray(affine)))


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Edge lengths of one voxel in millimetres, along the three array axes."""
    zooms = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    return tuple(round(float(z), 6) for z in zooms)  # type: ignore[return-value]


def world_coordinate(affine: np.ndarray, voxel: Sequence[float]) -> np.ndarray:
    """The world (scanner) coordinate in mm of a voxel index ``(i, j, k)``."""
    return np.asarray(affine, float)[:3, :3] @ np.asarray(voxel, float) + np.asarray(affine, float)[:3, 3]


def voxel_index(affine: np.ndarray, world: Sequence[float], shape: Sequence[int] | None = None) -> tuple:
    """The voxel index ``(i, j, k)`` nearest to a world coordinate in mm.

    With ``shape`` the index is clipped into the volume.
    """
    ijk = np.linalg.solve(np.asarray(affine, float)[:3, :3],
                          np.asarray(world, float) - np.asarray(affine, float)[:3, 3])
    ijk = np.rint(ijk).astype(int)
    if shape is not None:
        ijk = np.clip(ijk, 0, np.asarray(shape[:3]) - 1)
    return tuple(int(v) for v in ijk)


def same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int],
              affine_b: np.ndarray, atol_mm: float = 1e-3) -> bool:
    """True when two volumes have the same voxel grid (shape and affine, within ``atol_mm``)."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and bool(
        np.allclose(np.asarray(affine_a, float), np.asarray(affine_b, float), atol=atol_mm)
    )


def describe_grid(shape: Sequence[int], affine: np.ndarray) -> str:
    """A one-line description of a grid for error messages."""
    spacing = "x".join(f"{s:g}" for s in voxel_spacing(affine))
    origin = ", ".join(f"{v:.1f}" for v in np.asarray(affine, float)[:3, 3])
    return (f"shape {tuple(int(s) for s in shape[:3])}, {spacing} mm voxels, "
            f"{orientation_code(affine)}, origin ({origin}) mm")


def edge_letters(view: str, radiological: bool = False) -> dict[str, str]:
    """Anatomical letters on the four edges of a displayed plane.

    R/L right/left, A/P anterior/posterior, S/I superior/inferior.
    """
    _check_view(view)
    if view == "sagittal":
        return {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    left, right = ("R", "L") if radiological else ("L", "R")
    top, bottom = ("A", "P") if view == "axial" else ("S", "I")
    return {"left": left, "right": right, "top": top, "bottom": bottom}


def plane(data: np.ndarray, view: str, index: int, radiological: bool = False) -> np.ndarray:
    """One slice of a canonical (RAS+) volume, arranged as it appears on screen.

    Row 0 is the top of the screen and column 0 its left edge (``imshow`` with
    ``origin="upper"``); the edges carry :func:`edge_letters`.
    """
    _check_view(view)
    if view == "axial":
        cut = data[:, :, index].T[::-1, :]           # rows: A (top) -> P, columns: L -> R
    elif view == "coronal":
        cut = data[:, index, :].T[::-1, :]           # rows: S -> I, columns: L -> R
    else:
        return data[index, :, :].T[::-1, ::-1]       # rows: S -> I, columns: A -> P
    return cut[:, ::-1] if radiological else cut


def pixel_of_voxel(shape: Sequence[int], view: str, voxel: Sequence[int],
                   radiological: bool = False) -> tuple[int, int]:
    """``(row, column)`` at which a voxel ``(i, j, k)`` appears in :func:`plane`."""
    _check_view(view)
    nx, ny, nz = (int(s) for s in shape[:3])
    i, j, k = (int(v) for v in voxel)
    if view == "axial":
        row, col, ncol = ny - 1 - j, i, nx
    elif view == "coronal":
        row, col, ncol = nz - 1 - k, i, nx
    else:
        return nz - 1 - k, ny - 1 - j
    return row, (ncol - 1 - col) if radiological else col


def pixel_aspect(spacing: Sequence[float], view: str) -> float:
    """Height / width of one displayed pixel (pass to ``imshow(aspect=...)``)."""
    _check_view(view)
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
