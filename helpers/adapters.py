"""Dataset layouts: recognise a folder's layout and read it into a raw table of cases.

The readers behind :func:`helpers.datasets.load_dataset`, one per layout:

- **BIDS** (``participants.tsv``, ``sub-*/[ses-*/]anat/*.nii.gz``, labels and brain
  masks under ``derivatives/*/``, label names from ``derivatives/*/dseg.tsv``);
- **CSV manifests** (``image`` or ``image_<modality>`` columns, or a ``modality``
  column; optional ``mask``, ``label``, ``subject``, ``session``, ``split``;
  paths relative to the CSV);
- **Medical Segmentation Decathlon** (``dataset.json``, ``imagesTr``/``labelsTr``,
  4D multimodal volumes);
- **BraTS 2021 / 2023** case folders (``<case>_t1ce`` or ``<case>-t1c`` names);
- **image folders** (``<class>/<image>.png``, optionally in ``Training/`` and ``Testing/``).

Each reader returns ``(DataFrame, meta)``; :mod:`helpers.datasets` adds the split,
the checks and the :class:`~helpers.datasets.CaseTable`.

Example:
    >>> detect_kind("data/simulated/n24_2mm_seed42")   # doctest: +SKIP
    'bids'
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.io import DataError, full_suffix

BASE_COLUMNS = ("case", "subject", "session", "split", "label", "mask")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI = (".nii", ".nii.gz")
BRATS_MODALITIES = {
    # 2021 suffix / 2023 suffix -> the name used across the series
    "t1": "T1w", "t1n": "T1w",
    "t1ce": "T1gd", "t1c": "T1gd",
    "t2": "T2w", "t2w": "T2w",
    "flair": "FLAIR", "t2f": "FLAIR",
}
BRATS_ORDER = ("T1w", "T1gd", "T2w", "FLAIR")
BRATS_LABELS = {
    2021: {0: "background", 1: "necrotic core", 2: "oedema", 4: "enhancing tumour"},
    2023: {0: "background", 1: "necrotic core", 2: "oedema", 3: "enhancing tumour"},
}
SPLIT_ALIASES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test", "ts": "test",
}


# --------------------------------------------------------------------------- detection


def detect_kind(source: str | os.PathLike) -> str:
    """Guess the layout of a dataset folder or file.

    Rules, in order: a ``.csv``/``.tsv`` file -> ``csv``; a folder with
    ``dataset.json`` and ``imagesTr/`` -> ``decathlon``; with ``participants.tsv``,
    ``dataset_description.json`` or ``sub-*`` folders -> ``bids``; with case
    folders holding ``*_flair``/``*-t2f`` NIfTI files -> ``brats``; with folders of
    PNG/JPG images -> ``imagefolder``; a folder with a single CSV -> ``csv``.

    Raises:
        DataError: the path is missing, empty, or matches no known layout.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(path, "not found (expected a dataset folder or a CSV manifest)")
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv"):
            return "csv"
        raise DataError(path, "is a file but not a CSV manifest; give a dataset folder or a .csv")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(path, "the folder is empty")
    names = {p.name for p in entries}
    if "dataset.json" in names and (path / "imagesTr").is_dir():
        return "decathlon"
    if {"participants.tsv", "dataset_description.json"} & names or any(
        p.is_dir() and p.name.startswith("sub-") for p in entries
    ):
        return "bids"
    for sub in sorted(p for p in entries if p.is_dir())[:20]:
        if any(_brats_suffix(f.name) for f in sub.iterdir()):
            return "brats"
    if _find_images_2d(path, limit=1):
        return "imagefolder"
    csvs = [p for p in entries if p.suffix.lower() == ".csv"]
    if len(csvs) == 1:
        return "csv"
    raise DataError(
        path,
        "no known dataset layout found (BIDS, Decathlon, BraTS, image folders or a CSV "
        "manifest); pass kind=... to say which it is",
    )


