"""Time per slider step of helpers.viewer on a 1 mm brain volume (goal: 100 ms or less).

The volume is the MNI152 1 mm template shipped inside nilearn (197 x 233 x 189
voxels, no download). One "step" is what a slider move costs in the kernel: take
the new slice, update the figure's artists in place, render it, encode the PNG and
hand it to the widget. Sending it to the browser is not included (local, small).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_viewer.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def _steps(viewer, indices, action) -> list[float]:
    times = []
    for index in indices:
        start = time.perf_counter()
        action(index)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _line(name: str, times: list[float]) -> str:
    times = sorted(times)
    p90 = times[int(0.9 * (len(times) - 1))]
    return (f"{name:<38} median {statistics.median(times):6.1f} ms   p90 {p90:6.1f} ms   "
            f"n={len(times)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="slider steps per measurement")
    args = parser.parse_args(argv)

    import matplotlib.pyplot as plt
    from nilearn.datasets import load_mni152_template

    from helpers import viewer as V

    template = load_mni152_template(resolution=1)
    data = np.asarray(template.dataobj, np.float32)
    affine = template.affine
    # a label blob and a smooth heat map on the same grid, to time the overlays too
    i, j, k = np.ogrid[: data.shape[0], : data.shape[1], : data.shape[2]]
    labels = (((i - 70) ** 2 + (j - 120) ** 2 + (k - 90) ** 2) < 15**2).astype(np.int16)
    labels[((i - 130) ** 2 + (j - 100) ** 2 + (k - 80) ** 2) < 10**2] = 2
    heat = np.exp(-((i - 120) ** 2 + (j - 140) ** 2 + (k - 100) ** 2) / 800.0).astype(np.float32)

    load = os.getloadavg()
    print(f"helpers.viewer benchmark · {platform.processor() or platform.machine()} · "
          f"{os.cpu_count()} CPUs · load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"volume {data.shape}, spacing {V.voxel_spacing(affine)} mm; {args.steps} steps each\n")

    figures, pyplot_figures = V._Renderer.figures_created, len(plt.get_fignums())
    start = time.perf_counter()
    plain = V.SliceViewer({"T1": (data, affine), "inverted": (data.max() - data, affine)})
    print(f"{'build the viewer (2 modalities)':<38} {1000 * (time.perf_counter() - start):6.1f} ms")
    axial = list(range(40, 40 + args.steps))
    print(_line("axial slider step", _steps(plain, axial, plain.set_slice)))
    plain.set_view("coronal")
    print(_line("coronal slider step", _steps(plain, axial, plain.set_slice)))
    plain.set_view("three")
    print(_line("three-plane slider step", _steps(plain, axial, plain.set_slice)))
    names = ["inverted", "T1"] * (args.steps // 2)
    print(_line("three-plane modality switch", _steps(plain, names, plain.set_modality)))
    start = time.perf_counter()
    png = plain.static_png()
    print(f"{'static three-plane PNG (fallback)':<38} {1000 * (time.perf_counter() - start):6.1f} ms"
          f"   {len(png) / 1024:.0f} KiB")
    plain.close()

    over = V.SliceViewer((data, affine), labels=(labels, affine), heatmap=(heat, affine))
    print(_line("axial step, labels + heat map", _steps(over, axial, over.set_slice)))
    levels = list(np.linspace(0.1, 0.9, args.steps))
    print(_line("opacity change, labels + heat map", _steps(over, levels, over.set_opacity)))
    # where the time goes, for one axial frame
    state = over._state()
    draw = _steps(over, range(10), lambda _: over._renderer.draw(state))
    draw_png = _steps(over, range(10), lambda _: over._renderer.png(state))
    print(f"  of which: figure update + draw {statistics.median(draw):.1f} ms, "
          f"+ PNG encoding {statistics.median(draw_png) - statistics.median(draw):.1f} ms (medians)")
    over.close()
    print(f"\nfigures made: {V._Renderer.figures_created - figures} (one per viewer); "
          f"pyplot figures added: {len(plt.get_fignums()) - pyplot_figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
