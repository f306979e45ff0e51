"""A simulated brain-MRI cohort on real anatomy, written as a BIDS dataset.

Every subject starts from the ICBM152 template that ships with nilearn (see
``helpers.anatomy``), gets its own head shape (random affine plus a smooth
elastic warp), age-related atrophy, maybe a lesion (tumour, stroke or MS-like
white-matter lesions), and is "scanned" at one of four simulated sites with its
own intensities, bias field, Rician noise, voxel spacing and header orientation.

Nothing is downloaded. The work is split: ``helpers.anatomy`` (template and warps), ``helpers.lesions``
(lesion shapes and labels), ``helpers.scanner`` (contrasts, acquisition, one
subject) and this module (planning the cohort, writing BIDS files, the manifest
that makes reruns safe, and the command line).

The same settings always give the same files, whatever the
number of worker processes: each subject has its own seed derived from the
cohort seed and its index.

Command line::

    python -m helpers.simulate --out data/simulated/n24_2mm_seed42 --subjects 24 --spacing 2 --seed 42

Example:
    >>> root = simulate_cohort("/tmp/tiny", n_subjects=4, spacing_mm=4, seed=0)  # doctest: +SKIP
    >>> sorted(p.name for p in root.glob("sub-*"))                               # doctest: +SKIP
    ['sub-001', 'sub-002', 'sub-003', 'sub-004']
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from helpers import anatomy
from helpers.io import DataError, atomic_write, sha256_file, write_json, write_text
from helpers.lesions import LESION_LABELS
from helpers.paths import data_dir
from helpers.scanner import MODALITIES, ORIENTATIONS, SITES, SubjectPlan, scan_subject

__all__ = [
    "DIAGNOSES", "LESION_LABELS", "TISSUE_LABELS", "MODALITIES", "ORIENTATIONS", "SITES",
    "SubjectPlan", "CohortSettings", "plan_cohort", "class_counts", "parse_difficulty",
    "simulate_subject", "simulate_cohort", "ensure_cohort", "check_cohort", "cohort_name",
    "subject_files", "main",
]

SIM_VERSION = "1.2"
"""Version of the generator, stored in the manifest. Bump it whenever the images change:
a cohort made by another version is remade in place (same folder, same settings)."""

DIAGNOSES: tuple[str, ...] = ("healthy", "tumour", "stroke", "ms")
"""Diagnosis names used in participants.tsv."""

TISSUE_LABELS: dict[int, str] = {1: "CSF", 2: "grey matter", 3: "white matter"}
"""Voxel labels of ``sub-XXX_desc-tissue_dseg.nii.gz`` (0 = outside the brain).
Lesion labels: :data:`LESION_LABELS` (from ``helpers.lesions``)."""

DEFAULT_PROPORTIONS: dict[str, float] = {"healthy": 0.4, "tumour": 0.2, "stroke": 0.2, "ms": 0.2}
DIFFICULTY_LEVELS: dict[str, float] = {"easy": 0.2, "medium": 0.4, "hard": 0.7}
MANIFEST = "simulation_manifest.json"


@dataclass(frozen=True)
class CohortSettings:
    """The settings that fully determine a cohort (stored in its manifest)."""

    n_subjects: int
    spacing_mm: float
    seed: int
    difficulty: float
    proportions: tuple[tuple[str, float], ...]
    version: str = SIM_VERSION

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["proportions"] = dict(self.proportions)
        return d


# --------------------------------------------------------------------------- planning


def parse_difficulty(difficulty: float | str) -> float:
    """``easy``/``medium``/``hard`` or a number in [0, 1] -> a number in [0, 1]."""
    if isinstance(difficulty, str):
        key = difficulty.strip().lower()
        if key in DIFFICULTY_LEVELS:
            return DIFFICULTY_LEVELS[key]
        try:
            difficulty = float(key)
        except ValueError:
            raise ValueError(f"difficulty {difficulty!r}: use easy, medium, hard or a number 0-1") from None
    value = float(difficulty)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"difficulty {value} is outside [0, 1]")
    return value


def class_counts(n_subjects: int, proportions: dict[str, float]) -> dict[str, int]:
    """Exact subject counts per diagnosis (largest remainder), summing to ``n_subjects``."""
    unknown = set(proportions) - set(DIAGNOSES)
    if unknown:
        raise ValueError(f"unknown diagnosis {sorted(unknown)}; the diagnoses are {DIAGNOSES}")
    total = sum(proportions.values())
    if total <= 0 or any(v < 0 for v in proportions.values()):
        raise ValueError(f"proportions must be non-negative and not all zero: {proportions}")
    shares = {k: n_subjects * v / total for k, v in proportions.items()}
    counts = {k: int(np.floor(s)) for k, s in shares.items()}
    left = n_subjects - sum(counts.values())
    for k in sorted(shares, key=lambda k: (counts[k] - shares[k], DIAGNOSES.index(k)))[:left]:
        counts[k] += 1
    return {k: counts.get(k, 0) for k in DIAGNOSES}


def plan_cohort(settings: CohortSettings) -> list[SubjectPlan]:
    """Decide every subject's diagnosis, age, sex, site, orientation and lesion subtlety."""
    rng = np.random.default_rng([settings.seed, 7001])
    counts = class_counts(settings.n_subjects, dict(settings.proportions))
    diagnoses = np.array([d for d in DIAGNOSES for _ in range(counts[d])])
    rng.shuffle(diagnoses)
    width = max(3, len(str(settings.n_subjects)))
    age_range = {"healthy": (20, 85), "tumour": (25, 80), "stroke": (45, 90), "ms": (20, 60)}
    # Subtlety 0 = obvious, 1 = barely visible; its mean follows the difficulty.
    d = min(max(settings.difficulty, 0.02), 0.98)
    a, b = 4 * d, 4 * (1 - d)
    plans = []
    for i, diagnosis in enumerate(diagnoses):
        lo, hi = age_range[str(diagnosis)]
        plans.append(SubjectPlan(
            index=i,
            participant_id=f"sub-{i + 1:0{width}d}",
            diagnosis=str(diagnosis),
            age=int(rng.integers(lo, hi + 1)),
            sex=str(rng.choice(["F", "M"])),
            site=SITES[int(rng.choice(len(SITES), p=[0.35, 0.25, 0.2, 0.2]))].name,
            orientation=str(rng.choice(ORIENTATIONS)),
            subtlety=round(float(rng.beta(a, b)), 3) if diagnosis != "healthy" else 0.0,
        ))
    return plans


