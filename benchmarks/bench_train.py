"""Training speed per model, and the issue's accuracy targets on the simulated cohort.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_train.py --speed
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_train.py --targets
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_train.py --targets \
        --only unet_classifier segment --seeds 42 1 2 --train-args "--modalities FLAIR"

``--speed``: steps per second (and samples per second) of one training step
(forward, loss, backward, AdamW) for each model at the profile's sizes, with the
engine's speed settings (bf16 autocast and channels-last where the CPU has native
bf16). On a CUDA GPU it also prints volumes per second and the GPU utilisation
sampled with ``nvidia-smi`` while the steps run.

``--targets``: trains, exactly as ``python -m helpers.train`` does, (1) the 3D
CNN for healthy versus lesion from one label per scan and (2) the 3D lesion-map
classifier (``unet_classifier``, trained on the lesion masks), each capped at
180 s of training, and reports test ROC-AUC (goal >= 0.95); (3) the 3D U-Net for
lesions, capped at 300 s, and reports test lesion Dice (goal >= 0.7). ``--only``
picks targets, ``--seeds`` repeats each with other training seeds (same split),
``--train-args`` passes options such as ``--modalities FLAIR``. Run folders go to
``benchmarks/out/runs/``.

The machine's load average is printed with every number: on a shared machine,
timings are only comparable at similar load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from helpers import runtime
from helpers.models import build_model, count_parameters
from helpers.train import TaskLoss, set_memory_format

OUT = Path(__file__).resolve().parent / "out"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} (1/5 min) on {os.cpu_count()} CPUs"


class GpuSampler:
    """Samples GPU utilisation with nvidia-smi in a background thread (CUDA only)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else float("nan")


def time_steps(name: str, dims: int, batch: int, size: int, task: str, device, steps: int, warmup: int = 3):
    speed = runtime.speed_settings(device)
    torch.manual_seed(0)
    model = set_memory_format(build_model(name, 3, 2, dims=dims).to(device), speed)
    shape = (batch, 3) + (size,) * dims
    x = torch.randn(shape, device=device).contiguous(memory_format=speed.memory_format(dims))
    y = (torch.randint(0, 2, (batch,) + (size,) * dims, device=device) if task == "segment"
         else torch.randint(0, 2, (batch,), device=device))
    loss_fn = TaskLoss(task)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=speed.grad_scaler)
    times = []
    for i in range(warmup + steps):
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()
        start = time.perf_counter()
        with speed.autocast():
            out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type != "cpu":
            getattr(torch, device.type).synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), count_parameters(model)


def speed(profile: str, steps: int) -> None:
    P = runtime.get_profile(profile)
    device = runtime.get_device()
    s = runtime.speed_settings(device)
    print(f"profile {P.name}; device {device}; autocast {s.amp_dtype}; channels-last {s.channels_last}; "
          f"threads {torch.get_num_threads()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
    cases = [
        ("mlp", 3, P.batch_size, P.volume_size, "classify"),
        ("cnn", 2, 4 * P.batch_size, P.slice_size, "classify"),
        ("cnn", 3, P.batch_size, P.volume_size, "classify"),
        ("cnn_gru", 3, P.batch_size, P.volume_size, "classify"),
        ("unet", 2, 4 * P.batch_size, P.slice_size, "segment"),
        ("unet", 3, max(2, P.batch_size // 2), P.volume_size, "segment"),
    ]
    print(f"| model | input | batch | parameters | s/step (median of {steps}) | steps/s | samples/s | GPU util % | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, dims, batch, size, task in cases:
        sampler = GpuSampler() if device.type == "cuda" else None
        if sampler:
            with sampler:
                sec, params = time_steps(name, dims, batch, size, task, device, steps)
            util = f"{sampler.mean:.0f}"
        else:
            sec, params = time_steps(name, dims, batch, size, task, device, steps)
            util = "-"
        print(f"| {name} {dims}D | {size}^{dims} x 3 | {batch} | {params:,} | {sec:.3f} | {1 / sec:.2f} | "
              f"{batch / sec:.1f} | {util} | {load()} |", flush=True)


TARGETS = {  # key: (title, task, cap in s, metric, goal, run name, extra train options)
    "cnn": ("3D CNN, healthy vs lesion (one label per scan)", "classify", 180.0, "auc", 0.95,
            "classify_binary_cnn_3d", ["--model", "cnn"]),
    "unet_classifier": ("3D lesion-map classifier, healthy vs lesion (trained on lesion masks)", "classify", 180.0,
                        "auc", 0.95, "classify_binary_unet_classifier_3d", ["--model", "unet_classifier"]),
    "segment": ("3D U-Net, lesion segmentation", "segment", 300.0, "dice", 0.70, "segment_unet_3d", []),
}


def targets(profile: str, only: list[str] | None = None, extra: list[str] | None = None,
            seeds: list[int] | None = None) -> None:
    import json

    from helpers import simulate
    from helpers.train import main

    P = runtime.get_profile(profile)
    root = simulate.ensure_cohort(P)
    runs = OUT / "runs" / P.name
    for key, (title, task, cap, metric, goal, name, options) in TARGETS.items():
        if only and key not in only:
            continue
        values = []
        for seed in seeds or [P.seed]:
            print(f"\n== {title}, seed {seed}: training capped at {cap:.0f} s ({load()})", flush=True)
            start = time.perf_counter()
            out = runs / (name if seed == P.seed else f"{name}_seed{seed}")
            code = main(["--data", str(root), "--task", task, "--profile", P.name, "--max-seconds", str(cap),
                         "--out", str(out), "--no-resume", "--seed", str(seed), *options, *(extra or [])])
            wall = time.perf_counter() - start
            m = json.loads((out / "metrics.json").read_text())
            value = m["test"][metric]
            values.append(value)
            print(f"RESULT {title}, seed {seed}: test {metric} {value:.3f} (goal >= {goal}: "
                  f"{'met' if value >= goal else 'NOT met'}); training {m['train_seconds']:.0f} s, "
                  f"{m['epochs_run']} epochs, best epoch {m['best_epoch']}, stopped by {m['stopped']}; "
                  f"validation {metric} {m['validation'][metric]:.3f}; wall {wall:.0f} s incl. data; exit {code}; "
                  f"{load()}", flush=True)
        if len(values) > 1:
            print(f"SUMMARY {title}: test {metric} over seeds {seeds}: "
                  f"mean {statistics.mean(values):.3f}, min {min(values):.3f}, max {max(values):.3f}; "
                  f"goal >= {goal} met in {sum(v >= goal for v in values)} of {len(values)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="workshop")
    parser.add_argument("--speed", action="store_true", help="steps per second per model")
    parser.add_argument("--targets", action="store_true", help="the issue's accuracy targets")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--only", nargs="+", choices=tuple(TARGETS), default=None,
                        help="these targets only (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="training seeds to repeat each target with (the split stays the same); default: the profile's")
    parser.add_argument("--train-args", default="", help="extra helpers.train options, e.g. '--modalities FLAIR'")
    args = parser.parse_args(argv)
    if not (args.speed or args.targets):
        args.speed = True
    if args.speed:
        speed(args.profile, args.steps)
    if args.targets:
        targets(args.profile, args.only, args.train_args.split(), args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
