"""Real anatomy for the simulated cohort: the MNI152 template, subject warps and lesion shapes.

The simulated cohort (``helpers.simulate``) is built on the ICBM152 2009a
symmetric template that ships inside the ``nilearn`` wheel: its grey-matter and
white-matter probability maps and its skull-stripped T1. Nothing is downloaded.

This module holds the geometry:

- :func:`load_template` turns the 1 mm template into tissue maps at the cohort's
  voxel spacing (CSF, grey matter, white matter, a signed distance to the brain
  surface used for the head layers and cortical thinning, a ventricle field used
  for age-related ventricle growth, and a texture map taken from the real T1),
  cached once as a compressed ``.npz`` under ``data/cache/``.
- :class:`SubjectWarp` maps every voxel of a subject's scan to the template: a
  random affine (rotation, scale, translation), a smooth elastic deformation and,
  for tumours, the mass effect that pushes neighbouring tissue away.

Lesions live in ``helpers.lesions``; the simulated scanner in ``helpers.scanner``.

Example:
    >>> tpl = load_template(4.0)                     # doctest: +SKIP
    >>> tpl.channels.shape[0], tpl.names[:3]         # doctest: +SKIP
    (6, ('csf', 'gm', 'wm'))
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from helpers.io import DataError, atomic_path
from helpers.paths import data_dir

TEMPLATE_VERSION = 1
"""Bump when the cached template maps change, so old caches are rebuilt."""
CHANNELS = ("csf", "gm", "wm", "sdist", "vent", "tex")
_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
_MEMORY: dict[tuple[float, str], Template] = {}


@dataclass(frozen=True)
class Template:
    """Tissue maps of the MNI152 template on a grid of ``spacing_mm``.

    Attributes:
        spacing_mm: voxel edge of the grid, in mm.
        affine: voxel index -> MNI world (mm).
        channels: float32 array (C, X, Y, Z), one map per name in ``names``:
            ``csf``, ``gm``, ``wm`` (tissue fractions 0-1), ``sdist`` (signed
            distance to the brain surface in mm, negative inside), ``vent`` (a
            smooth field peaking in the ventricles) and ``tex`` (the real T1's detail
            relative to a plain three-tissue model).
        names: the channel names.
    """

    spacing_mm: float
    affine: np.ndarray
    channels: np.ndarray
    names: tuple[str, ...] = CHANNELS

    def channel(self, name: str) -> np.ndarray:
        """One map by name, e.g. ``tpl.channel("wm")``."""
        return self.channels[self.names.index(name)]

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Template voxel coordinates (float) of world points ``xyz`` of shape (..., 3)."""
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def value_at(self, name: str, xyz: np.ndarray) -> np.ndarray:
        """Nearest-voxel value of a map at world points ``xyz`` (..., 3); 0 outside the grid."""
        ijk = np.rint(self.world_to_voxel(np.asarray(xyz, dtype=float))).astype(int)
        shape = np.array(self.channels.shape[1:])
        inside = np.all((ijk >= 0) & (ijk < shape), axis=-1)
        out = np.zeros(ijk.shape[:-1], np.float32)
        i = ijk[inside]
        out[inside] = self.channel(name)[i[:, 0], i[:, 1], i[:, 2]]
        return out


def nilearn_template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 files."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn", "nilearn is not installed: run `make setup` (it ships the MNI template)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in _FILES.values() if not (folder / name).exists()]
    if missing:
        raise DataError(folder, f"the MNI152 template files are missing ({', '.join(missing)}); "
                                "reinstall nilearn with `make setup`")
    return folder


def _spacing_tag(spacing_mm: float) -> str:
    return f"{spacing_mm:g}".replace(".", "p")


