"""Bring your own data: one table of cases from BIDS, CSV, Decathlon, BraTS or image folders.

``load_dataset(source)`` looks at a folder or a CSV file, works out which layout it
is, and returns a :class:`CaseTable`: one row per case (one scan session of one
subject, or one 2D image), with a subject-wise train / val / test split.

The contract later notebooks and helpers build on:

- ``table.df``: a pandas DataFrame, one row per case, with at least
  ``case`` (unique id), ``subject``, ``session`` (``""`` when there is none),
  ``split`` (``"train"``, ``"val"`` or ``"test"``), ``label`` (class name, or
  ``""`` when the source has none), ``mask`` (path to a segmentation label map,
  or ``""``), and one column of image paths per modality (``table.modalities``).
  Extra metadata (site, age, lesion_volume_ml... from ``participants.tsv`` or the
  CSV) is kept as further columns.
- attributes: ``kind`` (``"bids"``, ``"csv"``, ``"decathlon"``, ``"brats"``,
  ``"imagefolder"``), ``modalities`` (ordered list), ``dims`` (2 or 3),
  ``classes`` (ordered list of class names), ``label_names`` (segmentation label
  value -> name, where known), ``source`` (the path given),
  ``volume_index`` (modality -> volume number inside a 4D file, for Decathlon).
- Splits never put one subject on two sides (sessions and slices of a subject go
  together). Without a split in the source, subjects are split stratified by
  label, deterministically for ``seed``; with one, it is kept and checked
  (:func:`check_subject_leak`).
- Bad input raises :class:`helpers.io.DataError` naming the file and the problem;
  ``on_error="skip"`` drops the bad cases instead, reports them, and keeps the rest.

Reading a case into arrays for a model is :func:`helpers.preprocess.load_case`.

Example:
    >>> from helpers.simulate import ensure_cohort
    >>> table = load_dataset(ensure_cohort("smoke"))           # doctest: +SKIP
    >>> table.kind, table.modalities, table.dims               # doctest: +SKIP
    ('bids', ['T1w', 'T2w', 'FLAIR'], 3)
    >>> table.df.groupby("split").size()                       # doctest: +SKIP

Command line: ``python -m helpers.datasets PATH`` prints the detected kind, the
split sizes and any problem found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.io import DataError, check_array, full_suffix, load_nifti, read_data

KINDS = ("bids", "csv", "decathlon", "brats", "imagefolder")
SPLITS = ("train", "val", "test")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI = (".nii", ".nii.gz")
BASE_COLUMNS = ("case", "subject", "session", "split", "label", "mask")

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


@dataclass
class CaseTable:
    """A dataset as one table of cases plus what is known about it.

    Attributes:
        df: one row per case (see the module docstring for the columns).
        kind: the layout it was read from.
        modalities: the image columns, in channel order.
        dims: 2 for 2D images, 3 for volumes.
        classes: class names in a fixed order (index = class number).
        label_names: segmentation label value -> name (empty if unknown).
        source: the folder or CSV the table was read from.
        volume_index: modality -> volume number inside a 4D file (Decathlon).
        problems: cases dropped with ``on_error="skip"``, as ``path: problem``.
    """

    df: pd.DataFrame
    kind: str
    modalities: list[str]
    dims: int
    classes: list[str] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    source: Path | None = None
    volume_index: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.df)

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return self.df[self.df["split"] == name]

    def image_paths(self, row: pd.Series | int) -> list[Path]:
        """The image files of one case, in modality order."""
        if not isinstance(row, pd.Series):
            row = self.df.iloc[int(row)]
        return [Path(row[m]) for m in self.modalities]

    def summary(self) -> pd.DataFrame:
        """Cases and subjects per split (and per class where there are classes)."""
        df = self.df
        by = ["split", "label"] if self.classes else ["split"]
        out = df.groupby(by).agg(cases=("case", "size"), subjects=("subject", "nunique"))
        return out

    def describe(self) -> str:
        """A few lines for people: kind, modalities, sizes, classes."""
        counts = self.df["split"].value_counts().reindex(list(SPLITS), fill_value=0)
        lines = [
            f"{self.kind} dataset at {self.source}: {len(self.df)} cases, "
            f"{self.df['subject'].nunique()} subjects, {self.dims}D, modalities {self.modalities}",
            "split: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        ]
        if self.classes:
            lines.append(f"classes: {self.classes}")
        if self.label_names:
            lines.append(f"segmentation labels: {self.label_names}")
        if self.problems:
            lines.append(f"{len(self.problems)} case(s) skipped: " + "; ".join(self.problems))
        return "\n".join(lines)


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


def _read_bids(root: Path, label_column: str | None) -> tuple[pd.DataFrame, dict[str, Any]]:
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


def _read_decathlon(root: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
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


def _read_brats(root: Path, year: int | None) -> tuple[pd.DataFrame, dict[str, Any]]:
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


def _read_imagefolder(root: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
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


def _read_csv(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
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


# --------------------------------------------------------------------------- splitting


def assign_splits(df: pd.DataFrame, seed: int = 42, val_fraction: float = 0.15,
                  test_fraction: float = 0.15) -> pd.Series:
    """Split subjects (not cases) into train / val / test, stratified by label.

    Within each label, the subjects are sorted, shuffled with ``seed`` and cut by
    the fractions (at least one subject per non-empty side when a label has 3 or
    more subjects). A subject with cases of several labels is stratified by its
    most common label.

    Returns:
        the split of each row of ``df``.

    Example:
        >>> df = pd.DataFrame({"subject": list("abcdefghij"), "label": ["x"] * 5 + ["y"] * 5})
        >>> assign_splits(df, seed=0, val_fraction=0.2, test_fraction=0.2).value_counts().to_dict()
        {'train': 6, 'val': 2, 'test': 2}
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    labels = df["label"] if "label" in df.columns else pd.Series("", index=df.index)
    per_subject = labels.groupby(df["subject"]).agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    chosen: dict[str, str] = {}
    for _, subs in sorted(per_subject.groupby(per_subject), key=lambda kv: str(kv[0])):
        names = sorted(subs.index.astype(str))
        order = [names[i] for i in rng.permutation(len(names))]
        n = len(order)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        for i, s in enumerate(order):
            chosen[s] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return df["subject"].astype(str).map(chosen)


