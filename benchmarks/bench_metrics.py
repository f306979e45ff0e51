"""How long do bootstrap intervals take? Prints seconds for classification_report.

Run: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_metrics.py
Goal (helpers.metrics): 1,000-2,000 resamples of a few hundred cases well under a second.
"""

from __future__ import annotations

import os
import time

import numpy as np

from helpers.metrics import classification_report


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"load average: {os.getloadavg()}")
    for n in (300, 1000):
        y = rng.integers(0, 2, n)
        p = 1 / (1 + np.exp(-(rng.normal(size=n) + y)))
        y3 = rng.integers(0, 3, n)
        logits = rng.normal(size=(n, 3)) + np.eye(3)[y3]
        p3 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        for n_boot in (1000, 2000):
            t2 = timed(lambda y=y, p=p, b=n_boot: classification_report(y, p, n_boot=b))
            t3 = timed(lambda y=y3, p=p3, b=n_boot: classification_report(y, p, n_boot=b))
            print(f"n={n:5d} n_boot={n_boot}: binary {t2:.3f} s, 3-class {t3:.3f} s (median of 5)")


if __name__ == "__main__":
    main()
