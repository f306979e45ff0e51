"""Preprocessing time per volume: helpers.preprocess against TorchIO, on the same volumes, in one run.

The chain timed is the one every 3D model of the series needs: reorient to RAS,
resample to a target spacing (linear), z-score normalisation, crop-or-pad to a
fixed shape. TorchIO's equivalents: ToCanonical, Resample, ZNormalization,
CropOrPad. Volumes: the 1 mm MNI152 T1 that ships with nilearn, stored with four
header orientations (RAS, LPS, PIR, SLA: flips and permuted axes, as scanners
write them), so reorientation has real work to do.

TorchIO is NOT a dependency of the series. Install it for this script only, into
the git-ignored folder ``benchmarks/out/torchio_pkgs``:

    .venv/bin/pip install --target benchmarks/out/torchio_pkgs --no-deps torchio SimpleITK \\
        deprecated wrapt einops humanize jaxtyping wadler_lindig rich markdown-it-py mdurl typer click shellingham

Run (the Makefile's huge-page setting included):

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_preprocess.py [--repeats 5]

Prints a table of median milliseconds per volume and the ratio TorchIO / ours
(above 1: ours is faster). Without TorchIO it times ours alone and says how to
install it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TORCHIO_DIR = HERE / "out" / "torchio_pkgs"


def volumes() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The MNI152 1 mm T1 in four header orientations (same anatomy, different storage)."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    from helpers.preprocess import orientation_of

    img = load_mni152_template(resolution=1)
    data = np.asarray(img.dataobj, dtype=np.float32)
    aff = img.affine
    out = []
    for code in ("RAS", "LPS", "PIR", "SLA"):
        current = nib.orientations.io_orientation(aff)
        target = nib.orientations.axcodes2ornt(tuple(code))
        tr = nib.orientations.ornt_transform(current, target)
        d = np.ascontiguousarray(nib.orientations.apply_orientation(data, tr))
        a = aff @ nib.orientations.inv_ornt_aff(tr, data.shape)
        assert orientation_of(a) == code
        out.append((code, d, a))
    return out


def ours(data: np.ndarray, affine: np.ndarray, spacing: float, shape: tuple[int, int, int]):
    from helpers import preprocess as pp

    d, a = pp.reorient(data, affine)
    d, a = pp.resample(d, a, spacing, order=1)
    d = pp.zscore(d)
    return pp.crop_or_pad(d, a, shape, pad_value="min")


def ours_pipeline(data: np.ndarray, affine: np.ndarray, spacing: float, shape: tuple[int, int, int]):
    from helpers.preprocess import PreprocessConfig

    out = PreprocessConfig(spacing=spacing, shape=shape, crop=True, normalise="zscore").apply(data, affine)
    return out.image[0], out.geometry.affine


def torchio_chain(spacing: float, shape: tuple[int, int, int]):
    import torchio as tio

    return tio.Compose([tio.ToCanonical(), tio.Resample(spacing), tio.ZNormalization(), tio.CropOrPad(shape)])


def centroid_mm(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    w = np.clip(data - np.percentile(data, 50), 0, None).astype(np.float64)
    idx = np.indices(data.shape).reshape(3, -1)
    c = (idx * w.ravel()).sum(axis=1) / w.sum()
    return affine[:3, :3] @ c + affine[:3, 3]


def time_it(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (imports, allocator)
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--shape", type=int, default=96)
    args = parser.parse_args(argv)
    shape = (args.shape,) * 3
    import torch

    have_tio = TORCHIO_DIR.exists()
    if have_tio:
        sys.path.insert(0, str(TORCHIO_DIR))
        try:
            import torchio as tio
        except ImportError as exc:
            print(f"TorchIO in {TORCHIO_DIR} does not import ({exc}); timing ours only.")
            have_tio = False
    if not have_tio:
        print("TorchIO not installed for the benchmark; to compare, run:\n"
              "  .venv/bin/pip install --target benchmarks/out/torchio_pkgs --no-deps torchio SimpleITK "
              "deprecated wrapt einops humanize jaxtyping wadler_lindig rich markdown-it-py mdurl typer "
              "click shellingham\n")
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, load average {load[0]:.2f} {load[1]:.2f}")
    if have_tio:
        import SimpleITK as sitk

        print(f"torchio {tio.__version__}, SimpleITK {sitk.Version.VersionString()} "
              f"({sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} threads)")
    print(f"chain: reorient to RAS -> resample to {args.spacing:g} mm (linear) -> z-score -> crop/pad to "
          f"{args.shape}^3; median of {args.repeats} runs per volume\n")
    rows = []
    for code, data, affine in volumes():
        t_ours, (d_o, a_o) = time_it(lambda d=data, a=affine: ours(d, a, args.spacing, shape), args.repeats)
        t_pipe, _ = time_it(lambda d=data, a=affine: ours_pipeline(d, a, args.spacing, shape), args.repeats)
        row = {"volume": f"MNI 1 mm {code} {data.shape}", "ours_ms": t_ours, "ours_pipeline_ms": t_pipe,
               "ours_centroid_mm": centroid_mm(d_o, a_o)}
        if have_tio:
            chain = torchio_chain(args.spacing, shape)

            def run_tio(d=data, a=affine, chain=chain):
                img = tio.ScalarImage(tensor=torch.from_numpy(d)[None], affine=a)
                return chain(tio.Subject(t1=img))["t1"]

            t_tio, out = time_it(run_tio, args.repeats)
            row["torchio_ms"] = t_tio
            row["ratio"] = t_tio / t_ours
            row["tio_centroid_mm"] = centroid_mm(out.data[0].numpy(), out.affine)
            assert tuple(out.shape[1:]) == d_o.shape
        rows.append(row)
    header = f"{'volume':34s} {'ours ms':>8s} {'ours apply() ms':>16s}"
    if have_tio:
        header += f" {'torchio ms':>11s} {'torchio/ours':>13s}  centroid gap mm"
    print(header)
    for r in rows:
        line = f"{r['volume']:34s} {r['ours_ms']:8.1f} {r['ours_pipeline_ms']:16.1f}"
        if have_tio:
            gap = float(np.linalg.norm(r["ours_centroid_mm"] - r["tio_centroid_mm"]))
            line += f" {r['torchio_ms']:11.1f} {r['ratio']:13.2f}  {gap:.2f}"
        print(line)
    if have_tio:
        ratio = statistics.median(r["ratio"] for r in rows)
        print(f"\nmedian ratio torchio/ours: {ratio:.2f} ({'ours faster' if ratio > 1 else 'TorchIO faster'})")
    print("'ours apply() ms' is the full PreprocessConfig.apply (adds head mask and crop to the head).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