def check_subject_leak(df: pd.DataFrame, source: str | os.PathLike = "dataset") -> None:
    """Raise DataError if a subject appears in more than one split.

    Example:
        >>> df = pd.DataFrame({"subject": ["a", "a", "b"], "split": ["train", "test", "val"]})
        >>> check_subject_leak(df)
        Traceback (most recent call last):
        ...
        helpers.io.DataError: dataset: subject a is in more than one split (test, train) ...
    """
    sides = df.groupby("subject")["split"].agg(lambda s: sorted(set(s)))
    leaks = sides[sides.map(len) > 1]
    if len(leaks):
        detail = "; ".join(f"subject {s} is in more than one split ({', '.join(v)})" for s, v in leaks.items())
        raise DataError(source, detail + " - a subject's scans must all be on one side")


def _normalise_split_column(df: pd.DataFrame, source: Path) -> pd.Series:
    values = df["split"].astype(str).str.strip().str.lower()
    mapped = values.map(lambda v: SPLIT_ALIASES.get(v, v) if v else "")
    bad = sorted(set(mapped) - {*SPLITS, ""})
    if bad:
        raise DataError(source, f"unknown split value(s) {bad}; use train, val or test")
    return mapped


# --------------------------------------------------------------------------- checks


def _check_case(row: pd.Series, table_meta: dict[str, Any], deep: bool,
                expected: set[int] | None) -> list[str]:
    """Problems of one case as ``path: problem`` strings (empty: the case is fine)."""
    problems: list[str] = []
    mods = table_meta["modalities"]
    dims = table_meta["dims"]
    four_d = table_meta.get("four_d", False)
    paths = list(dict.fromkeys(str(row[m]) for m in mods))
    ref = None
    for p in paths:
        if not p or p == "nan":
            problems.append(f"{table_meta['source']}: subject {row['subject']} has no image path")
            continue
        try:
            if dims == 2:
                _check_image_2d(Path(p), deep)
                continue
            img = load_nifti(p)
            want = 4 if four_d else 3
            shape = img.shape if not (len(img.shape) == 4 and img.shape[3] == 1 and want == 3) else img.shape[:3]
            if len(shape) != want:
                what = {2: "a 2D image", 3: "a 3D volume", 4: "a 4D series"}.get(len(shape), f"{len(shape)}D")
                raise DataError(p, f"is {what} of shape {tuple(shape)}, expected {want}D")
            if four_d and shape[3] != len(mods):
                raise DataError(p, f"holds {shape[3]} volumes, dataset.json names {len(mods)} modalities")
            if deep:
                check_array(read_data(img, p), p, ndim=want)
            if ref is None:
                ref = (p, shape[:3], img.affine)
            else:
                _same_grid(ref, p, shape[:3], img.affine, "image")
        except DataError as exc:
            problems.append(str(exc))
    mask = str(row.get("mask", "") or "")
    if mask and mask != "nan" and dims == 3:
        try:
            img = load_nifti(mask)
            shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
            if len(shape) != 3:
                raise DataError(mask, f"mask is {len(shape)}D of shape {tuple(shape)}, expected 3D")
            if ref is not None:
                _same_grid(ref, mask, shape, img.affine, "mask")
            if deep:
                data = read_data(img, mask)
                check_array(data, mask, ndim=None, allow_all_zero=True)
                if expected is not None:
                    values = set(np.unique(np.rint(data)).astype(int).tolist())
                    extra = sorted(values - expected)
                    if extra:
                        raise DataError(mask, f"label value(s) {extra} outside the expected set {sorted(expected)}")
        except DataError as exc:
            problems.append(str(exc))
    return problems


