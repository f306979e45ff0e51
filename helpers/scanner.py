"""The simulated scanner: one subject's head, contrasts, acquisition and header orientation.

:func:`scan_subject` turns a :class:`SubjectPlan` into images and label maps in memory:

- anatomy: the MNI152 tissue maps sampled through the subject's warp
  (``helpers.anatomy``), with age-related atrophy (ventricles grow, cortex thins)
  and lesions (``helpers.lesions``) with soft, partial-volume edges;
- head: CSF, skull (with fatty marrow) and scalp layers around the brain, so brain
  extraction is a real step;
- contrasts: T1w, T2w and FLAIR from tissue fractions with site- and subject-specific
  tissue intensities (CSF dark on T1w, bright on T2w, suppressed on FLAIR);
- acquisition: one of four sites (intensity scale, contrast, SNR, voxel size, thick
  slices averaged over several thin positions), a smooth multiplicative bias field,
  Rician noise, and a header orientation (RAS, LPS, LAS or permuted axes) applied
  exactly by flipping and permuting axes, with the affine to match.

Example:
    >>> plan = SubjectPlan(0, "sub-001", "tumour", 60, "F", "A", "LPS", 0.2)  # doctest: +SKIP
    >>> scan = scan_subject(plan, spacing_mm=4.0, seed=0)                     # doctest: +SKIP
    >>> sorted(scan["images"])                                                # doctest: +SKIP
    ['FLAIR', 'T1w', 'T2w']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage as ndi

from helpers import anatomy
from helpers.lesions import LABEL_PRECEDENCE, lesion_fractions, make_lesions

ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "PIR", "SLA")
"""Header orientations used: the usual three plus two with permuted axes."""
MODALITIES: tuple[str, ...] = ("T1w", "T2w", "FLAIR")
BRAIN_MARGIN_MM = 8.0
"""Beyond this distance outside the brain the template's tissue maps are exactly empty."""
FOV_MM = (196.0, 232.0, 188.0)
FOV_ORIGIN = (-98.0, -134.0, -72.0)

# Mean intensities (T1w, T2w, FLAIR) of tissues, head layers and lesion labels.
TISSUE_MEANS = {
    "csf": (0.22, 1.00, 0.08), "gm": (0.52, 0.60, 0.62), "wm": (0.80, 0.40, 0.45),
    "skull": (0.05, 0.05, 0.05), "fat": (0.92, 0.70, 0.62),
}
LESION_MEANS = {
    1: (0.22, 1.00, 0.45), 2: (0.55, 0.90, 0.90), 3: (0.62, 0.75, 0.80),
    4: (0.40, 0.92, 0.90), 5: (0.62, 0.85, 0.90),
}


@dataclass(frozen=True)
class Site:
    """A simulated scanner: intensity scale, contrast, noise, resolution, bias field."""

    name: str
    description: str
    scale: float
    snr: tuple[float, float]
    voxel_factor: tuple[float, float, float]
    gamma: float
    bias: float


SITES: tuple[Site, ...] = (
    Site("A", "3T, isotropic voxels, high SNR", 1000.0, (25, 40), (1, 1, 1), 1.0, 0.20),
    Site("B", "1.5T, isotropic voxels, low SNR, flatter contrast", 400.0, (10, 18), (1, 1, 1), 0.85, 0.15),
    Site("C", "1.5T, thick axial slices (2.5x the spacing)", 2000.0, (15, 28), (1, 1, 2.5), 0.95, 0.25),
    Site("D", "3T, larger voxels (1.25x), strong bias field", 1500.0, (20, 32), (1.25, 1.25, 1.25), 1.1, 0.35),
)


@dataclass(frozen=True)
class SubjectPlan:
    """What one subject will be, decided before any image is made."""

    index: int
    participant_id: str
    diagnosis: str
    age: int
    sex: str
    site: str
    orientation: str
    subtlety: float


def _band(d: np.ndarray, lo: float, hi: float, edge: float) -> np.ndarray:
    return np.clip(0.5 + (d - lo) / edge, 0, 1) * np.clip(0.5 + (hi - d) / edge, 0, 1)


