"""helpers.predict: outputs on the input's grid, invariance to storage, refusals, batches with bad files.

The models here have fixed, hand-set weights (no training), so the tests are fast
and the expected answers are known: the segmenter marks voxels whose z-scored
intensity exceeds a threshold, the classifier says "lesion" when any voxel does.
Every scan is the same synthetic head (an ellipsoid with a bright spherical
"lesion" at a known place in millimetres) sampled on a different voxel grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers.io import DataError
from helpers.models import build_model
from helpers.predict import check_scan, find_cases, modality_of, predict
from helpers.preprocess import PreprocessConfig
from helpers.train import save_checkpoint

LESION_CENTRE_MM = (25.0, 10.0, 15.0)
LESION_RADIUS_MM = 14.0
Z_THRESHOLD = 4.0


# --------------------------------------------------------------------------- fixtures (shared with test_export)


def grid_affine(spacing=(4.0, 4.0, 4.0), orientation: str = "RAS", fov_mm=(176.0, 208.0, 176.0)):
    """A voxel grid covering the same box in mm, stored in any orientation (axis codes) and spacing."""
    shape = [int(round(f / s)) for f, s in zip(fov_mm, spacing, strict=True)]
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = -np.asarray(fov_mm) / 2 + np.asarray(spacing) / 2
    codes = nib.orientations.axcodes2ornt(tuple(orientation))
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), codes)
    # permute/flip the RAS grid into the wanted storage order, keeping every voxel's mm
    affine = ras @ nib.orientations.inv_ornt_aff(ornt, shape)
    new_shape = [shape[int(ax)] for ax in np.argsort(ornt[:, 0])]
    return tuple(new_shape), affine


def head_scan(spacing=(4.0, 4.0, 4.0), orientation: str = "RAS", lesion: bool = True, seed: int = 0,
              contrast: float = 1.0):
    """The synthetic head on a grid: ellipsoid ~100, lesion ~300 (x contrast), mild noise."""
    shape, affine = grid_affine(spacing, orientation)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    head = ((xyz / np.array([72.0, 88.0, 70.0])) ** 2).sum(-1) <= 1
    data = np.where(head, 100.0, 0.0)
    if lesion:
        ball = ((xyz - np.array(LESION_CENTRE_MM)) ** 2).sum(-1) <= LESION_RADIUS_MM**2
        data = np.where(ball, 100.0 + 200.0 * contrast, data)
    rng = np.random.default_rng(seed)
    data = data + rng.normal(0, 3.0, data.shape) * head
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    return img


def lesion_truth(img: nib.Nifti1Image) -> np.ndarray:
    """Where the lesion is on the image's own grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij"), axis=-1).astype(np.float64)
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    return ((xyz - np.array(LESION_CENTRE_MM)) ** 2).sum(-1) <= LESION_RADIUS_MM**2


def _centre_tap(conv: torch.nn.Module, channel_weights) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        c = conv.weight.shape[-1] // 2
        for i, w in enumerate(channel_weights):
            conv.weight[0, i, c, c, c] = w
        if conv.bias is not None:
            conv.bias.zero_()


def fixed_models(in_channels: int = 1):
    """A thresholding U-Net and a thresholding CNN: known answers, no training."""
    w = [1.0 / in_channels] * in_channels
    seg = build_model("unet", in_channels, 2, dims=3, depth=1, width=1, norm=False)
    _centre_tap(seg.down[0][0][0], w)
    _centre_tap(seg.down[0][1][0], [1.0])
    with torch.no_grad():
        seg.head.weight.zero_()
        seg.head.weight[1, 0] = 3.0
        seg.head.bias.copy_(torch.tensor([0.0, -3.0 * Z_THRESHOLD]))
    cls = build_model("cnn", in_channels, 2, dims=3, depth=1, width=1, norm=False, dropout=0.0)
    _centre_tap(cls.features[0][0][0], w)
    with torch.no_grad():
        cls.classifier.weight.copy_(torch.tensor([[0.0], [2.0]]))
        cls.classifier.bias.copy_(torch.tensor([0.0, -2.0 * Z_THRESHOLD]))
    return cls.eval(), seg.eval()


