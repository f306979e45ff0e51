"""Deployment speed: load, preprocess, predict and write for one 1 mm scan (goal: at most 3 s on 2 CPU cores).

What is timed is :func:`helpers.predict.predict_case` for one simulated subject
stored at 1 mm (three modalities, int16 ``.nii.gz``, as the cohort stores them):
reading and checking the files, the checkpoint's preprocessing, the classifier and
the segmenter, mapping the lesion probability back onto the 1 mm grid, and
writing the mask and the probability map. The one-page report is timed separately
(it is optional: ``--no-report`` on the command line): the report's time is that
of a second run with the report, minus the first's total.

On a shared machine the wall time depends on the other processes; the script
also prints the process's CPU time for the same work (all threads added up), which
is an upper bound for the wall time the same work needs on idle cores.

Models: trained runs with ``--model RUN`` (repeat for a classifier and a
segmenter); by default two networks of the workshop profile's shape (3D CNN and
3D U-Net at 48^3 after resampling to 2 mm, default depth and width) with fixed
random weights, since the time does not depend on the weights (only the size of
the written mask does, a little).

Usage::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_predict.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from helpers.models import build_model
from helpers.predict import find_cases, load_model, predict_case, required_modalities
from helpers.runtime import get_profile
from helpers.train import save_checkpoint
from helpers.training_data import preprocess_config

OUT = Path(__file__).resolve().parent / "out" / "bench_predict"


def make_scan(spacing: float, folder: Path, orientation: str = "RAS") -> Path:
    """One simulated tumour subject at ``spacing`` mm stored in ``orientation``, written once and reused."""
    from helpers.preprocess import reorient
    from helpers.scanner import scan_subject
    from helpers.simulate import DEFAULT_PROPORTIONS, CohortSettings, plan_cohort

    name = f"sub-bench{spacing:g}mm{orientation}"
    folder = folder / name / "anat"
    files = [folder / f"{name}_{m}.nii.gz" for m in ("T1w", "T2w", "FLAIR")]
    if all(f.exists() for f in files):
        return folder.parent
    settings = CohortSettings(8, spacing, 7, 0.2, tuple(DEFAULT_PROPORTIONS.items()))
    plan = next(p for p in plan_cohort(settings) if p.diagnosis == "tumour")
    t = time.perf_counter()
    subject = scan_subject(plan, spacing, settings.seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f, m in zip(files, ("T1w", "T2w", "FLAIR"), strict=True):
        data, affine = reorient(subject["images"][m], subject["affine"], orientation)
        img = nib.Nifti1Image(data, affine)
        img.set_data_dtype(np.int16)
        nib.save(img, f)
    print(f"made a {spacing:g} mm {orientation} test subject in {time.perf_counter() - t:.1f} s: "
          f"{subject['images']['T1w'].shape}, {plan.diagnosis}")
    return folder.parent


def default_runs(folder: Path) -> list[Path]:
    """Workshop-shaped classifier and segmenter with fixed random weights, as run folders."""
    profile = get_profile("workshop")
    record = {"pipeline": preprocess_config(profile).to_dict(), "input": "volume",
              "modalities": ["T1w", "T2w", "FLAIR"], "dims": 3}
    runs = []
    for task, name, classes in (("classify", "cnn", ["healthy", "lesion"]),
                                ("segment", "unet", ["background", "lesion"])):
        torch.manual_seed(0)
        model = build_model(name, 3, 2, dims=3).eval()
        run = folder / f"{task}_{name}_workshop_shape"
        save_checkpoint(run / "checkpoint.pt", {
            "model": model.state_dict(), "model_config": model.config, "task": task, "classes": classes,
            "preprocess": {**record, "labels": "binary" if task == "classify" else "lesion"},
            "train_config": {"mixed_precision": True}, "finished": True})
        runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None, help="trained run folder(s)")
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size of the test scan in mm")
    parser.add_argument("--orientation", default="PIR", help="how the test scan is stored (default PIR: "
                        "permuted axes, the costliest reorientation)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch CPU threads")
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 inference where the CPU has it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    subject = make_scan(args.spacing, OUT / "scans", args.orientation)
    run_dirs = [Path(m) for m in args.model] if args.model else default_runs(OUT / "runs")
    t = time.perf_counter()
    runs = [load_model(r, device, args.mixed_precision) for r in run_dirs]
    load_models = time.perf_counter() - t
    (case,), _ = find_cases([subject], required_modalities(runs))
    shape = nib.load(case.files["T1w"]).shape
    print(f"scan: {shape} at {args.spacing:g} mm stored {args.orientation}, 3 modalities; models: {[r.name for r in runs]}; "
          f"{args.threads} threads; mixed precision {args.mixed_precision}; loading the models {load_models:.2f} s")
    predict_case(case, runs, OUT / "predictions", report=True)  # warm-up (first-call costs)
    rows, cpu = [], []
    for _ in range(args.repeats):
        c0 = time.process_time()
        r = predict_case(case, runs, OUT / "predictions", report=False)
        cpu.append(time.process_time() - c0)
        assert r.status == "ok", r.error
        t = time.perf_counter()
        predict_case(case, runs, OUT / "predictions", report=True)
        r.seconds["report"] = time.perf_counter() - t - r.seconds["total"]  # the report's extra time
        rows.append(r.seconds)
    steps = ["load", "preprocess", "model", "to_original", "write", "report", "total"]
    med = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in steps}
    core = med["total"]
    med["total"] = core + med["report"]
    print(f"median of {args.repeats} (s): " + ", ".join(f"{k} {med[k]:.3f}" for k in steps))
    print(f"load + preprocess + predict + write (no report): {core:.2f} s  (goal <= 3 s on 2 cores: "
          f"{'met' if core <= 3 else 'missed'}); with the report: {med['total']:.2f} s")
    print(f"CPU time of the process for the same (all threads, no report): median {statistics.median(cpu):.2f} s "
          "(an upper bound for the wall time on idle cores, whatever other processes do)")
    print(f"lesion volume {r.lesion_volume_ml:.1f} ml; diagnosis {r.diagnosis}")


if __name__ == "__main__":
    main()