def _build_template(spacing_mm: float) -> Template:
    import nibabel as nib

    folder = nilearn_template_dir()
    imgs = {k: nib.load(folder / name) for k, name in _FILES.items()}
    affine1 = imgs["t1"].affine
    raw = {k: np.asanyarray(img.dataobj, dtype=np.float32) / 255.0 for k, img in imgs.items()}
    inside = raw["t1"] > 0
    gm, wm = raw["gm"], raw["wm"]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * inside
    t1 = raw["t1"]
    stack = np.stack([csf, gm, wm, inside.astype(np.float32), t1])
    del raw, imgs

    step = float(spacing_mm)
    shape1 = np.array(t1.shape)
    shape = tuple(int(n) for n in (shape1 - 1) // step + 1)
    if step > 1:  # anti-alias before subsampling, like a scanner's larger voxels
        sigma = 0.42 * step
        stack = np.stack([ndi.gaussian_filter(ch, sigma, mode="constant") for ch in stack])
    if float(step).is_integer():
        s = int(step)
        small = np.ascontiguousarray(stack[:, ::s, ::s, ::s][:, : shape[0], : shape[1], : shape[2]])
    else:
        grid = np.indices(shape, dtype=np.float32) * np.float32(step)
        small = np.stack([ndi.map_coordinates(ch, grid, order=1, prefilter=False) for ch in stack])
    csf, gm, wm, inside_f, t1 = small
    affine = affine1 @ np.diag([step, step, step, 1.0])

    brain = ndi.binary_fill_holes(inside_f > 0.5)
    sdist = (ndi.distance_transform_edt(~brain) - ndi.distance_transform_edt(brain)) * step
    sdist = ndi.gaussian_filter(sdist.astype(np.float32), 1.5 / step)

    # Lateral and third ventricles: CSF deep inside the cerebrum, near the midline.
    xyz = [affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(shape)]
    box = ((np.abs(xyz[0]) < 32)[:, None, None] & ((xyz[1] > -50) & (xyz[1] < 35))[None, :, None]
           & ((xyz[2] > -5) & (xyz[2] < 35))[None, None, :])
    deep_csf = (csf > 0.3) & (-sdist > 12.0) & box
    labels, n = ndi.label(deep_csf)
    if n:
        sizes = ndi.sum(deep_csf, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.15 * sizes.max()) + 1
        deep_csf = np.isin(labels, keep)
    vent = ndi.gaussian_filter(deep_csf.astype(np.float32), 3.0 / step)
    vent /= max(float(vent.max()), 1e-6)

    # The real T1 has detail (deep grey nuclei, cortical ribbon) a three-tissue model misses.
    model = 0.25 * csf + 0.55 * gm + 0.8 * wm
    tex = np.where(inside_f > 0.5, t1 / np.maximum(model, 0.2), 1.0)
    tex = np.clip(tex / np.median(tex[inside_f > 0.5]), 0.75, 1.25).astype(np.float32)

    channels = np.stack([csf, gm, wm, sdist, vent, tex]).astype(np.float32)
    return Template(step, affine, channels)


def template_cache_path(spacing_mm: float, cache_dir: str | Path | None = None) -> Path:
    """Where the cached template maps for one spacing live (``data/cache/`` by default)."""
    folder = Path(cache_dir) if cache_dir is not None else data_dir() / "cache"
    return folder / f"mni152_maps_{_spacing_tag(spacing_mm)}mm_v{TEMPLATE_VERSION}.npz"


def load_template(spacing_mm: float = 2.0, cache_dir: str | Path | None = None) -> Template:
    """The template tissue maps at ``spacing_mm``: from memory, the ``.npz`` cache, or built.

    Building takes 1-3 s (it reads the 1 mm template from the nilearn package);
    the cache is written atomically and later loads take about 0.1 s.

    Args:
        spacing_mm: voxel edge in mm (1.0 for the full profile, 2.0 otherwise).
        cache_dir: folder of the cache (default ``data/cache``).

    Example:
        >>> load_template(4.0).channels.shape[1:]        # doctest: +SKIP
        (50, 59, 48)
    """
    path = template_cache_path(spacing_mm, cache_dir)
    key = (float(spacing_mm), str(path))
    if key in _MEMORY:
        return _MEMORY[key]
    tpl = None
    if path.exists():
        try:
            with np.load(path) as npz:
                tpl = Template(float(npz["spacing_mm"]), npz["affine"], npz["channels"])
        except (OSError, ValueError, KeyError, EOFError):
            tpl = None  # a damaged cache is simply rebuilt
    if tpl is None:
        tpl = _build_template(spacing_mm)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, spacing_mm=tpl.spacing_mm, affine=tpl.affine,
                                    channels=tpl.channels)
    _MEMORY[key] = tpl
    return tpl