def simulate_subject(plan: SubjectPlan, settings: CohortSettings,
                     tpl: anatomy.Template | None = None) -> dict[str, Any]:
    """One subject's images and labels in memory (see :func:`helpers.scanner.scan_subject`)."""
    return scan_subject(plan, settings.spacing_mm, settings.seed, tpl)


# --------------------------------------------------------------------------- writing


def _nifti_bytes(arr: np.ndarray, affine: np.ndarray, dtype: type, description: str) -> bytes:
    """A gzipped NIfTI file in memory, byte-identical for identical input."""
    img = nib.Nifti1Image(arr, affine)
    img.set_data_dtype(dtype)  # float -> int16 makes nibabel choose scl_slope/scl_inter
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header["descrip"] = description.encode()[:79]
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def subject_files(pid: str) -> dict[str, str]:
    """The relative paths of one subject's files, by key."""
    lab = f"derivatives/labels/{pid}/anat/{pid}"
    files = {m: f"{pid}/anat/{pid}_{m}.nii.gz" for m in MODALITIES}
    files.update(dseg=f"{lab}_dseg.nii.gz", brain_mask=f"{lab}_desc-brain_mask.nii.gz",
                 tissue=f"{lab}_desc-tissue_dseg.nii.gz")
    return files


def _generate_and_write(job: tuple[Path, SubjectPlan, CohortSettings]) -> tuple[str, dict, dict]:
    root, plan, settings = job
    result = simulate_subject(plan, settings)
    paths = subject_files(plan.participant_id)
    records = {}
    tag = f"simulated {plan.diagnosis} (helpers.simulate {SIM_VERSION})"
    for key, arr in [*result["images"].items(), *result["labels"].items()]:
        dtype = np.int16 if key in MODALITIES else np.uint8
        blob = _nifti_bytes(arr, result["affine"], dtype, tag)
        target = root / paths[key]
        with atomic_write(target) as handle:
            handle.write(blob)
        stat = target.stat()
        records[paths[key]] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                               "sha256": hashlib.sha256(blob).hexdigest()}
    spacing = "x".join(f"{v:g}" for v in sorted(result["voxel_mm"]))
    row = {**_plan_row(plan), "spacing_mm": spacing, **result["row"]}
    return plan.participant_id, row, records


def _plan_row(plan: SubjectPlan) -> dict[str, Any]:
    return {"participant_id": plan.participant_id, "diagnosis": plan.diagnosis, "age": plan.age,
            "sex": plan.sex, "site": plan.site, "orientation": plan.orientation,
            "difficulty": plan.subtlety}