def _same_grid(ref: tuple[str, tuple, np.ndarray], path: str, shape: tuple, affine: np.ndarray, what: str) -> None:
    ref_path, ref_shape, ref_aff = ref
    if tuple(shape) != tuple(ref_shape):
        raise DataError(path, f"{what} shape {tuple(shape)} differs from the image {ref_path} {tuple(ref_shape)}")
    if not np.allclose(affine, ref_aff, atol=1e-3):
        diff = float(np.abs(affine - ref_aff).max())
        raise DataError(path, f"{what} affine differs from the image {ref_path} (by up to {diff:.3g} mm): "
                              "they are not on the same voxel grid")


def _check_image_2d(path: Path, deep: bool) -> None:
    if not path.exists():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    if deep:
        read_image_2d(path)


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPG as a float32 grayscale array (H, W); RGB is averaged to gray.

    Raises:
        DataError: missing, unreadable or truncated, or all zero.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I", "F") else im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"not a readable image, or truncated ({exc})") from exc
    check_array(arr, path, ndim=2)
    return arr


def validate(table: CaseTable, deep: bool = True, on_error: str = "raise") -> CaseTable:
    """Check every file of every case; raise, or drop bad cases, naming file and problem.

    ``deep=False`` reads headers only (fast: missing files, wrong dimensions, shape
    and affine mismatches); ``deep=True`` also reads the voxels (truncated files,
    NaN/Inf, all-zero images, mask labels outside ``table.label_names``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    expected = (set(table.label_names) | {0}) if table.label_names else None
    meta = {"modalities": table.modalities, "dims": table.dims, "source": table.source,
            "four_d": bool(table.volume_index)}
    problems: list[str] = []
    keep = []
    for idx, row in table.df.iterrows():
        found = _check_case(row, meta, deep, expected)
        problems.extend(found)
        if not found:
            keep.append(idx)
    if problems and on_error == "raise":
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:6])})" if len(problems) > 1 else ""
        path, _, problem = first.partition(": ")
        raise DataError(path, problem + more)
    if problems:
        warnings.warn(f"skipped {len(table.df) - len(keep)} case(s): " + "; ".join(problems), stacklevel=2)
        table.df = table.df.loc[keep].reset_index(drop=True)
        table.problems.extend(problems)
    return table


# --------------------------------------------------------------------------- the entry point


def load_dataset(source: str | os.PathLike, kind: str | None = None, seed: int = 42,
                 val_fraction: float = 0.15, test_fraction: float = 0.15,
                 label_column: str | None = None, classes: Sequence[str] | None = None,
                 label_names: dict[int, str] | None = None, check: str = "headers",
                 on_error: str = "raise") -> CaseTable:
    """Read a dataset into a :class:`CaseTable` with a subject-wise split.

    Args:
        source: a dataset folder (BIDS, Decathlon, BraTS, image folders) or a CSV manifest.
        kind: override the detected layout (one of ``KINDS``).
        seed: seed of the split (same seed, same split).
        val_fraction, test_fraction: share of subjects for validation and test
            when the source has no split of its own. When it has one without a
            validation side (e.g. Training/Testing folders), ``val_fraction`` of the
            training subjects become the validation split; the test side is kept as given.
        label_column: the participants.tsv column holding the class (BIDS;
            default ``diagnosis`` if present).
        classes: the allowed class names, in order (default: sorted names found).
            A CSV label outside them is an error.
        label_names: segmentation label value -> name, overriding what the source says;
            a mask value outside these is an error (with ``check="full"``).
        check: ``"headers"`` (fast: files exist, dimensions, grids match), ``"full"``
            (also read every voxel: NaN/Inf, all-zero, truncated, mask labels),
            or ``"none"``.
        on_error: ``"raise"`` (default) or ``"skip"`` (drop bad cases, keep the rest,
            list them in ``table.problems``).

    Raises:
        DataError: naming the file (or the subject) and the problem.
    """
    path = Path(source).expanduser()
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ValueError(f"Unknown dataset kind {kind!r}: choose one of {', '.join(KINDS)}")
    if not path.exists():
        raise DataError(path, "not found")
    if kind == "bids":
        df, meta = _read_bids(path, label_column)
    elif kind == "decathlon":
        df, meta = _read_decathlon(path)
    elif kind == "brats":
        df, meta = _read_brats(path, None)
    elif kind == "imagefolder":
        df, meta = _read_imagefolder(path)
    else:
        df, meta = _read_csv(path)
    split_source = meta.get("manifest", path)
    for col in ("session", "label", "mask"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str)
    df["subject"] = df["subject"].astype(str)
    if "case" not in df.columns:
        if meta.get("dims", 3) == 2:
            first = meta["modalities"][0]
            df["case"] = [f"{s}/{Path(p).stem}" for s, p in zip(df["subject"], df[first], strict=True)]
            df["case"] = df["case"] + df.groupby("case").cumcount().map(lambda k: f"#{k}" if k else "")
        else:
            df["case"] = [s + (f"_{t}" if t else "") for s, t in zip(df["subject"], df["session"], strict=True)]
    dup = df["case"][df["case"].duplicated()]
    if len(dup) and meta.get("dims", 3) == 3:
        raise DataError(split_source, f"duplicate subject rows: {', '.join(sorted(set(dup)))}")
    found = sorted(c for c in df["label"].unique() if c)
    if classes is not None:
        classes = list(classes)
        bad = df[(df["label"] != "") & ~df["label"].isin(classes)]
        if len(bad):
            raise DataError(split_source, f"label {bad.iloc[0]['label']!r} of subject {bad.iloc[0]['subject']} "
                                          f"is not one of the expected classes {classes}")
    if "split" in df.columns and (df["split"].astype(str).str.strip() != "").any():
        df["split"] = _normalise_split_column(df, split_source)
        unset = df["split"] == ""
        if unset.any():
            if kind == "imagefolder" or not (df["split"] == "val").any():
                train_like = df[unset | (df["split"] == "train")]
                # carve validation subjects out of the training side only
                sub = assign_splits(train_like, seed, val_fraction, 0.0)
                df.loc[train_like.index, "split"] = sub
            else:
                raise DataError(split_source, f"{int(unset.sum())} row(s) have an empty split value")
        elif not (df["split"] == "val").any() and val_fraction > 0:
            train_like = df[df["split"] == "train"]
            df.loc[train_like.index, "split"] = assign_splits(train_like, seed, val_fraction, 0.0)
        check_subject_leak(df, split_source)
    else:
        df["split"] = assign_splits(df, seed, val_fraction, test_fraction)
    mods = meta["modalities"]
    extra = [c for c in df.columns if c not in (*BASE_COLUMNS, *mods)]
    df = df[[*BASE_COLUMNS, *mods, *extra]].reset_index(drop=True)
    table = CaseTable(
        df=df, kind=kind, modalities=list(mods), dims=meta.get("dims", 3),
        classes=classes if classes is not None else found,
        label_names=dict(label_names) if label_names is not None else meta.get("label_names", {}),
        source=path, volume_index=meta.get("volume_index", {}),
    )
    if check != "none":
        validate(table, deep=(check == "full"), on_error=on_error)
    return table


# --------------------------------------------------------------------------- 2D duplicates


def average_hash(image: np.ndarray, size: int = 8) -> int:
    """A 64-bit perceptual hash: the image shrunk to 8x8, each pixel above the mean = 1.

    Near-identical images (resized, recompressed, slightly brighter) get hashes that
    differ in few bits; different images differ in about half of them.
    """
    from PIL import Image

    small = np.asarray(Image.fromarray(image.astype(np.float32)).resize((size, size), Image.BILINEAR))
    bits = (small > small.mean()).ravel()
    return int(np.packbits(bits).view(">u8")[0]) if size == 8 else int("".join("1" if b else "0" for b in bits), 2)


def find_duplicates(table: CaseTable, max_distance: int = 4, across_splits_only: bool = True) -> pd.DataFrame:
    """Find identical and near-identical 2D images, by default only across splits.

    Two images are *identical* when their pixels are equal, *near-identical* when
    their average hashes differ in at most ``max_distance`` of 64 bits.

    Returns:
        one row per pair: ``image_a``, ``split_a``, ``image_b``, ``split_b``,
        ``distance`` (bits), ``kind`` (``identical`` or ``near-identical``).
    """
    import hashlib

    if table.dims != 2:
        raise ValueError("find_duplicates is for 2D image collections")
    col = table.modalities[0]
    paths = table.df[col].tolist()
    splits = table.df["split"].to_numpy()
    hashes = np.zeros(len(paths), dtype=np.uint64)
    exact = []
    for i, p in enumerate(paths):
        arr = read_image_2d(p)
        hashes[i] = np.uint64(average_hash(arr))
        exact.append(hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest())
    rows = []
    for i in range(len(paths)):
        dist = np.bitwise_count(hashes[i] ^ hashes[i + 1:]).astype(int)
        for j in np.nonzero(dist <= max_distance)[0] + i + 1:
            if across_splits_only and splits[i] == splits[j]:
                continue
            kind = "identical" if exact[i] == exact[j] else "near-identical"
            rows.append({"image_a": paths[i], "split_a": splits[i], "image_b": paths[j],
                         "split_b": splits[j], "distance": int(dist[j - i - 1]), "kind": kind})
    return pd.DataFrame(rows, columns=["image_a", "split_a", "image_b", "split_b", "distance", "kind"])


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.datasets PATH [--kind K] [--check full]``: describe a dataset."""
    parser = argparse.ArgumentParser(prog="python -m helpers.datasets", description=main.__doc__)
    parser.add_argument("source", help="dataset folder or CSV manifest")
    parser.add_argument("--kind", choices=KINDS, default=None, help="override the detected layout")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--check", choices=("none", "headers", "full"), default="headers")
    parser.add_argument("--duplicates", action="store_true", help="2D only: look for duplicates across splits")
    parser.add_argument("--out", default=None, help="write the case table to this CSV")
    args = parser.parse_args(argv)
    try:
        table = load_dataset(args.source, kind=args.kind, seed=args.seed, check=args.check)
    except DataError as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 1
    print(table.describe())
    print(table.summary().to_string())
    if args.duplicates and table.dims == 2:
        dups = find_duplicates(table)
        print(f"{len(dups)} duplicate pair(s) across splits")
        if len(dups):
            print(dups.to_string(index=False))
    if args.out:
        from helpers.io import write_text

        write_text(args.out, table.df.to_csv(index=False))
        print(f"Case table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
