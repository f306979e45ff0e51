"""Export a trained run for use outside this project: TorchScript, ONNX, and a model card.

- :func:`export_torchscript` traces the network (``torch.jit.trace``) into
  ``RUN/export/model.torchscript.pt``, which ``torch.jit.load`` runs without the
  ``helpers`` package. TorchScript is deprecated in recent PyTorch releases (they
  warn and point to ``torch.export``) but still runs and is still read by C++
  LibTorch; the deprecation warnings are silenced here and said once in the docs.
- :func:`export_onnx` writes ``RUN/export/model.onnx`` with PyTorch's current
  exporter (``torch.onnx.export(dynamo=True)``, which needs the ``onnxscript``
  package), a dynamic batch size, input ``image`` and output ``logits``. Where that
  exporter cannot translate a layer (the MLP's adaptive average pooling in 3D),
  it falls back to the older TorchScript-based exporter (``dynamo=False``) and
  says so. :func:`check_onnx` runs the file with ONNX Runtime and compares it with
  PyTorch on the same input.
- ``RUN/export/preprocess.json`` holds the preprocessing record (the networks take
  preprocessed tensors: whoever runs the exported file must apply it first, as
  :mod:`helpers.predict` does) and ``RUN/export/export.json`` the input and output
  description, the classes, and the checks' results.
- :func:`model_card` / :func:`write_model_card` write ``RUN/model_card.md`` and
  ``RUN/model_card.json`` next to the checkpoint: training data (source, subjects
  per split, class counts), preprocessing, training settings, test metrics with
  bootstrap 95 % intervals, intended use, limitations, and the statement that it is
  a teaching model, not a medical device.

Command line::

    python -m helpers.export --run runs/classify_binary_cnn_3d [--formats torchscript onnx] [--no-card]

Example:
    >>> files = export_run("runs/classify_binary_cnn_3d")   # doctest: +SKIP
    >>> files["onnx_check"]["max_abs_diff"] < 1e-4            # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.io import DataError, atomic_path, write_json, write_text

EXPORT_DIR = "export"
TORCHSCRIPT = "model.torchscript.pt"
ONNX = "model.onnx"
ONNX_TOLERANCE = 1e-4
"""Largest absolute difference in logits accepted between ONNX Runtime and PyTorch (float32)."""
DISCLAIMER = ("This is a teaching model, not a medical device. It was trained on simulated data and must "
              "never be used to diagnose, treat or triage a patient.")
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- loading


def _load(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any], Path]:
    from helpers.train import load_run

    run = Path(run)
    model, ckpt = load_run(run, CPU)
    run_dir = run if run.is_dir() else run.parent
    return model.float().eval(), ckpt, run_dir


def input_shape(checkpoint: dict[str, Any], batch: int = 1) -> tuple[int, ...]:
    """The tensor shape a run's network takes: ``(B, C, X, Y, Z)`` (volumes) or ``(B, C, H, W)`` (slices)."""
    record = checkpoint.get("preprocess") or {}
    pipeline = record.get("pipeline") or {}
    shape = pipeline.get("shape")
    channels = int(checkpoint["model_config"]["in_channels"])
    if not shape:
        raise DataError(Path("checkpoint"), "the preprocessing has no fixed shape, so the input size is unknown")
    if record.get("input") == "volume":
        return (batch, channels, *[int(s) for s in shape])
    return (batch, channels, *[int(s) for s in shape[:2]])


