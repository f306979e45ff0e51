"""Small fake datasets in every layout load_dataset reads, built in a temp folder by the tests.

Each builder returns the path to hand to ``load_dataset``. Volumes are tiny
(12^3) so a whole fixture writes in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

SHAPE = (12, 12, 12)


def head(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """A bright ball in a dark box, with a little noise."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    return (100.0 * (r < min(shape) / 3) + 5 + rng.normal(0, 1, shape)).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def make_bids(root: Path, n_subjects: int = 8, sessions: int = 0, labels=("healthy", "tumour")) -> Path:
    """BIDS with participants.tsv, T1w + FLAIR, lesion dseg and brain masks in derivatives."""
    rows = ["participant_id\tdiagnosis\tsite\tage"]
    for i in range(n_subjects):
        sub = f"sub-{i:03d}"
        rows.append(f"{sub}\t{labels[i % len(labels)]}\tsite{i % 2}\t{40 + i}")
        for s in range(max(sessions, 1)):
            ses = f"ses-{s + 1:02d}" if sessions else ""
            anat = root / sub / ses / "anat" if ses else root / sub / "anat"
            stem = f"{sub}_{ses}_" if ses else f"{sub}_"
            vol = head(i * 10 + s)
            write_nifti(anat / f"{stem}T1w.nii.gz", vol)
            write_nifti(anat / f"{stem}FLAIR.nii.gz", vol * 0.5 + 3)
            der = root / "derivatives" / "labels" / sub / ses / "anat" if ses else \
                root / "derivatives" / "labels" / sub / "anat"
            write_nifti(der / f"{stem}dseg.nii.gz", ((vol > 50) * (i % 3)).astype(np.uint8))
            write_nifti(der / f"{stem}desc-brain_mask.nii.gz", (vol > 50).astype(np.uint8))
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "fake", "BIDSVersion": "1.8.0"}))
    (root / "derivatives" / "labels").mkdir(parents=True, exist_ok=True)
    (root / "derivatives" / "labels" / "dseg.tsv").write_text("index\tname\n0\tbackground\n1\tnecrotic core\n2\toedema\n")
    return root


def make_decathlon(root: Path, n: int = 6) -> Path:
    """Task01_BrainTumour-like: 4D images (X, Y, Z, 4) and dataset.json."""
    training = []
    for i in range(n):
        vol = np.stack([head(i) * (k + 1) for k in range(4)], axis=-1)
        write_nifti(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", vol)
        write_nifti(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", ((vol[..., 0] > 50) * (1 + i % 3)).astype(np.uint8))
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    info = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": n, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def make_brats(root: Path, year: int = 2021, n: int = 6) -> Path:
    """BraTS case folders with 2021 (_t1ce) or 2023 (-t1c) names; 2023 gets two time points of one subject."""
    for i in range(n):
        if year == 2021:
            case, sep, mods, labels = f"BraTS2021_{i:05d}", "_", ("t1", "t1ce", "t2", "flair"), (0, 1, 2, 4)
        else:
            case, sep, mods, labels = f"BraTS-GLI-{i // 2:05d}-{i % 2:03d}", "-", ("t1n", "t1c", "t2w", "t2f"), (0, 1, 2, 3)
        vol = head(i)
        for k, m in enumerate(mods):
            write_nifti(root / case / f"{case}{sep}{m}.nii.gz", vol + k)
        write_nifti(root / case / f"{case}{sep}seg.nii.gz", ((vol > 50) * labels[1 + i % 3]).astype(np.uint8))
    return root


def png(path: Path, seed: int, size=(32, 32), rgb: bool = False, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((4, 4)) * 255).astype(np.uint8)
    arr = np.kron(arr, np.ones((size[0] // 4, size[1] // 4), np.uint8))
    im = Image.fromarray(arr)
    if rgb:
        im = im.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_imagefolder(root: Path, with_splits: bool = True, per_class: int = 6) -> Path:
    """Class folders of PNG/JPG, optionally inside Training/ and Testing/."""
    classes = ("glioma", "meningioma", "no_tumor")
    seed = 0
    for split in (("Training", "Testing") if with_splits else ("",)):
        for c in classes:
            for k in range(per_class if split != "Testing" else 2):
                seed += 1
                ext = ".jpg" if k % 2 else ".png"
                png(root / split / c / f"img{seed:03d}{ext}", seed, rgb=bool(k % 3 == 0))
    return root
