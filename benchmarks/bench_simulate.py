"""How fast the simulated cohort is made: smoke (24 subjects) and workshop (200) at 2 mm.

Goals (issue 3): smoke cohort in at most 20 s and workshop cohort in at most
3 minutes on 2 CPU cores, from an empty folder (template cache already built), and
a rerun that reuses everything in well under a second.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_simulate.py
    .venv/bin/python benchmarks/bench_simulate.py --only smoke --jobs 2

Each cohort is generated in a fresh sub-process (so the timing includes Python and
library start-up, like a user's command), into ``benchmarks/out/simulate/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "simulate"
COHORTS = {"smoke": (24, 2.0), "workshop": (200, 2.0), "full-sample": (8, 1.0)}
GOALS_S = {"smoke": 20.0, "workshop": 180.0}


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "helpers.simulate", *args], check=True,
                   cwd=HERE.parent, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(COHORTS), action="append",
                        help="cohort(s) to time (default: smoke and workshop)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU cores)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    names = args.only or ["smoke", "workshop"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU cores available: {cores}; load average before: {os.getloadavg()}")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    # Build the template caches first: a one-off cost, not part of making a cohort.
    for spacing in sorted({COHORTS[n][1] for n in names}):
        code = f"from helpers import anatomy; anatomy.load_template({spacing})"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE.parent)
        print(f"template cache at {spacing:g} mm ready in {time.perf_counter() - t:.1f} s")
    print(f"{'cohort':<12} {'subjects':>8} {'spacing':>7} {'fresh (s)':>10} {'per subj':>9} "
          f"{'rerun (s)':>10} {'goal (s)':>9} {'load after':>10}")
    for name in names:
        n, spacing = COHORTS[name]
        folder = OUT / f"{name}_n{n}_{spacing:g}mm"
        shutil.rmtree(folder, ignore_errors=True)
        common = ["--out", str(folder), "--subjects", str(n), "--spacing", str(spacing),
                  "--seed", str(args.seed)]
        if args.jobs:
            common += ["--jobs", str(args.jobs)]
        fresh = _run(common)
        rerun = _run(common)
        goal = GOALS_S.get(name)
        print(f"{name:<12} {n:>8} {spacing:>6g}mm {fresh:>10.1f} {fresh / n:>9.2f} {rerun:>10.2f} "
              f"{(f'{goal:.0f}' if goal else '-'):>9} {os.getloadavg()[0]:>10.2f}")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file()) / 2**20
    print(f"disk used under {OUT}: {size:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