def pipeline(spacing: float = 4.0, size: int = 32) -> PreprocessConfig:
    """The same kind of pipeline helpers.training_data makes: RAS, spacing, head crop, z-score, resize."""
    return PreprocessConfig(orientation="RAS", spacing=spacing, crop=True, normalise="zscore",
                            shape=(size, size, size), shape_mode="resize")


def write_run(folder: Path, model: torch.nn.Module, task: str, modalities=("T1w",), spacing: float = 4.0,
              size: int = 32, metrics: dict | None = None) -> Path:
    """A run folder as helpers.train writes it (only the fields deployment reads, plus a few)."""
    classes = ["healthy", "lesion"] if task == "classify" else ["background", "lesion"]
    record = {"pipeline": pipeline(spacing, size).to_dict(), "input": "volume", "modalities": list(modalities),
              "labels": "binary" if task == "classify" else "lesion", "dims": 3}
    state = {"format": 1, "model": {k: v.clone() for k, v in model.state_dict().items()},
             "model_config": dict(model.config), "train_config": {"task": task, "mixed_precision": False,
                                                                  "epochs": 0, "seed": 0},
             "task": task, "classes": classes, "preprocess": record,
             "data": {"source": "synthetic heads (tests)", "kind": "synthetic",
                      "samples": {"train": 0, "val": 0, "test": 0}},
             "history": [], "finished": True, "metrics": metrics or {}}
    save_checkpoint(folder / "checkpoint.pt", state)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    cls, seg = fixed_models(1)
    cls2, seg2 = fixed_models(2)
    return {"classify": write_run(root / "cls", cls, "classify"),
            "segment": write_run(root / "seg", seg, "segment"),
            "segment2": write_run(root / "seg2", seg2, "segment", modalities=("T1w", "FLAIR"))}