PARTICIPANT_COLUMNS = {
    "participant_id": "Subject label (sub-NNN).",
    "diagnosis": f"Simulated diagnosis: one of {', '.join(DIAGNOSES)}.",
    "age": "Age in years; drives simulated atrophy (ventricle size, cortical thickness).",
    "sex": "F or M; M heads are simulated about 5% larger (MNI152 is scaled by 0.9-0.95).",
    "site": "Simulated scanner site (A-D); see dataset_description.json for each site.",
    "lesion_volume_ml": "Volume of all lesion labels (dseg > 0) in millilitres; 0 for healthy.",
    "difficulty": "Lesion subtlety 0 (obvious) to 1 (barely visible): smaller and fainter lesions.",
    "spacing_mm": "Voxel spacing in mm, sorted (e.g. 2x2x5 for thick slices).",
    "orientation": "Axis codes of the stored image (RAS, LPS, LAS, PIR, SLA).",
    "n_lesions": "Number of separate lesions drawn (tumour counts as 1).",
    "lesion_contrast": "Fraction of full lesion contrast used (1 = textbook, 0.4 = faint).",
    "snr": "Signal-to-noise ratio of the simulated acquisition.",
    "brain_volume_ml": "Brain-mask volume in millilitres.",
}


def _write_tables(root: Path, rows: list[dict[str, Any]], settings: CohortSettings) -> None:
    columns = list(PARTICIPANT_COLUMNS)
    lines = ["\t".join(columns)]
    for row in sorted(rows, key=lambda r: r["participant_id"]):
        lines.append("\t".join(str(row[c]) for c in columns))
    write_text(root / "participants.tsv", "\n".join(lines) + "\n")
    write_json(root / "participants.json", {c: {"Description": d} for c, d in PARTICIPANT_COLUMNS.items()})
    how = (f"Generated by helpers.simulate {SIM_VERSION} from the ICBM152 2009a symmetric template "
           f"shipped with nilearn: per-subject affine and elastic warps, age-related atrophy, "
           f"synthetic lesions, tissue-based T1w/T2w/FLAIR contrasts, bias field, Rician noise, four "
           f"simulated sites. Settings: {json.dumps(settings.as_dict())}.")
    write_json(root / "dataset_description.json", {
        "Name": "Simulated brain MRI cohort (NOT patient data)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0 (simulated); the anatomy derives from the ICBM152 2009a template",
        "Authors": ["helpers.simulate (generated locally)"],
        "HowToAcknowledge": "Cite the ICBM152 2009a template: Fonov et al., NeuroImage 2011 and 2009.",
        "GeneratedBy": [{"Name": "helpers.simulate", "Version": SIM_VERSION, "Description": how}],
        "Simulated": True,
        "SimulationNotice": "Every image is synthetic. Scores on these data do not transfer to patients.",
        "Sites": {s.name: s.description for s in SITES},
    })
    write_text(root / "README", "Simulated brain MRI cohort made by helpers.simulate (see data/README.md "
               "in the project). Synthetic images on real template anatomy; not patient data.\n")
    write_text(root / ".bidsignore", f"{MANIFEST}\n")
    labels = root / "derivatives" / "labels"
    write_json(labels / "dataset_description.json", {
        "Name": "Ground-truth labels of the simulated cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "helpers.simulate", "Version": SIM_VERSION,
                         "Description": "Lesion, brain-mask and tissue labels known exactly by construction."}],
    })
    write_text(labels / "dseg.tsv", "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LESION_LABELS.items()))
    write_text(labels / "desc-tissue_dseg.tsv",
               "index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in TISSUE_LABELS.items()))


# --------------------------------------------------------------------------- manifest


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: every subject is checked again by checksum


def _file_ok(path: Path, record: dict[str, Any], full: bool) -> tuple[bool, bool]:
    """(file matches its record, record's mtime needs refreshing)."""
    try:
        stat = path.stat()
    except OSError:
        return False, False
    if stat.st_size != record["size"]:
        return False, False
    if not full and stat.st_mtime_ns == record.get("mtime_ns"):
        return True, False
    same = sha256_file(path) == record["sha256"]
    return same, same and stat.st_mtime_ns != record.get("mtime_ns")


def check_cohort(root: str | Path, full: bool = False) -> dict[str, list[str]]:
    """Which subjects of a cohort are intact, by its manifest.

    The quick check compares each file's size and modification time with the
    manifest; a file whose time changed is re-hashed (SHA-256). ``full=True``
    re-hashes every file.

    Returns:
        ``{"ok": [...], "bad": [...]}`` participant ids.
    """
    root = Path(root)
    manifest = _read_manifest(root) or {}
    report: dict[str, list[str]] = {"ok": [], "bad": []}
    for pid, entry in sorted(manifest.get("subjects", {}).items()):
        ok = all(_file_ok(root / rel, rec, full)[0] for rel, rec in entry["files"].items())
        report["ok" if ok else "bad"].append(pid)
    return report


# --------------------------------------------------------------------------- cohort


def default_jobs(n_subjects: int, spacing_mm: float) -> int:
    """Worker processes: one per CPU core (at most 8, at most 4 at 1 mm), one for tiny cohorts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = 4 if spacing_mm < 1.5 else 8
    return max(1, min(cores, cap, n_subjects // 4 or 1))


def simulate_cohort(out: str | Path, n_subjects: int = 24, spacing_mm: float = 2.0, seed: int = 42,
                    difficulty: float | str = "medium", n_jobs: int | None = None,
                    proportions: dict[str, float] | None = None, verify: bool = False,
                    verbose: bool = True) -> Path:
    """Generate (or reuse) a simulated cohort as a BIDS dataset; return its root.

    Safe to rerun: with the same settings, subjects listed in the manifest whose
    files are intact are reused and only missing or damaged subjects are made
    again. Every file is written atomically. Another cohort's folder (different
    settings) is never overwritten: that raises :class:`helpers.io.DataError`.

    Args:
        out: the BIDS root folder to create or complete.
        n_subjects: number of subjects.
        spacing_mm: base voxel spacing in mm (sites vary it: thick slices, larger voxels).
        seed: cohort seed; subject ``i`` uses a seed derived from ``(seed, i)``.
        difficulty: ``easy``, ``medium``, ``hard`` or 0-1: how subtle lesions are on average.
        n_jobs: worker processes (default :func:`default_jobs`). Results do not depend on it.
        proportions: share of each diagnosis (default 40% healthy, 20% each lesion class).
        verify: re-hash every existing file instead of the quick size/time check.
        verbose: print what was made or reused, and how long it took.

    Example:
        >>> simulate_cohort("/tmp/c", n_subjects=4, spacing_mm=4, seed=1)   # doctest: +SKIP
        PosixPath('/tmp/c')
    """
    start = time.perf_counter()
    root = Path(out).expanduser().resolve()
    settings = CohortSettings(int(n_subjects), float(spacing_mm), int(seed), parse_difficulty(difficulty),
                              tuple(sorted((proportions or DEFAULT_PROPORTIONS).items())))
    if settings.n_subjects < 1:
        raise ValueError("n_subjects must be at least 1")
    plans = plan_cohort(settings)
    manifest = _read_manifest(root)
    if manifest is not None and _same_but_version(manifest.get("settings"), settings.as_dict()):
        if verbose:
            print(f"The cohort in {root} was made by generator version "
                  f"{manifest['settings'].get('version')}; remaking it with version {SIM_VERSION}.")
        manifest = {"settings": settings.as_dict(), "subjects": {}}
    if manifest is not None and manifest.get("settings") != settings.as_dict():
        raise DataError(root / MANIFEST, f"this folder holds a cohort made with other settings "
                        f"({manifest.get('settings')}); choose another folder for {settings.as_dict()} "
                        "or delete this one")
    if manifest is None and root.exists() and any(root.glob("sub-*")):
        # Files without a readable manifest: keep nothing we cannot vouch for.
        if (root / MANIFEST).exists() or (root / "dataset_description.json").exists():
            manifest = {"settings": settings.as_dict(), "subjects": {}}
        else:
            raise DataError(root, "holds sub-* folders but no simulation manifest: not a simulated "
                                  "cohort; choose an empty folder")
    manifest = manifest or {"settings": settings.as_dict(), "subjects": {}}
    subjects = manifest.setdefault("subjects", {})
    wanted = {p.participant_id for p in plans}
    todo, refreshed = [], False
    for plan in plans:
        entry = subjects.get(plan.participant_id)
        ok = entry is not None
        for rel, rec in (entry or {}).get("files", {}).items():
            good, stale = _file_ok(root / rel, rec, verify)
            if not good:
                ok = False
                break
            if stale:
                rec["mtime_ns"] = (root / rel).stat().st_mtime_ns
                refreshed = True
        if not ok:
            subjects.pop(plan.participant_id, None)
            todo.append(plan)
    for pid in set(subjects) - wanted:
        subjects.pop(pid)
    core_files = ["participants.tsv", "participants.json", "dataset_description.json",
                  "derivatives/labels/dataset_description.json", "derivatives/labels/dseg.tsv"]
    complete = manifest.get("complete") and all((root / f).exists() for f in core_files)
    if not todo and complete:
        if refreshed:
            write_json(root / MANIFEST, manifest)
        if verbose:
            print(f"Reusing the simulated cohort in {root} ({len(plans)} subjects, files checked "
                  f"{'by checksum' if verify else 'by size and time'}).")
        return root

    manifest["complete"] = False
    write_json(root / MANIFEST, manifest)
    jobs = n_jobs or default_jobs(len(todo), settings.spacing_mm)
    anatomy.load_template(settings.spacing_mm)  # build the cache once, before any fork
    work = [(root, plan, settings) for plan in todo]
    last_write = time.perf_counter()

    def record(result: tuple[str, dict, dict]) -> None:
        nonlocal last_write
        pid, row, files = result
        subjects[pid] = {"row": row, "files": files}
        if time.perf_counter() - last_write > 2.0:
            write_json(root / MANIFEST, manifest)
            last_write = time.perf_counter()

    if jobs > 1 and len(work) > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(jobs, len(work))) as pool:
            for result in pool.imap_unordered(_generate_and_write, work):
                record(result)
    else:
        for job in work:
            record(_generate_and_write(job))

    rows = [subjects[p.participant_id]["row"] for p in plans]
    _write_tables(root, rows, settings)
    manifest["subjects"] = dict(sorted(subjects.items()))
    manifest["complete"] = True
    write_json(root / MANIFEST, manifest)
    if verbose:
        print(f"Simulated {len(todo)} subject(s) ({len(plans) - len(todo)} reused) into {root} "
              f"in {time.perf_counter() - start:.1f} s with {min(jobs, max(1, len(work)))} process(es).")
    return root


def _same_but_version(old: Any, new: dict[str, Any]) -> bool:
    """True when two settings differ only in the generator version."""
    if not isinstance(old, dict) or old.get("version") == new.get("version"):
        return False
    return {k: v for k, v in old.items() if k != "version"} == {k: v for k, v in new.items() if k != "version"}


def cohort_name(n_subjects: int, spacing_mm: float, seed: int, difficulty: float | str = "medium") -> str:
    """Folder name for a cohort's settings, e.g. ``n24_2mm_seed42`` (difficulty added if not medium)."""
    name = f"n{n_subjects}_{spacing_mm:g}mm_seed{seed}"
    value = parse_difficulty(difficulty)
    return name if value == DIFFICULTY_LEVELS["medium"] else f"{name}_difficulty{value:g}"


def ensure_cohort(profile: Any = "auto", root: str | Path | None = None,
                  difficulty: float | str = "medium", verbose: bool = True) -> Path:
    """The simulated cohort for a run profile: reused if it exists, generated if not.

    Every notebook calls this first. When the cohort exists this takes a few
    milliseconds: it reads the manifest and compares each file's size and
    modification time (a changed file is re-hashed; a damaged subject is made again).

    Args:
        profile: a profile name (``smoke``, ``workshop``, ``full``, ``auto``) or a
            :class:`helpers.runtime.Profile`; its ``n_subjects``, ``spacing_mm`` and
            ``seed`` define the cohort.
        root: the BIDS root to use (default ``data/simulated/<settings>``, e.g.
            ``data/simulated/n24_2mm_seed42``).
        difficulty: passed to :func:`simulate_cohort`.
        verbose: print what happened.

    Returns:
        the BIDS root.

    Example:
        >>> root = ensure_cohort("smoke")         # doctest: +SKIP
        >>> (root / "participants.tsv").exists()  # doctest: +SKIP
        True
    """
    from helpers.runtime import Profile, get_profile

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    if root is None:
        root = data_dir() / "simulated" / cohort_name(prof.n_subjects, prof.spacing_mm, prof.seed, difficulty)
    return simulate_cohort(root, prof.n_subjects, prof.spacing_mm, prof.seed, difficulty=difficulty,
                           verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m helpers.simulate --out DIR --subjects N --spacing MM --seed S``."""
    parser = argparse.ArgumentParser(prog="python -m helpers.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="BIDS root to create (default: data/simulated/<settings>)")
    parser.add_argument("--subjects", type=int, default=24, help="number of subjects (default 24)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel spacing in mm (default 2)")
    parser.add_argument("--seed", type=int, default=42, help="cohort seed (default 42)")
    parser.add_argument("--difficulty", default="medium", help="easy, medium, hard or 0-1 (default medium)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    parser.add_argument("--verify", action="store_true", help="re-hash every existing file")
    args = parser.parse_args(argv)
    out = args.out or data_dir() / "simulated" / cohort_name(args.subjects, args.spacing, args.seed, args.difficulty)
    try:
        simulate_cohort(out, args.subjects, args.spacing, args.seed, difficulty=args.difficulty,
                        n_jobs=args.jobs, verify=args.verify)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