def _orient(arr: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-ordered array with the axis order and directions of ``code``."""
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(code)))
    out = np.ascontiguousarray(ornt.apply_orientation(arr, transform))
    new_affine = affine @ ornt.inv_ornt_aff(transform, arr.shape)
    return out, new_affine


def scan_subject(plan: SubjectPlan, spacing_mm: float, seed: int,
                 tpl: anatomy.Template | None = None) -> dict[str, Any]:
    """Make one subject's images and label maps in memory.

    Args:
        plan: who the subject is (diagnosis, age, sex, site, orientation, subtlety).
        spacing_mm: the cohort's base voxel spacing (the site may enlarge it).
        seed: the cohort seed; with ``plan.index`` it seeds everything random here.
        tpl: the template maps at ``spacing_mm`` (default: loaded or built once).

    Returns:
        a dict with ``images`` (modality -> float32 array), ``labels`` (name ->
        uint8 array: ``dseg``, ``brain_mask``, ``tissue``), ``affine`` (shared by
        all of them, in the plan's orientation), ``voxel_mm`` and ``row`` (the
        participants.tsv entries that depend on the images).
    """
    tpl = tpl if tpl is not None else anatomy.load_template(spacing_mm)
    rng = np.random.default_rng([seed, plan.index, 1])
    site = next(s for s in SITES if s.name == plan.site)
    voxel = np.array(site.voxel_factor) * spacing_mm
    shape = tuple(int(f // v) + 1 for f, v in zip(FOV_MM, voxel, strict=True))
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = FOV_ORIGIN

    warp = anatomy.SubjectWarp.random(rng, head_scale=0.95 if plan.sex == "M" else 0.9)
    lesions, warp.mass_effect = make_lesions(plan.diagnosis, plan.subtlety, tpl, rng)

    # Thick slices average several thin positions (partial volume along the slice).
    n_sub = max(1, int(round(site.voxel_factor[2] / 1.0)))
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2) * voxel[2] / n_sub
    names = ("csf", "gm", "wm", "sdist", "vent", "tex")
    cvals = {"sdist": 60.0, "tex": 1.0}
    acc: dict[Any, np.ndarray] = {}
    inv = np.linalg.inv(tpl.affine).astype(np.float32)
    for offset in offsets:
        world = [(affine[i, i] * np.arange(n) + affine[i, 3]).astype(np.float32) for i, n in enumerate(shape)]
        world[2] = world[2] + np.float32(offset)
        wx, wy, wz = world[0][:, None, None], world[1][None, :, None], world[2][None, None, :]
        u, healthy = warp.to_template((wx, wy, wz))
        coords = np.stack([inv[i, 0] * healthy[0] + inv[i, 1] * healthy[1] + inv[i, 2] * healthy[2] + inv[i, 3]
                           for i in range(3)])
        sampled = {"sdist": ndi.map_coordinates(tpl.channel("sdist"), coords, order=1, prefilter=False,
                                                cval=cvals["sdist"], output=np.float32)}
        # Tissue maps are exactly 0 (texture exactly 1) more than a few mm outside the
        # brain: sample them only nearer than BRAIN_MARGIN_MM (same values, half the work).
        near = sampled["sdist"] < BRAIN_MARGIN_MM
        points = coords[:, near]
        for n in names[:3] + names[4:]:
            full = np.full(shape, cvals.get(n, 0.0), np.float32)
            full[near] = ndi.map_coordinates(tpl.channel(n), points, order=1, prefilter=False,
                                             cval=cvals.get(n, 0.0), output=np.float32)
            sampled[n] = full
        fracs = lesion_fractions(lesions, u, sampled, edge_mm=float(voxel.mean()))
        for key, value in [*sampled.items(), *fracs.items()]:
            acc[key] = acc[key] + value if key in acc else value
    if n_sub > 1:
        acc = {k: v / np.float32(n_sub) for k, v in acc.items()}
    csf, gm, wm, sdist, vent, tex = (acc[n] for n in names)
    fracs = {label: acc[label] for label in lesions.labels}

    # Age-related atrophy: larger ventricles, thinner cortex.
    atrophy = float(np.clip((plan.age - 25) / 60 * rng.uniform(0.6, 1.3), 0, 1))
    grow = np.clip((vent - (0.75 - 0.45 * atrophy)) / 0.08, 0, 1)
    gm *= 1 - grow
    wm *= 1 - grow
    thin_mm = 2.5 * atrophy
    if thin_mm > 0.1:
        gm *= 1 - 0.85 * np.clip(1 + sdist / thin_mm, 0, 1)
    brain_w = np.clip(0.5 - sdist / float(voxel.mean()), 0, 1)
    csf = np.clip(brain_w - gm - wm, 0, 1)

    # Lesion precedence: inner sub-regions win where shells overlap.
    taken = np.zeros(shape, np.float32)
    for label in LABEL_PRECEDENCE:
        if label in fracs:
            fracs[label] = np.clip(np.minimum(fracs[label], 1 - taken), 0, None) * brain_w
            taken += fracs[label]

    t_csf, t_skull, t_fat = rng.uniform(1.5, 3.0), rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.0)
    edge = float(voxel.mean())
    layers = {
        "csf": _band(sdist, 0, t_csf, edge),
        "skull": _band(sdist, t_csf, t_csf + t_skull, edge),
        "fat": _band(sdist, t_csf + t_skull, t_csf + t_skull + t_fat, edge)
        + _band(sdist, t_csf + 0.4 * t_skull, t_csf + 0.6 * t_skull, edge) * 0.6,
    }
    site_rng = np.random.default_rng([seed, 9000 + SITES.index(site)])
    site_jitter = {k: site_rng.normal(1, 0.06, 3) for k in TISSUE_MEANS}
    contrast = 1.0 - 0.6 * plan.subtlety
    bias = anatomy.SmoothField.random(rng, 4, 260.0, components=3, amplitude=site.bias)
    bias_fields = bias.value(*np.meshgrid(*[affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(shape)],
                                          indexing="ij", sparse=True))
    snr = float(rng.uniform(*site.snr))
    images = {}
    for m, modality in enumerate(MODALITIES):
        mean = {k: TISSUE_MEANS[k][m] * site_jitter[k][m] * rng.normal(1, 0.03) for k in TISSUE_MEANS}
        brain = csf * mean["csf"] + gm * mean["gm"] + wm * mean["wm"]
        brain *= tex ** (1.0 if modality == "T1w" else -0.5)
        reference = mean["wm"] if modality == "T1w" else mean["gm"]
        local = brain / np.maximum(brain_w, 1e-3)
        for label, frac in fracs.items():
            brain += frac * np.float32(contrast) * (np.float32(LESION_MEANS[label][m] * site_jitter["wm"][m]) - local)
        img = brain + sum(layers[k] * np.float32(mean[k]) for k in layers)
        img = np.clip(img, 0, None) ** np.float32(site.gamma)
        img *= np.exp(bias_fields[m]).astype(np.float32) * np.float32(site.scale)
        sigma = np.float32(site.scale * reference / snr)
        noise = rng.standard_normal((2, *shape), dtype=np.float32) * sigma
        images[modality] = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)

    dseg = np.zeros(shape, np.uint8)
    for label in reversed(LABEL_PRECEDENCE):
        if label in fracs:
            dseg[fracs[label] >= 0.5] = label
    brain_mask = brain_w >= 0.5
    tissue = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8) * brain_mask
    voxel_ml = float(np.prod(voxel)) / 1000.0
    row = {
        "lesion_volume_ml": round(float(np.count_nonzero(dseg)) * voxel_ml, 2),
        "n_lesions": len(lesions.blobs) if plan.diagnosis != "tumour" else 1,
        "lesion_contrast": round(contrast, 3) if plan.diagnosis != "healthy" else 0.0,
        "snr": round(snr, 1),
        "brain_volume_ml": round(float(np.count_nonzero(brain_mask)) * voxel_ml, 1),
    }
    out_images, out_labels = {}, {}
    for key, arr in images.items():
        out_images[key], new_affine = _orient(arr, affine, plan.orientation)
    for key, arr in (("dseg", dseg), ("brain_mask", brain_mask.astype(np.uint8)), ("tissue", tissue)):
        out_labels[key], _ = _orient(arr, affine, plan.orientation)
    return {"images": out_images, "labels": out_labels, "affine": new_affine,
            "voxel_mm": tuple(float(v) for v in voxel), "row": row}