def example_input(checkpoint: dict[str, Any], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A random input of the right shape (z-scored intensities look like standard normal noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(input_shape(checkpoint, batch), generator=g)


# --------------------------------------------------------------------------- TorchScript


def export_torchscript(run: str | Path, out: str | Path | None = None) -> Path:
    """Trace a run's network to TorchScript; returns the file (default ``RUN/export/model.torchscript.pt``)."""
    model, ckpt, run_dir = _load(run)
    out = Path(out) if out is not None else run_dir / EXPORT_DIR / TORCHSCRIPT
    x = example_input(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* deprecation notices (see the module docstring)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        with atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp))
    return out


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """Load an exported TorchScript file (on the CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location=CPU)


# --------------------------------------------------------------------------- ONNX


def export_onnx(run: str | Path, out: str | Path | None = None, opset: int | None = None) -> tuple[Path, str]:
    """Export a run's network to ONNX with a dynamic batch size.

    Returns:
        ``(path, exporter)``: the file (default ``RUN/export/model.onnx``) and which
        exporter made it (``"dynamo"``, or ``"torchscript"`` after a fallback).
    """
    model, ckpt, run_dir = _load(run)
    out = Path(out) if out is not None else run_dir / EXPORT_DIR / ONNX
    x = example_input(ckpt)
    names = {"input_names": ["image"], "output_names": ["logits"]}
    with atomic_path(out) as tmp:
        try:
            batch = torch.export.Dim("batch", min=1, max=1024)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(tmp), dynamo=True, verbose=False, external_data=False,
                                  dynamic_shapes={"x": {0: batch}}, opset_version=opset, **names)
            exporter = "dynamo"
        except Exception as exc:  # noqa: BLE001 (any translation failure: try the older exporter)
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # no terminal colour codes
            detail = re.search(r"<class '[^']+'>: (.+)", text)  # the exporter's own summary, if any
            reason = (detail.group(1) if detail else text.splitlines()[0] if text else type(exc).__name__)[:200]
            print(f"ONNX: the torch.export-based exporter failed ({reason}); using the TorchScript-based one.")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset or 17,
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, **names)
            exporter = "torchscript"
    return out, exporter


def check_onnx(run: str | Path, onnx_path: str | Path | None = None, x: torch.Tensor | None = None,
               atol: float = ONNX_TOLERANCE) -> dict[str, Any]:
    """Run an exported ONNX file with ONNX Runtime and compare its logits with PyTorch's.

    Returns:
        ``max_abs_diff``, ``atol``, ``ok`` (difference within ``atol`` and the same
        predicted class for every sample), ``same_argmax``, ``batch``, ``runtime``.
    """
    import onnxruntime as ort

    model, ckpt, run_dir = _load(run)
    onnx_path = Path(onnx_path) if onnx_path is not None else run_dir / EXPORT_DIR / ONNX
    x = example_input(ckpt, batch=3, seed=1) if x is None else x
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    seconds = time.perf_counter() - t
    with torch.no_grad():
        want = model(x).numpy()
    diff = float(np.abs(got - want).max())
    same = bool((got.argmax(1) == want.argmax(1)).all())
    return {"max_abs_diff": diff, "atol": atol, "ok": diff <= atol and same, "same_argmax": same,
            "batch": int(x.shape[0]), "runtime": f"onnxruntime {ort.__version__}", "onnx_seconds": seconds}


def check_torchscript(run: str | Path, path: str | Path | None = None, atol: float = 1e-5) -> dict[str, Any]:
    """Run the TorchScript file and compare with the original network (another batch size than traced)."""
    model, ckpt, run_dir = _load(run)
    path = Path(path) if path is not None else run_dir / EXPORT_DIR / TORCHSCRIPT
    x = example_input(ckpt, batch=3, seed=2)
    with torch.no_grad():
        diff = float((load_torchscript(path)(x) - model(x)).abs().max())
    return {"max_abs_diff": diff, "atol": atol, "ok": diff <= atol, "batch": 3}


# --------------------------------------------------------------------------- model card


def _split_counts(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """Subjects and class counts per split, from the dataset the run was trained on (if it is here)."""
    from helpers.datasets import load_dataset
    from helpers.runtime import get_profile

    info = ckpt.get("data") or {}
    source = info.get("source")
    if not source or not Path(source).exists():
        return None
    try:
        seed = get_profile(info["profile"]).seed if info.get("profile") else 42
        table = load_dataset(source, seed=seed)
    except (DataError, ValueError, OSError):
        return None
    out: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        rows = table.split(split)
        out[split] = {"subjects": int(rows["subject"].nunique()), "cases": len(rows),
                      "classes": {str(k): int(v) for k, v in rows["label"].astype(str).value_counts().sort_index().items()}}
    return out


def card_metrics(run: str | Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Test-set scores with bootstrap 95 % intervals for the model card.

    In order of preference: ``RUN/evaluation/metrics.json`` (written by
    :mod:`helpers.evaluate`); else computed here on the run's test split (rebuilt
    with the checkpoint's preprocessing; subject-level for slice models); else the
    point estimates from ``metrics.json`` with no interval.
    """
    from helpers import metrics as M

    model, ckpt, run_dir = _load(run)
    evaluation = run_dir / "evaluation" / "metrics.json"
    if evaluation.exists():
        data = json.loads(evaluation.read_text(encoding="utf-8"))
        if isinstance(data.get("test"), dict) and "scores" in data["test"]:  # a classifier's evaluation
            scores, n = data["test"]["scores"], data["test"].get("n_cases")
            if data["test"].get("threshold") is not None:
                return {"from": str(evaluation), "scores": scores, "n_cases": n,
                        "threshold": data["test"]["threshold"]}
        elif isinstance(data.get("summary"), dict):  # a segmenter's: mean over cases with intervals
            scores, n = {k: {"mean": v} for k, v in data["summary"].items()}, data.get("test_subjects")
        else:
            scores, n = data.get("scores") or {}, data.get("test_subjects") or data.get("n_cases")
        return {"from": str(evaluation), "scores": scores, "n_cases": n}
    info, record = ckpt.get("data") or {}, ckpt.get("preprocess") or {}
    source = info.get("source")
    if source and Path(source).exists():
        from helpers.runtime import get_profile
        from helpers.train import predict
        from helpers.training_data import healthy_class, prepare

        try:
            profile = get_profile(info.get("profile") or "smoke")
            prep = prepare(source, task=ckpt["task"], profile=profile, input=record.get("input"),
                           labels=record.get("labels") if ckpt["task"] == "classify" else "binary",
                           n_slices=record.get("n_slices") or 16, verbose=False)
        except (DataError, ValueError) as exc:
            prep, problem = None, str(exc)
        if prep is not None and record.get("pipeline") == prep.preprocess.get("pipeline"):
            probs = predict(model, prep.test.x, mixed_precision=False)
            if ckpt["task"] == "classify":
                y = prep.test.y.numpy()
                if prep.input == "slices":  # per subject: its most suspicious slice (as helpers.predict)
                    healthy = prep.classes.index(healthy_class(prep.classes))
                    subjects = np.array(prep.subjects["test"])
                    names = sorted(set(subjects.tolist()))
                    rows, labels = [], []
                    for s in names:
                        idx = np.flatnonzero(subjects == s)
                        rows.append(probs[idx[int(torch.argmin(probs[idx, healthy]))]].numpy())
                        sick = set(y[idx].tolist()) - {healthy}
                        labels.append(sick.pop() if sick else healthy)
                    p, y = np.stack(rows), np.array(labels)
                else:
                    p = probs.numpy()
                report = M.classification_report(y, p, ckpt.get("classes"), n_boot=n_boot, seed=seed)
                return {"from": "computed on the test split by helpers.export.card_metrics",
                        "n_cases": report.n_cases, "scores": report.as_dict()["scores"]}
            pred = probs.argmax(1).numpy()
            truth = prep.test.y.numpy()
            dices = [M.dice(a > 0, b > 0) for a, b in zip(pred, truth, strict=True)]
            return {"from": "computed on the test split by helpers.export.card_metrics", "n_cases": len(dices),
                    "scores": {"dice": {"mean": M.bootstrap_mean(dices, n_boot, seed).as_dict()}}}
        note = "the dataset no longer matches the checkpoint's preprocessing" if prep is not None else problem
    else:
        note = "the training data are not on this machine"
    test = (ckpt.get("metrics") or {}).get("test") or {}
    return {"from": f"checkpoint metrics (no interval: {note})", "n_cases": None,
            "scores": {k: {"overall": {"value": v, "low": None, "high": None}} for k, v in test.items()}}


def _fmt(e: Any) -> str:
    if not isinstance(e, dict) or e.get("value") is None:
        return "n/a"
    if e.get("low") is None or e.get("high") is None or any(
            isinstance(v, float) and math.isnan(v) for v in (e["low"], e["high"])):
        return f"{e['value']:.3f}"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def model_card(run: str | Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything a model card says, as a JSON-ready dict (see :func:`write_model_card`)."""
    from helpers.models import count_parameters

    model, ckpt, run_dir = _load(run)
    record = ckpt.get("preprocess") or {}
    info = ckpt.get("data") or {}
    tc = ckpt.get("train_config") or {}
    history = ckpt.get("history") or []
    return {
        "name": run_dir.name,
        "task": ckpt["task"],
        "classes": ckpt.get("classes"),
        "model": {**ckpt["model_config"], "parameters": count_parameters(model)},
        "input": {"modalities": record.get("modalities"), "kind": record.get("input"),
                  "tensor_shape": list(input_shape(ckpt)), "labels": record.get("labels")},
        "training_data": {"source": info.get("source"), "kind": info.get("kind"), "profile": info.get("profile"),
                          "samples": info.get("samples"), "subjects": info.get("subjects"),
                          "dataset_classes": info.get("dataset_classes"), "splits": _split_counts(ckpt)},
        "preprocessing": record.get("pipeline"),
        "training": {"epochs_run": len(history), "best_epoch": ckpt.get("best_epoch"),
                     "monitor": ckpt.get("monitor"), "train_seconds": ckpt.get("train_seconds"),
                     "stopped": ckpt.get("stopped"),
                     **{k: tc.get(k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed")}},
        "validation": (ckpt.get("metrics") or {}).get("validation"),
        "test_metrics": card_metrics(run_dir, n_boot, seed),
        "intended_use": ("Teaching: to show students and clinicians how a brain-MRI deep-learning model is "
                         "trained, evaluated and deployed, on simulated data, end to end."),
        "out_of_scope": ["diagnosis, triage or treatment of any patient", "any clinical or research decision",
                         "real scans: the model has only seen simulated ones"],
        "limitations": [
            "trained and tested on simulated scans (MNI152 anatomy, four simulated sites); scores do not "
            "transfer to real patients",
            "small training sets: wide confidence intervals; a different split would give other numbers",
            "probabilities are model outputs, not calibrated risks",
            "only the modalities, diagnoses and lesion types of the simulation are known to it",
        ],
        "disclaimer": DISCLAIMER,
    }


def model_card_markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown for people."""
    lines = [f"# Model card: {card['name']}", "", f"> **{card['disclaimer']}**", ""]
    m, inp, td = card["model"], card["input"], card["training_data"]
    lines += ["## Model", "",
              f"- Task: {card['task']}; classes: {', '.join(card['classes'] or [])}",
              f"- Network: {m['name']} ({m.get('dims')}D, depth {m.get('depth')}, width {m.get('width')}), "
              f"{m['parameters']:,} parameters",
              f"- Input: {inp['kind']} of modalities {', '.join(inp['modalities'] or [])}; tensor "
              f"{tuple(inp['tensor_shape'])}", ""]
    lines += ["## Training data", "", f"- Source: `{td['source']}` ({td['kind']}, profile {td['profile']})"]
    if td.get("splits"):
        lines += ["", "| split | subjects | cases | classes |", "| --- | --- | --- | --- |"]
        for split, s in td["splits"].items():
            cls = ", ".join(f"{k} {v}" for k, v in s["classes"].items())
            lines.append(f"| {split} | {s['subjects']} | {s['cases']} | {cls} |")
    elif td.get("samples"):
        lines.append(f"- Samples per split: {td['samples']}")
    pre = card.get("preprocessing") or {}
    lines += ["", "## Preprocessing (saved with the checkpoint, re-applied by helpers.predict)", "",
              f"- Reorient to {pre.get('orientation')}; resample to {pre.get('spacing')} mm; "
              f"crop to the head ({pre.get('crop')}, margin {pre.get('crop_margin_mm')} mm); "
              f"skull strip {pre.get('skull_strip')}; bias correction {pre.get('bias_correction')}; "
              f"normalise {pre.get('normalise')}; {pre.get('shape_mode')} to {pre.get('shape')}", ""]
    tr = card["training"]
    lines += ["## Training", "",
              f"- {tr['epochs_run']} epoch(s) (best {tr['best_epoch']} on {tr['monitor']}), "
              f"{tr['train_seconds'] or 0:.1f} s of training; batch {tr['batch_size']}, lr {tr['lr']}, seed {tr['seed']}; "
              f"stopped: {tr['stopped']}", ""]
    tm = card["test_metrics"]
    where = f"Source: {tm['from']}; test cases: {tm['n_cases']}"
    if tm.get("threshold") is not None:
        where += f"; decision threshold {tm['threshold']:.3f} (chosen on validation)"
    lines += ["## Test metrics (95 % bootstrap intervals)", "", where, "",
              "| metric | scope | value [95 % CI] |", "| --- | --- | --- |"]
    classes = card.get("classes") or []
    keep = {"overall", "mean", classes[1]} if len(classes) == 2 else {"overall", "mean", "macro"}
    for metric, scopes in (tm.get("scores") or {}).items():
        if not isinstance(scopes, dict):
            continue
        for scope, est in scopes.items():
            if isinstance(est, dict) and "value" in est and scope in keep:
                lines.append(f"| {metric} | {scope} | {_fmt(est)} |")
    lines += ["", "## Intended use", "", card["intended_use"], "", "Out of scope: " +
              "; ".join(card["out_of_scope"]) + ".", "", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    lines += ["", f"**{card['disclaimer']}**", ""]
    return "\n".join(lines)


def write_model_card(run: str | Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Path]:
    """Write ``model_card.json`` and ``model_card.md`` next to the checkpoint; returns their paths."""
    card = model_card(run, n_boot, seed)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    return {"json": write_json(run_dir / "model_card.json", card),
            "md": write_text(run_dir / "model_card.md", model_card_markdown(card))}


# --------------------------------------------------------------------------- everything


def export_run(run: str | Path, formats: Sequence[str] = ("torchscript", "onnx"), card: bool = True,
               n_boot: int = 1000) -> dict[str, Any]:
    """Export a run in every format, check each export, write the model card; returns what was written."""
    _, ckpt, run_dir = _load(run)
    folder = run_dir / EXPORT_DIR
    out: dict[str, Any] = {}
    if "torchscript" in formats:
        out["torchscript"] = export_torchscript(run_dir)
        out["torchscript_check"] = check_torchscript(run_dir, out["torchscript"])
    if "onnx" in formats:
        out["onnx"], out["onnx_exporter"] = export_onnx(run_dir)
        out["onnx_check"] = check_onnx(run_dir, out["onnx"])
    out["preprocess"] = write_json(folder / "preprocess.json", ckpt.get("preprocess"))
    out["export"] = write_json(folder / "export.json", {
        "run": str(run_dir), "task": ckpt["task"], "classes": ckpt.get("classes"),
        "input": {"name": "image", "shape": ["batch", *input_shape(ckpt)[1:]], "dtype": "float32",
                  "note": "preprocessed with preprocess.json (helpers.preprocess.PreprocessConfig)"},
        "output": {"name": "logits", "note": "softmax over axis 1 gives class probabilities"
                   + (" per voxel" if ckpt["task"] == "segment" else "")},
        "torchscript": out.get("torchscript"), "torchscript_check": out.get("torchscript_check"),
        "onnx": out.get("onnx"), "onnx_exporter": out.get("onnx_exporter"), "onnx_check": out.get("onnx_check"),
        "torch": torch.__version__, "disclaimer": DISCLAIMER})
    if card:
        out.update({f"model_card_{k}": v for k, v in write_model_card(run_dir, n_boot).items()})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.export --run RUN [--formats torchscript onnx] [--no-card]``."""
    parser = argparse.ArgumentParser(prog="python -m helpers.export",
                                     description="Export a trained run to TorchScript and ONNX (checked with "
                                                 "ONNX Runtime) and write its model card.")
    parser.add_argument("--run", required=True, help="a run folder from helpers.train")
    parser.add_argument("--formats", nargs="+", default=["torchscript", "onnx"], choices=("torchscript", "onnx"))
    parser.add_argument("--no-card", action="store_true", help="skip the model card")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the card's intervals")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run, args.formats, not args.no_card, args.bootstrap)
    except (DataError, ValueError) as exc:
        print(f"Problem: {exc}", file=sys.stderr)
        return 2
    for key, value in out.items():
        print(f"{key}: {value}")
    bad = [k for k in ("onnx_check", "torchscript_check") if k in out and not out[k]["ok"]]
    if bad:
        print(f"Check failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(DISCLAIMER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
