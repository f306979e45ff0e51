"""helpers.export: TorchScript and ONNX match PyTorch; the model card says what it must; a real run deploys.

ONNX files are run with ONNX Runtime (CPU) and compared with PyTorch on the same
random input, at another batch size than the one exported (the batch axis is
dynamic). Tolerance: 1e-4 absolute on the logits (float32), and the same argmax.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import fixed_models, head_scan, save, write_run

from helpers import export
from helpers.models import build_model

ARCHITECTURES = [
    ("cnn", "classify", 3, {"depth": 2, "width": 4}),
    ("unet", "segment", 3, {"depth": 2, "width": 4}),
    ("cnn_gru", "classify", 3, {"depth": 2, "width": 4}),
    ("mlp", "classify", 3, {"depth": 1, "width": 16}),  # the dynamo exporter cannot translate 3D adaptive pooling
    ("cnn", "classify", 2, {"depth": 2, "width": 4}),   # a slice model
    ("unet_classifier", "classify", 3, {"depth": 2, "width": 4}),
]


def _run_with(folder: Path, name: str, task: str, dims: int, kwargs: dict) -> Path:
    torch.manual_seed(0)
    model = build_model(name, 2, 2, dims=dims, **kwargs)
    for m in model.modules():  # non-trivial batch-norm statistics, so eval mode matters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    run = write_run(folder, model.eval(), task, modalities=("T1w", "FLAIR"), size=16)
    if dims == 2:  # a slice model: same checkpoint, input "slices"
        from helpers.train import load_checkpoint, save_checkpoint

        ckpt = load_checkpoint(run)
        ckpt["preprocess"]["input"] = "slices"
        ckpt["preprocess"]["pipeline"]["shape"] = [16, 16, 8]
        save_checkpoint(run / "checkpoint.pt", ckpt)
    return run


@pytest.mark.parametrize("name, task, dims, kwargs", ARCHITECTURES, ids=[f"{a[0]}{a[2]}d" for a in ARCHITECTURES])
def test_onnx_and_torchscript_match_pytorch(tmp_path, name, task, dims, kwargs):
    run = _run_with(tmp_path / name, name, task, dims, kwargs)
    path, exporter = export.export_onnx(run)
    assert path.exists() and exporter == ("torchscript" if name == "mlp" else "dynamo")
    check = export.check_onnx(run, path)
    assert check["batch"] == 3 and check["ok"], check
    assert check["max_abs_diff"] <= export.ONNX_TOLERANCE
    ts = export.export_torchscript(run)
    assert export.check_torchscript(run, ts)["ok"]
    # the ONNX file really is the trained network: other weights give other outputs
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = export.example_input(torch.load(run / "checkpoint.pt", weights_only=True), batch=2, seed=5)
    other = build_model(name, 2, 2, dims=dims, **kwargs).eval()
    with torch.no_grad():
        assert not np.allclose(session.run(None, {"image": x.numpy()})[0], other(x).numpy(), atol=1e-3)


def test_export_run_writes_files_and_a_model_card(tmp_path):
    cls, _ = fixed_models(1)
    metrics = {"validation": {"auc": 0.9}, "test": {"accuracy": 0.8, "auc": 0.85}}
    run = write_run(tmp_path / "run", cls, "classify", metrics=metrics)
    out = export.export_run(run, n_boot=50)
    assert out["onnx_check"]["ok"] and out["torchscript_check"]["ok"]
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["input"]["shape"] == ["batch", 1, 32, 32, 32] and info["classes"] == ["healthy", "lesion"]
    assert json.loads((run / "export" / "preprocess.json").read_text())["pipeline"]["spacing"] == 4.0
    card = json.loads((run / "model_card.json").read_text())
    md = (run / "model_card.md").read_text()
    for text in ("not a medical device", "simulated", "Intended use", "Limitations", "Training data",
                 "Preprocessing", "0.850"):
        assert text in md, text
    assert "no interval" in card["test_metrics"]["from"]  # the training data are not here
    # with an evaluation from helpers.evaluate next to the run, its intervals are used
    (run / "evaluation").mkdir()
    (run / "evaluation" / "metrics.json").write_text(json.dumps({
        "test_subjects": 40, "scores": {"roc_auc": {"overall": {"value": 0.91, "low": 0.83, "high": 0.97}}}}))
    export.write_model_card(run)
    md = (run / "model_card.md").read_text()
    assert "| roc_auc | overall | 0.910 [0.830, 0.970] |" in md


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier really trained by helpers.train on a BIDS fixture (a few seconds)."""
    from datafixtures import make_bids

    from helpers import train

    root = tmp_path_factory.mktemp("trained")
    patch = pytest.MonkeyPatch()
    patch.setenv("BRAINMRI_DATA", str(root / "data"))
    patch.setenv("BRAINMRI_DEVICE", "cpu")
    bids = make_bids(root / "bids", n_subjects=16)
    run = root / "runs" / "cls"
    code = train.main(["--data", str(bids), "--profile", "smoke", "--epochs", "2", "--width", "4",
                       "--out", str(run), "--no-cache"])
    assert code == 0
    yield run
    patch.undo()


def test_a_trained_run_exports_gets_intervals_and_predicts_new_scans(trained, tmp_path):
    out = export.export_run(trained, n_boot=200)
    assert out["onnx_check"]["ok"], out["onnx_check"]
    card = json.loads((trained / "model_card.json").read_text())
    assert card["test_metrics"]["from"].startswith("computed on the test split")
    auc = card["test_metrics"]["scores"]["roc_auc"]["overall"]
    assert auc["low"] is not None and auc["low"] <= auc["value"] <= auc["high"]
    splits = card["training_data"]["splits"]
    assert sum(s["subjects"] for s in splits.values()) == 16
    assert splits["train"]["classes"].keys() <= {"healthy", "tumour"}
    # the run deploys: helpers.predict re-applies its saved preprocessing to a scan it never saw
    from helpers.predict import predict

    img = head_scan()
    t1, flair = save(img, tmp_path / "new" / "sub-99_T1w.nii.gz"), save(img, tmp_path / "new" / "sub-99_FLAIR.nii.gz")
    (r,) = predict(tmp_path / "new", trained, out=tmp_path / "pred", progress=False).results
    assert r.status == "ok", r.error
    assert set(r.probabilities) == {"healthy", "lesion"} and abs(sum(r.probabilities.values()) - 1) < 1e-5
    assert (tmp_path / "pred" / "sub-99" / "report.png").exists()
    assert {t1.name, flair.name} == {Path(p).name for p in r.inputs.values()}
