"""Lesions of the simulated cohort: where they sit, what shape they have, which label each part gets.

Three kinds, drawn in template (MNI) millimetres so they follow each subject's warp:

- **tumour** (glioma-like): an irregular mass with a necrotic core (label 1), an
  enhancing rim (3) and surrounding oedema that spreads in white matter (2), with
  mass effect that pushes neighbouring tissue away (BraTS 2023 label values);
- **stroke**: an ischaemic infarct (4) in a vascular territory (MCA, ACA, PCA, or a
  small deep lacune for subtle cases), confined to grey and white matter;
- **ms**: scattered small ovoid white-matter lesions (5), many near the ventricles.

``subtlety`` (0 obvious - 1 barely visible) shrinks lesions; ``helpers.scanner``
also fades their contrast.

Example:
    >>> import numpy as np
    >>> from helpers import anatomy
    >>> tpl = anatomy.load_template(4.0)                                       # doctest: +SKIP
    >>> found, push = make_lesions("ms", 0.3, tpl, np.random.default_rng(0))  # doctest: +SKIP
    >>> found.labels                                                           # doctest: +SKIP
    (5,)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from helpers import anatomy
from helpers.anatomy import SmoothField

LESION_LABELS: dict[int, str] = {
    1: "necrotic tumour core",
    2: "peritumoural oedema",
    3: "enhancing tumour",
    4: "ischaemic infarct",
    5: "white-matter lesion (MS-like)",
}
"""Voxel labels of the lesion maps (0 = no lesion). Tumour sub-regions use the BraTS 2023 values."""
LABEL_PRECEDENCE = (1, 3, 2, 4, 5)
"""Where lesion labels overlap, the first in this order wins."""


@dataclass
class Blob:
    """One lesion: an irregular ellipsoid in template mm with a few named shells.

    ``rho(x)`` is the normalised radius (1 at the edge), made irregular by a smooth
    field; ``shells`` maps an upper rho bound to a lesion label, innermost first.
    """

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    shells: list[tuple[float, int]]
    irregularity: float = 0.0
    texture: SmoothField | None = None
    tissue: str = "any"                # "any", "brain" (GM+WM), or "wm"

    @property
    def reach_mm(self) -> float:
        return float(self.radii.max() * max(rho for rho, _ in self.shells) * (1 + self.irregularity) + 4)

    def rho(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = self.centre
        d = np.stack([x - c[0], y - c[1], z - c[2]], axis=0).reshape(3, -1)
        local = (self.rotation.T @ d) / self.radii[:, None]
        rho = np.sqrt((local**2).sum(0)).astype(np.float32)
        if self.texture is not None and self.irregularity:
            rho *= 1 + np.float32(self.irregularity) * self.texture.value(x.ravel(), y.ravel(), z.ravel())[0]
        return rho


@dataclass
class LesionSet:
    """All lesions of one subject and the label each shell gets."""

    blobs: list[Blob] = field(default_factory=list)
    labels: tuple[int, ...] = ()


def lesion_fractions(lesions: LesionSet, u: tuple[np.ndarray, ...], tissue: dict[str, np.ndarray],
                     edge_mm: float) -> dict[int, np.ndarray]:
    """Fraction (0-1) of each voxel covered by each lesion label, with soft edges.

    Args:
        lesions: the subject's lesions, in template mm.
        u: the voxels' template coordinates (three arrays of one shape, mm).
        tissue: sampled ``gm`` and ``wm`` fractions at those voxels (lesions that
            live in tissue are confined to it).
        edge_mm: width of the soft edge (about one voxel).

    Returns:
        ``{label: fraction array}``; where shells overlap, the inner shell wins.
    """
    shape = u[0].shape
    out = {label: np.zeros(shape, np.float32) for label in lesions.labels}
    if not lesions.blobs:
        return out
    flat = [a.ravel() for a in u]
    for blob in lesions.blobs:
        reach = blob.reach_mm
        near = np.ones(flat[0].shape, bool)
        for axis in range(3):
            near &= np.abs(flat[axis] - np.float32(blob.centre[axis])) < reach
        idx = np.flatnonzero(near)
        if idx.size == 0:
            continue
        rho = blob.rho(flat[0][idx], flat[1][idx], flat[2][idx])
        scale = np.float32(edge_mm / max(float(blob.radii.mean()), 1e-3))
        if blob.tissue == "wm":
            host = np.clip(tissue["wm"].ravel()[idx] * 1.6, 0, 1)
        elif blob.tissue == "brain":
            host = np.clip((tissue["wm"].ravel()[idx] + tissue["gm"].ravel()[idx]) * 1.3, 0, 1)
        else:
            host = np.ones(idx.size, np.float32)
        taken = np.zeros(idx.size, np.float32)
        for bound, label in blob.shells:
            inside = np.clip(0.5 + (bound - rho) / scale, 0, 1) * host
            frac = np.clip(inside - taken, 0, 1)
            target = out[label].reshape(-1)
            target[idx] = np.maximum(target[idx], frac)
            taken = np.maximum(taken, inside)
    return out


# --------------------------------------------------------------------------- lesion placement


def _candidates(tpl: anatomy.Template, kind: str) -> np.ndarray:
    """World points (N, 3) where a lesion centre of ``kind`` may sit."""
    wm, gm, sdist, vent = (tpl.channel(n) for n in ("wm", "gm", "sdist", "vent"))
    z = tpl.affine[2, 2] * np.arange(wm.shape[2]) + tpl.affine[2, 3]
    cerebrum = (z > -15)[None, None, :]
    if kind == "tumour":
        mask = (wm > 0.5) & (sdist < -12) & cerebrum
    elif kind == "ms_peri":
        mask = (wm > 0.6) & (vent > 0.02) & (vent < 0.5) & cerebrum
    else:  # "ms_any"
        mask = (wm > 0.7) & (sdist < -6) & cerebrum
    ijk = np.argwhere(mask)
    return ijk @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return anatomy.rotation_matrix(rng.uniform(-180, 180, 3))


def make_lesions(diagnosis: str, subtlety: float, tpl: anatomy.Template,
                 rng: np.random.Generator) -> tuple[LesionSet, anatomy.MassEffect | None]:
    """The lesions of one subject in template mm (and a tumour's mass effect)."""
    size = 1.0 - 0.55 * subtlety
    if diagnosis == "tumour":
        pts = _candidates(tpl, "tumour")
        centre = pts[rng.integers(len(pts))] + rng.normal(0, 2, 3)
        radius = rng.uniform(10, 22) * size
        core = rng.uniform(0.35, 0.65)
        tumour = Blob(centre, radius * rng.uniform(0.8, 1.2, 3), _random_rotation(rng),
                              [(core, 1), (1.0, 3)], 0.25,
                              SmoothField.random(rng, 5, radius * 1.3))
        oedema = Blob(centre, radius * rng.uniform(1.4, 2.0, 3), _random_rotation(rng),
                              [(1.0, 2)], 0.35, SmoothField.random(rng, 5, radius * 1.5), "wm")
        push = anatomy.MassEffect(centre, 1.1 * radius, rng.uniform(0.3, 0.55) * (1 - 0.5 * subtlety))
        return LesionSet([tumour, oedema], (1, 2, 3)), push
    if diagnosis == "stroke":
        side = rng.choice([-1.0, 1.0])
        territory = rng.choice(["MCA", "MCA", "ACA", "PCA", "lacunar" if subtlety > 0.6 else "MCA"])
        box = {"MCA": ((28, 48), (-35, 25), (-5, 45)), "ACA": ((4, 14), (-10, 45), (25, 55)),
               "PCA": ((8, 28), (-92, -65), (-8, 18)), "lacunar": ((14, 28), (-20, 12), (-2, 16))}
        radius = {"lacunar": rng.uniform(4, 7)}.get(territory, rng.uniform(10, 24) * size)
        for _ in range(50):
            centre = np.array([side * rng.uniform(*box[territory][0]), rng.uniform(*box[territory][1]),
                               rng.uniform(*box[territory][2])])
            if tpl.value_at("gm", centre) + tpl.value_at("wm", centre) > 0.6:
                break
        blob = Blob(centre, radius * np.array([rng.uniform(0.6, 1.0), 1.0, 1.0]) * rng.uniform(0.8, 1.25, 3),
                            _random_rotation(rng), [(1.0, 4)], 0.3,
                            SmoothField.random(rng, 5, radius * 1.2), "brain")
        return LesionSet([blob], (4,)), None
    if diagnosis == "ms":
        n = max(4, int(round(rng.uniform(10, 30) * (1 - 0.4 * subtlety))))
        peri, anywhere = _candidates(tpl, "ms_peri"), _candidates(tpl, "ms_any")
        blobs = []
        for _ in range(n):
            pts = peri if rng.random() < 0.6 else anywhere
            centre = pts[rng.integers(len(pts))] + rng.normal(0, 1, 3)
            r = rng.uniform(3.0, 8.0) * (1.0 - 0.4 * subtlety)
            blobs.append(Blob(centre, r * np.array([1.0, rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.9)]),
                                      _random_rotation(rng), [(1.0, 5)], 0.15,
                                      SmoothField.random(rng, 3, r * 2), "wm"))
        return LesionSet(blobs, (5,)), None
    return LesionSet(), None