def _brats_suffix(name: str) -> str | None:
    low = name.lower()
    if full_suffix(low) not in NIFTI:
        return None
    stem = low[: -len(full_suffix(low))]
    match = re.search(r"[_-](t1ce|t1c|t1n|t1|t2w|t2f|t2|flair|seg)$", stem)
    return match.group(1) if match else None


def _find_images_2d(folder: Path, limit: int | None = None) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_2D_SUFFIXES and not name.startswith("."):
                found.append(Path(root) / name)
                if limit and len(found) >= limit:
                    return found
    return found


# --------------------------------------------------------------------------- adapters


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if full_suffix(p) in NIFTI and not p.name.startswith("."))


def _bids_entities(name: str) -> dict[str, str]:
    stem = name[: -len(full_suffix(name))]
    parts = stem.split("_")
    ents = {k: v for k, _, v in (p.partition("-") for p in parts[:-1]) if v}
    ents["suffix"] = parts[-1]
    return ents


def read_bids(root: Path, label_column: str | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise DataError(root, "BIDS dataset without any sub-* folder")
    rows = []
    for sub in subjects:
        sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir()) or [sub]
        for ses in sessions:
            anat = ses / "anat"
            if not anat.is_dir():
                continue
            row: dict[str, Any] = {"subject": sub.name, "session": ses.name if ses != sub else ""}
            for f in _nifti_files(anat):
                ents = _bids_entities(f.name)
                if "desc" in ents or ents["suffix"] in ("mask", "dseg"):
                    continue
                mod = ents["suffix"] + (f"_{ents['acq']}" if "acq" in ents else "")
                if mod in row:
                    raise DataError(f, f"a second {mod} image for {sub.name} {row['session']}; "
                                       "keep one per session (or name them with acq-)")
                row[mod] = str(f)
            deriv = sorted((root / "derivatives").glob(f"*/{sub.name}/{row['session']}/anat".replace("//", "/")))
            for dfold in deriv:
                for f in _nifti_files(dfold):
                    ents = _bids_entities(f.name)
                    if ents["suffix"] == "dseg" and "desc" not in ents and not row.get("mask"):
                        row["mask"] = str(f)
                    elif ents["suffix"] == "mask" and ents.get("desc") == "brain":
                        row["brain_mask"] = str(f)
                    elif ents["suffix"] == "dseg" and ents.get("desc") == "tissue":
                        row["tissue"] = str(f)
            rows.append(row)
    if not rows:
        raise DataError(root, "BIDS dataset without any anat/ image")
    df = pd.DataFrame(rows)
    mods = _order_modalities([c for c in df.columns if c not in (*BASE_COLUMNS, "brain_mask", "tissue")])
    participants = root / "participants.tsv"
    meta: dict[str, Any] = {"modalities": mods}
    if participants.exists():
        try:
            part = pd.read_csv(participants, sep="\t", dtype={"participant_id": str})
        except Exception as exc:  # noqa: BLE001 (any parse error becomes a DataError)
            raise DataError(participants, f"cannot be read as a TSV table ({exc})") from exc
        if "participant_id" not in part.columns:
            raise DataError(participants, "has no participant_id column")
        dup = part["participant_id"][part["participant_id"].duplicated()]
        if len(dup):
            raise DataError(participants, f"duplicate subject row(s): {', '.join(map(str, dup.unique()))}")
        part = part.rename(columns={"participant_id": "subject"})
        part["subject"] = [s if s.startswith("sub-") else f"sub-{s}" for s in part["subject"].astype(str)]
        label_column = label_column or next(
            (c for c in ("diagnosis", "label", "group", "dx") if c in part.columns), None
        )
        if label_column:
            if label_column not in part.columns:
                raise DataError(participants, f"has no column {label_column!r} for the labels")
            part["label"] = part[label_column].astype(str).where(part[label_column].notna(), "")
        df = df.merge(part, on="subject", how="left", suffixes=("", "_participants"))
    names = _dseg_names(root)
    if names:
        meta["label_names"] = names
    return df, meta


