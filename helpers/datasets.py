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

The readers of each layout live in :mod:`helpers.adapters`. Reading a case into
arrays for a model is :func:`helpers.preprocess.load_case`.

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
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.adapters import (
    BASE_COLUMNS,
    SPLIT_ALIASES,
    detect_kind,
    read_bids,
    read_brats,
    read_csv,
    read_decathlon,
    read_imagefolder,
)
from helpers.io import DataError, check_array, load_nifti, read_data

KINDS = ("bids", "csv", "decathlon", "brats", "imagefolder")
SPLITS = ("train", "val", "test")

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
        >>> sorted(assign_splits(df, seed=0, val_fraction=0.2, test_fraction=0.2).value_counts().items())
        [('test', 2), ('train', 6), ('val', 2)]
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
        df, meta = read_bids(path, label_column)
    elif kind == "decathlon":
        df, meta = read_decathlon(path)
    elif kind == "brats":
        df, meta = read_brats(path, None)
    elif kind == "imagefolder":
        df, meta = read_imagefolder(path)
    else:
        df, meta = read_csv(path)
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