# --------------------------------------------------------------------------- warps


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """3x3 rotation from angles (degrees) about the x, y and z axes, applied in that order."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SmoothField:
    """A smooth random 3D field: a sum of a few plane waves (cheap, no grid needed).

    ``value(x)`` for points in mm; ``wavelength_mm`` sets how wavy it is.
    """

    k: np.ndarray        # (n, 3) wave vectors, rad/mm
    phase: np.ndarray    # (n,)
    amp: np.ndarray      # (n, m): amplitude of each wave in each of m components

    @classmethod
    def random(cls, rng: np.random.Generator, n_waves: int, wavelength_mm: float,
               components: int = 1, amplitude: float = 1.0) -> SmoothField:
        direction = rng.normal(size=(n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        length = wavelength_mm * rng.uniform(0.7, 1.4, size=(n_waves, 1))
        k = 2 * np.pi * direction / length
        amp = rng.normal(size=(n_waves, components)) * amplitude / np.sqrt(n_waves / 2)
        return cls(k, rng.uniform(0, 2 * np.pi, n_waves), amp)

    def value(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        """The field's components at points given as three broadcastable arrays (mm)."""
        out: list[np.ndarray] = [np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
                                 for _ in range(self.amp.shape[1])]
        for (kx, ky, kz), ph, amp in zip(self.k.astype(np.float32), self.phase, self.amp, strict=True):
            wave = np.sin(kx * x + ky * y + kz * z + np.float32(ph))
            for comp, a in zip(out, amp, strict=True):
                comp += np.float32(a) * wave
        return out


@dataclass
class MassEffect:
    """Tissue pushed away from a tumour centre (radial, smooth, invertible).

    A point at distance r from ``centre`` in the subject came from distance
    ``r * (1 - strength * exp(-r^2 / (2 width^2)))`` in the healthy anatomy; with
    ``strength < 1`` this is one-to-one, and far from the tumour nothing moves.
    """

    centre: np.ndarray
    width_mm: float
    strength: float

    def source(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        c = self.centre.astype(np.float32)
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        r2 = dx * dx + dy * dy + dz * dz
        shrink = 1 - np.float32(self.strength) * np.exp(-r2 / np.float32(2 * self.width_mm**2))
        return c[0] + dx * shrink, c[1] + dy * shrink, c[2] + dz * shrink


@dataclass
class SubjectWarp:
    """Maps scanner world (mm) of one subject to template world (mm).

    world = rotation @ diag(scale) @ template + translation, then a smooth elastic
    displacement and an optional tumour mass effect in template space.
    """

    matrix: np.ndarray                 # 4x4 template -> subject world
    elastic: SmoothField
    mass_effect: MassEffect | None = None

    @classmethod
    def random(cls, rng: np.random.Generator, head_scale: float = 1.0,
               max_rotation_deg: float = 8.0, max_shift_mm: float = 6.0,
               elastic_mm: float = 2.5) -> SubjectWarp:
        angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
        scale = head_scale * rng.uniform(0.94, 1.06, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = rotation_matrix(angles) @ np.diag(scale)
        matrix[:3, 3] = rng.uniform(-max_shift_mm, max_shift_mm, 3)
        elastic = SmoothField.random(rng, 6, 90.0, components=3, amplitude=elastic_mm)
        return cls(matrix, elastic)

    def to_template(self, world: tuple[np.ndarray, np.ndarray, np.ndarray],
                    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Template coordinates of subject world points.

        Returns:
            ``(deformed, healthy)``: where each point sits in template space with the
            lesion's mass effect (lesions are drawn there), and where its tissue came
            from in the healthy template (tissue maps are sampled there).
        """
        inv = np.linalg.inv(self.matrix).astype(np.float32)
        wx, wy, wz = world
        u = [inv[i, 0] * wx + inv[i, 1] * wy + inv[i, 2] * wz + inv[i, 3] for i in range(3)]
        du = self.elastic.value(*u)
        u = tuple(a + d for a, d in zip(u, du, strict=True))
        healthy = self.mass_effect.source(*u) if self.mass_effect is not None else u
        return u, healthy