def _dseg_names(root: Path) -> dict[int, str]:
    """Segmentation label names from a BIDS ``dseg.tsv`` (index, name) or a JSON sidecar."""
    for tsv in sorted((root / "derivatives").glob("*/dseg.tsv")) + sorted(root.glob("dseg.tsv")):
        try:
            tab = pd.read_csv(tsv, sep="\t")
            return {int(i): str(n) for i, n in zip(tab["index"], tab["name"], strict=True)}
        except Exception as exc:  # noqa: BLE001
            raise DataError(tsv, f"cannot read segmentation label names ({exc})") from exc
    for js in sorted((root / "derivatives").glob("*/dataset_description.json")):
        info = json.loads(js.read_text(encoding="utf-8"))
        labels = info.get("labels") or info.get("Labels")
        if isinstance(labels, dict):
            return {int(k): str(v) for k, v in labels.items()}
    return {}


def _order_modalities(mods: Sequence[str]) -> list[str]:
    pref = ["T1w", "T1gd", "T2w", "FLAIR", "PDw", "T2starw"]
    return sorted(mods, key=lambda m: (pref.index(m) if m in pref else len(pref), m))


def read_decathlon(root: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    js = root / "dataset.json"
    try:
        info = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(js, f"cannot be read as JSON ({exc})") from exc
    modality = info.get("modality") or {}
    if not modality:
        raise DataError(js, "has no 'modality' entry naming the channels")
    names = {"t1": "T1w", "t1gd": "T1gd", "t2": "T2w", "flair": "FLAIR", "mri": "MRI"}
    order = sorted(modality, key=int)
    mods = [names.get(str(modality[k]).lower(), str(modality[k])) for k in order]
    training = info.get("training") or []
    if not training:
        raise DataError(js, "lists no training cases")
    rows = []
    for item in training:
        img = (root / item["image"]).resolve()
        lab = (root / item["label"]).resolve() if item.get("label") else ""
        case = img.name[: -len(full_suffix(img))]
        row = {"subject": case, "session": "", "mask": str(lab)}
        row.update({m: str(img) for m in mods})
        rows.append(row)
    labels = {int(k): str(v) for k, v in (info.get("labels") or {}).items()}
    return pd.DataFrame(rows), {
        "modalities": mods, "label_names": labels,
        "volume_index": {m: i for i, m in enumerate(mods)}, "four_d": True,
    }


def read_brats(root: Path, year: int | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    rows = []
    seen_year: set[int] = set()
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row: dict[str, Any] = {"case": case_dir.name}
        for f in _nifti_files(case_dir):
            suf = _brats_suffix(f.name)
            if suf is None:
                continue
            if suf == "seg":
                row["mask"] = str(f)
                continue
            seen_year.add(2023 if suf in ("t1n", "t1c", "t2w", "t2f") else 2021)
            row[BRATS_MODALITIES[suf]] = str(f)
        if len(row) > 1:
            # BraTS 2023 names: BraTS-GLI-00000-000 = subject 00000, time point 000
            m = re.match(r"^(.*\d+)-(\d{3})$", case_dir.name)
            row["subject"], row["session"] = (m.group(1), m.group(2)) if m else (case_dir.name, "")
            rows.append(row)
    if not rows:
        raise DataError(root, "no BraTS case folders (<case>/<case>_flair.nii.gz or <case>-t2f.nii.gz)")
    if len(seen_year) > 1:
        raise DataError(root, "mixes BraTS 2021 (_t1ce) and 2023 (-t1c) file names; keep one naming")
    year = year or (seen_year.pop() if seen_year else 2021)
    df = pd.DataFrame(rows)
    mods = [m for m in BRATS_ORDER if m in df.columns]
    return df, {"modalities": mods, "label_names": dict(BRATS_LABELS[year]), "brats_year": year}


def read_imagefolder(root: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    top = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in top if p.name.lower() in SPLIT_ALIASES]
    groups = [(SPLIT_ALIASES[p.name.lower()], p) for p in split_dirs] if split_dirs else [("", root)]
    rows = []
    for split, folder in groups:
        for cls in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = _find_images_2d(cls)
            for f in files:
                rows.append({"subject": f"{cls.name}/{f.stem}" + (f"@{split}" if split else ""),
                             "session": "", "image": str(f), "label": cls.name, "split": split})
    if not rows:
        raise DataError(root, "no class folders with PNG/JPG images (expected <class>/<image>.png)")
    df = pd.DataFrame(rows)
    if not split_dirs:
        df = df.drop(columns="split")
    return df, {"modalities": ["image"], "dims": 2}


def read_csv(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(path, f"expected exactly one CSV manifest in the folder, found {len(csvs)}")
        path = csvs[0]
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(path, f"cannot be read as a table ({exc})") from exc
    if raw.empty:
        raise DataError(path, "the manifest has no rows")
    raw.columns = [c.strip() for c in raw.columns]
    image_cols = [c for c in raw.columns if c == "image" or c.startswith("image_")]
    if not image_cols:
        raise DataError(path, f"has no 'image' column (columns: {', '.join(raw.columns)})")
    base = path.parent

    def resolve(value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    for col in [*image_cols, *(["mask"] if "mask" in raw.columns else [])]:
        raw[col] = raw[col].map(resolve)
    if "subject" not in raw.columns:
        raw["subject"] = [Path(v).name for v in raw[image_cols[0]]]
        warnings.warn(f"{path}: no 'subject' column; each row is treated as its own subject, so "
                      "slices of one patient could land on both sides of the split", stacklevel=3)
    if "session" not in raw.columns:
        raw["session"] = ""
    if "modality" in raw.columns:
        if len(image_cols) != 1:
            raise DataError(path, "has a 'modality' column and several image columns; use one or the other")
        mods = list(dict.fromkeys(raw["modality"]))
        keys = ["subject", "session"]
        dup = raw[raw.duplicated([*keys, "modality"], keep=False)]
        if len(dup):
            s = dup.iloc[0]
            raise DataError(path, f"duplicate rows for subject {s['subject']} modality {s['modality']}")
        wide = raw.pivot(index=keys, columns="modality", values="image").reset_index()
        other = [c for c in raw.columns if c not in (*keys, "modality", "image")]
        for col in other:
            agreed = raw.groupby(keys)[col].nunique()
            if (agreed > 1).any():
                bad = agreed[agreed > 1].index[0]
                raise DataError(path, f"column {col!r} differs between the modality rows of subject {bad[0]}")
        first = raw.groupby(keys, sort=False)[other].first().reset_index()
        df = wide.merge(first, on=keys)
        missing = df[df[mods].isna().any(axis=1)]
        if len(missing):
            raise DataError(path, f"subject {missing.iloc[0]['subject']} lacks a modality of {mods}")
    else:
        mods = ["image"] if image_cols == ["image"] else [c[len("image_"):] for c in image_cols]
        df = raw.rename(columns={c: m for c, m in zip(image_cols, mods, strict=True)})
        dup = df[df.duplicated(["subject", "session"], keep=False)]
        if len(dup) and "subject" in raw.columns and dup[mods[0]].duplicated().any():
            raise DataError(path, f"duplicate rows for subject {dup.iloc[0]['subject']} (same image twice)")
    suffixes = {full_suffix(v) for m in mods for v in df[m]}
    if suffixes <= set(NIFTI):
        dims = 3
    elif suffixes <= set(IMAGE_2D_SUFFIXES):
        dims = 2
    else:
        raise DataError(path, f"mixes or does not know these file types: {sorted(suffixes)}; "
                              "use NIfTI (.nii/.nii.gz) or PNG/JPG")
    if dims == 3:
        dup = df[df.duplicated(["subject", "session"], keep=False)]
        if len(dup):
            raise DataError(path, f"duplicate subject rows: {', '.join(sorted(set(dup['subject'])))} "
                                  "(add a 'session' column if these are time points)")
    return df, {"modalities": mods, "dims": dims, "manifest": path}