def save(img: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("spacing, orientation", [
    ((4.0, 4.0, 4.0), "RAS"), ((4.0, 4.0, 4.0), "LPS"), ((3.0, 4.0, 5.0), "PIR"),
    ((2.5, 2.5, 2.5), "SLA"), ((5.0, 3.5, 3.0), "LAS")])
def test_outputs_have_the_inputs_shape_and_affine_and_find_the_lesion(runs, tmp_path, spacing, orientation):
    img = head_scan(spacing, orientation)
    scan = save(img, tmp_path / "in" / "scan_T1w.nii.gz")
    batch = predict(scan, [runs["classify"], runs["segment"]], out=tmp_path / "out", progress=False,
                    report=False)
    (r,) = batch.results
    assert r.status == "ok", r.error
    stored = nib.load(scan)
    for key in ("lesion_mask", "lesion_prob"):
        out = nib.load(r.files[key])
        assert out.shape == stored.shape
        assert np.array_equal(out.affine, stored.affine), (key, out.affine, stored.affine)
        assert int(out.header["sform_code"]) == int(stored.header["sform_code"])
    mask = np.asanyarray(nib.load(r.files["lesion_mask"]).dataobj) > 0
    prob = nib.load(r.files["lesion_prob"]).get_fdata()
    assert 0.0 <= prob.min() and prob.max() <= 1.0 + 1e-6  # stored as uint8 x 1/255 (float32 slope)
    truth = lesion_truth(stored)
    assert dice(mask, truth) > 0.7, dice(mask, truth)  # the lesion lands where it is, in any storage
    expected_ml = truth.sum() * abs(np.linalg.det(stored.affine[:3, :3])) / 1000
    assert r.lesion_volume_ml == pytest.approx(mask.sum() * abs(np.linalg.det(stored.affine[:3, :3])) / 1000)
    assert r.lesion_volume_ml == pytest.approx(expected_ml, rel=0.35)
    assert r.diagnosis == "lesion" and r.probabilities["lesion"] > 0.9


def test_healthy_scan_gets_no_lesion(runs, tmp_path):
    scan = save(head_scan(lesion=False), tmp_path / "healthy.nii.gz")
    (r,) = predict(scan, [runs["classify"], runs["segment"]], progress=False, report=False).results
    assert r.status == "ok", r.error
    assert r.diagnosis == "healthy" and r.probabilities["healthy"] > 0.5
    assert r.lesion_volume_ml < 1.0


def test_same_scan_as_nii_and_nii_gz_and_in_ras_or_lps_gives_the_same_prediction(runs, tmp_path):
    ras = head_scan((4.0, 4.0, 4.0), "RAS", contrast=0.45)  # a subtle lesion: probabilities not saturated
    lps = nib.Nifti1Image(ras.get_fdata(dtype=np.float32)[::-1, ::-1, :].copy(),
                          ras.affine @ nib.orientations.inv_ornt_aff(
                              np.array([[0, -1], [1, -1], [2, 1]]), ras.shape))
    paths = [save(ras, tmp_path / "a" / "ras.nii"), save(ras, tmp_path / "b" / "ras.nii.gz"),
             save(lps, tmp_path / "c" / "lps.nii.gz")]
    batch = predict(paths, [runs["classify"], runs["segment"]], out=tmp_path / "out", keep=True,
                    progress=False, report=False)
    a, b, c = batch.results
    assert all(r.status == "ok" for r in batch.results), batch.table
    p = [r.probabilities["lesion"] for r in (a, b, c)]
    assert 0.02 < p[0] < 0.98  # not saturated, so the comparison means something
    np.testing.assert_allclose(p[1:], p[0], atol=1e-5)
    np.testing.assert_allclose(b.prob, a.prob, atol=1e-5)
    # the LPS output, read back in RAS order, is the RAS output
    np.testing.assert_allclose(c.prob[::-1, ::-1, :], a.prob, atol=1e-4)
    assert np.array_equal(c.mask[::-1, ::-1, :], a.mask)
    assert a.lesion_volume_ml == pytest.approx(c.lesion_volume_ml)


# --------------------------------------------------------------------------- batches and refusals


def test_folder_with_a_corrupt_file_still_predicts_the_others(runs, tmp_path):
    folder = tmp_path / "scans"
    save(head_scan(seed=1), folder / "sub-01_T1w.nii.gz")
    save(head_scan((3.0, 3.0, 3.0), "LPS", lesion=False, seed=2), folder / "sub-02_T1w.nii.gz")
    good = (folder / "sub-01_T1w.nii.gz").read_bytes()
    (folder / "sub-03_T1w.nii.gz").write_bytes(good[: len(good) // 3])  # truncated download
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "out"
    batch = predict(folder, runs["segment"], out=out, progress=False)
    status = dict(zip(batch.table["case"], batch.table["status"], strict=True))
    assert status == {"sub-01": "ok", "sub-02": "ok", "sub-03": "error"}
    bad = batch.errors[0]
    assert "sub-03_T1w.nii.gz" in bad.error and ("corrupt" in bad.error or "NIfTI" in bad.error)
    assert [p.name for p in batch.ignored] == ["notes.txt"]
    table = (out / "summary.csv").read_text()
    assert "sub-03" in table and "error" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["errors"] == 1 and "not a medical device" in summary["disclaimer"]
    for case in ("sub-01", "sub-02"):
        assert (out / case / "report.png").stat().st_size > 10_000
        js = json.loads((out / case / "prediction.json").read_text())
        assert js["status"] == "ok" and js["lesion_volume_ml"] is not None and "not a medical device" in js["disclaimer"]
    assert json.loads((out / "sub-03" / "prediction.json").read_text())["status"] == "error"


def test_multimodal_model_reads_subject_folders_and_explicit_modalities(runs, tmp_path):
    subject = tmp_path / "bids" / "sub-07" / "anat"
    t1 = save(head_scan(), subject / "sub-07_T1w.nii.gz")
    flair = save(head_scan((3.0, 3.0, 3.0), "LPS", seed=5), subject / "sub-07_FLAIR.nii.gz")  # another grid
    (r,) = predict(tmp_path / "bids", runs["segment2"], progress=False, report=False, keep=True).results
    assert r.status == "ok", r.error
    assert r.case == "sub-07" and list(r.inputs) == ["T1w", "FLAIR"]
    assert r.mask.shape == nib.load(t1).shape  # outputs on the first modality's grid
    (r2,) = predict([], runs["segment2"], modalities={"T1w": t1, "FLAIR": flair}, progress=False,
                    report=False).results
    assert r2.status == "ok" and r2.lesion_volume_ml == pytest.approx(r.lesion_volume_ml)


def test_one_file_for_a_multimodal_model_is_refused_with_how_to(runs, tmp_path):
    scan = save(head_scan(), tmp_path / "scan.nii.gz")
    (r,) = predict(scan, runs["segment2"], progress=False, report=False).results
    assert r.status == "error"
    assert "T1w, FLAIR" in r.error and "--modality" in r.error and "scan.nii.gz" in r.error


def test_modality_the_model_was_not_trained_on_is_refused(runs, tmp_path):
    scan = save(head_scan(), tmp_path / "sub-01_T2w.nii.gz")
    (r,) = predict(scan, runs["segment"], progress=False, report=False).results
    assert r.status == "error" and "T2w" in r.error and "T1w" in r.error and "sub-01_T2w" in r.error
    (r,) = predict([], runs["segment2"], modalities={"T1w": scan, "T2w": scan}, progress=False).results
    assert r.status == "error" and "T2w" in r.error


def test_wrong_dimensionality_and_non_mri_files_are_refused(runs, tmp_path):
    img = head_scan()
    four_d = nib.Nifti1Image(np.stack([img.get_fdata()] * 5, -1).astype(np.float32), img.affine)
    slab = nib.Nifti1Image(img.get_fdata()[:, :, 20:22].astype(np.float32), img.affine)
    mask = nib.Nifti1Image(lesion_truth(img).astype(np.uint8), img.affine)
    tiny = nib.Nifti1Image(img.get_fdata().astype(np.float32), np.diag([0.1, 0.1, 0.1, 1]))
    files = {"series": save(four_d, tmp_path / "series.nii.gz"), "slab": save(slab, tmp_path / "slab.nii.gz"),
             "mask": save(mask, tmp_path / "mask.nii.gz"), "tiny": save(tiny, tmp_path / "tiny.nii.gz")}
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    files["png"] = png
    batch = predict(list(files.values()), runs["segment"], progress=False, report=False)
    errors = dict(zip(files, [r.error for r in batch.results], strict=True))
    assert all(r.status == "error" for r in batch.results)
    assert "4D series of 5 volumes" in errors["series"]
    assert "2 voxels along one axis" in errors["slab"] or "slab" in errors["slab"]
    assert "label map" in errors["mask"]
    assert "field of view" in errors["tiny"]
    assert "photo.png" in errors["png"] and "NIfTI" in errors["png"]
    for name, err in errors.items():
        assert str(files[name].name) in err


def test_check_scan_accepts_a_head_and_refuses_ct():
    img = head_scan()
    check_scan(img.get_fdata(), img.affine, "head.nii.gz")
    ct = np.where(img.get_fdata() > 0, 40.0, -1000.0)
    with pytest.raises(DataError, match="Hounsfield"):
        check_scan(ct + np.random.default_rng(0).normal(0, 1, ct.shape), img.affine, "ct.nii.gz")


def test_modality_names_and_grouping(tmp_path):
    assert modality_of("x/sub-01_ses-2_FLAIR.nii.gz") == "FLAIR"
    assert modality_of("BraTS_001_t1ce.nii.gz") == "T1gd"
    assert modality_of("brain.nii") is None
    folder = tmp_path / "f"
    for name in ("a_T1w", "a_FLAIR", "b_T1w", "c"):
        save(head_scan(), folder / f"{name}.nii.gz")
    cases, _ = find_cases([folder], ["T1w", "FLAIR"])
    by_name = {c.name: c for c in cases}
    assert set(by_name) == {"a", "b", "c"}
    assert by_name["a"].error is None and list(by_name["a"].files) == ["T1w", "FLAIR"]
    assert "missing FLAIR" in by_name["b"].error


def test_command_line(runs, tmp_path, capsys):
    from helpers.predict import main

    scan = save(head_scan(), tmp_path / "in" / "sub-01_T1w.nii.gz")
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not gzip at all")
    rc = main(["--model", str(runs["classify"]), "--model", str(runs["segment"]), str(scan.parent),
               "--out", str(tmp_path / "out"), "--quiet", "--no-report"])
    text = capsys.readouterr().out
    assert rc == 1  # one scan failed
    assert "sub-01: lesion" in text and "broken: ERROR" in text and "not a medical device" in text
    assert (tmp_path / "out" / "sub-01" / "lesion_mask.nii.gz").exists()
    rc = main(["--model", str(tmp_path / "nowhere"), str(scan)])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("orientation, spacing", [("RAS", (2.0, 2.0, 2.0)), ("PIR", (1.5, 2.5, 3.0)),
                                                  ("LPS", (4.0, 4.0, 4.0))])
def test_fast_inverse_mapping_equals_grid_sample(orientation, spacing):
    from helpers.predict import to_original
    from helpers.preprocess import to_original_grid

    img = head_scan(spacing, orientation)
    # an oblique scan too: rotate the affine by 10 degrees about z
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for affine in (img.affine, rot @ img.affine):
        geom = pipeline(4.0, 24).apply(img.get_fdata(dtype=np.float32), affine).geometry
        prob = np.random.default_rng(0).random(geom.shape).astype(np.float32)
        fast, slow = to_original(prob, geom), to_original_grid(prob, geom, order=1)
        assert fast.shape == slow.shape == img.shape
        np.testing.assert_allclose(fast, slow, atol=2e-5)
        assert (slow > 0).mean() > 0.3  # the comparison covers most of the scan


def test_slice_models_predict_per_slice_and_map_back(tmp_path):
    """2D models on axial slices: the case takes its most suspicious slice; the mask is stacked and mapped back."""
    from helpers.train import load_checkpoint, save_checkpoint

    cls = build_model("cnn", 1, 2, dims=2, depth=1, width=1, norm=False, dropout=0.0)
    seg = build_model("unet", 1, 2, dims=2, depth=1, width=1, norm=False)
    with torch.no_grad():
        for conv in (cls.features[0][0][0], seg.down[0][0][0], seg.down[0][1][0]):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
        cls.classifier.weight.copy_(torch.tensor([[0.0], [2.0]]))
        cls.classifier.bias.copy_(torch.tensor([0.0, -2.0 * Z_THRESHOLD]))
        seg.head.weight.zero_()
        seg.head.weight[1, 0] = 3.0
        seg.head.bias.copy_(torch.tensor([0.0, -3.0 * Z_THRESHOLD]))
    runs = []
    for name, model, task in (("cls2d", cls.eval(), "classify"), ("seg2d", seg.eval(), "segment")):
        run = write_run(tmp_path / name, model, task)
        ckpt = load_checkpoint(run)
        ckpt["preprocess"].update(input="slices", dims=2)
        ckpt["preprocess"]["pipeline"]["shape"] = [40, 40, 24]
        save_checkpoint(run / "checkpoint.pt", ckpt)
        runs.append(run)
    img = head_scan((3.0, 4.0, 5.0), "LPS")
    scan = save(img, tmp_path / "scan_T1w.nii.gz")
    healthy = save(head_scan(lesion=False), tmp_path / "healthy_T1w.nii.gz")
    a, b = predict([scan, healthy], runs, progress=False, report=False, keep=True).results
    assert a.status == "ok" and b.status == "ok", (a.error, b.error)
    assert a.diagnosis == "lesion" and b.diagnosis == "healthy"
    assert a.mask.shape == img.shape and dice(a.mask, lesion_truth(img)) > 0.6
    assert b.lesion_volume_ml < 1.0
