"""How long do heat maps take? Grad-CAM and occlusion on the series' 3D CNN, CPU.

Run: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_explain.py
Prints the median of a few runs per setting (untrained weights: the time does not
depend on what the network learnt).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from helpers import explain
from helpers.models import build_model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (first-call kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    for size in (32, 48):
        model = build_model("cnn", 3, 2, dims=3).eval()  # default depth 4, width 16 (as notebook 05)
        x = torch.randn(1, 3, size, size, size)
        cam = timed(lambda m=model, x=x: explain.grad_cam(m, x, class_index=1), 5)
        patch = size // 4
        occ = timed(lambda m=model, x=x, p=patch: explain.occlusion(m, x, class_index=1, patch=p,
                                                                   stride=p // 2), 1)
        positions = len(range(0, size - patch + 1, patch // 2)) ** 3
        print(f"{size}^3: Grad-CAM {cam * 1000:.0f} ms; occlusion (cube {patch}, stride {patch // 2}, "
              f"{positions} positions) {occ:.1f} s")


if __name__ == "__main__":
    main()
