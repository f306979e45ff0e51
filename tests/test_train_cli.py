"""python -m helpers.train on small datasets made here: a BIDS folder and a PNG image folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import train
from helpers.training_data import export_png_slices, flip_left_right, healthy_class, prepare


def make_bids(root, n=16, size=20, seed=0):
    """n subjects, T1w and FLAIR on a 2 mm grid; odd subjects have a bright lesion and a dseg mask."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    x, y, z = np.mgrid[:size, :size, :size] - (size - 1) / 2
    head = (x**2 + y**2 + z**2) < (size / 2 - 1) ** 2
    rows = ["participant_id\tdiagnosis\tage"]
    for i in range(n):
        sub = f"sub-{i:02d}"
        lesion = np.zeros((size,) * 3, np.int16)
        if i % 2:
            c = rng.integers(6, size - 8, 3)
            lesion[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 3] = 2
        anat = root / sub / "anat"
        anat.mkdir(parents=True)
        for mod, boost in (("T1w", 0.5), ("FLAIR", 2.0)):
            vol = (head * 1.0 + rng.normal(0, 0.1, head.shape) + boost * (lesion > 0)).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, affine), anat / f"{sub}_{mod}.nii.gz")
        labels = root / "derivatives" / "labels" / sub / "anat"
        labels.mkdir(parents=True)
        nib.save(nib.Nifti1Image(lesion, affine), labels / f"{sub}_dseg.nii.gz")
        rows.append(f"{sub}\t{'tumour' if i % 2 else 'healthy'}\t{50 + i}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "fixture", "BIDSVersion": "1.8.0"}))
    return root


def make_png_folder(root, n_per_class=12, size=40, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in ("no_tumor", "glioma"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.normal(80, 10, (size, size))
            if cls == "glioma":
                r, c = rng.integers(5, size - 10, 2)
                img[r:r + 6, c:c + 6] += 120
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / cls / f"img{i:02d}.png")
    return root


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMRI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BRAINMRI_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("BRAINMRI_DEVICE", "cpu")
    return tmp_path


def test_cli_classifies_volumes_and_writes_a_complete_run_folder(isolated, capsys):
    bids = make_bids(isolated / "bids")
    code = train.main(["--data", str(bids), "--profile", "smoke", "--epochs", "2", "--max-seconds", "60", "--width", "4"])
    assert code == 0
    run = isolated / "runs" / "classify_binary_cnn_3d"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"validation", "test"} <= set(metrics) and "auc" in metrics["test"]
    model, ckpt = train.load_run(run, device=torch.device("cpu"))
    assert ckpt["classes"] == ["healthy", "lesion"]
    assert ckpt["preprocess"]["input"] == "volume" and ckpt["preprocess"]["pipeline"]["orientation"] == "RAS"
    assert ckpt["model_config"]["name"] == "cnn" and ckpt["model_config"]["in_channels"] == 2
    assert "Run folder" in capsys.readouterr().out
    # the cache now holds the preprocessed cases: a second preparation reads them back identically
    again = prepare(bids, profile="smoke", verbose=False)
    first = prepare(bids, profile="smoke", cache=False, verbose=False)
    assert torch.equal(again.train.x, first.train.x)


def test_modalities_option_picks_and_records_the_input_channels(isolated, capsys):
    bids = make_bids(isolated / "bids")
    both = prepare(bids, profile="smoke", cache=False, verbose=False)
    flair = prepare(bids, profile="smoke", cache=False, verbose=False, modalities=["FLAIR"])
    assert flair.in_channels == 1 and flair.preprocess["modalities"] == ["FLAIR"]
    # the head crop is found on the chosen channels only, so values match closely, not exactly
    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    chosen, other = (both.train.x[:, both.modalities.index(m)] for m in ("FLAIR", "T1w"))
    assert corr(flair.train.x[:, 0], chosen) > 0.99 > corr(flair.train.x[:, 0], other)
    out = isolated / "flair_run"
    assert train.main(["--data", str(bids), "--profile", "smoke", "--epochs", "1", "--width", "4",
                       "--modalities", "FLAIR", "--out", str(out)]) == 0
    ckpt = train.load_checkpoint(out)
    assert ckpt["model_config"]["in_channels"] == 1 and ckpt["preprocess"]["modalities"] == ["FLAIR"]
    assert train.main(["--data", str(bids), "--profile", "smoke", "--modalities", "T2w"]) == 1
    assert "T2w" in capsys.readouterr().err


def test_cli_segments_with_the_default_unet(isolated):
    bids = make_bids(isolated / "bids")
    out = isolated / "seg"
    assert train.main(["--data", str(bids), "--task", "segment", "--profile", "smoke", "--epochs", "1",
                       "--width", "4", "--depth", "2", "--out", str(out)]) == 0
    ckpt = train.load_checkpoint(out)
    assert ckpt["model_config"]["name"] == "unet" and ckpt["classes"] == ["background", "lesion"]
    assert "dice" in json.loads((out / "metrics.json").read_text())["test"]


def test_cli_trains_on_a_folder_of_png_images(isolated):
    folder = make_png_folder(isolated / "pngs")
    out = isolated / "png_run"
    assert train.main(["--data", str(folder), "--profile", "smoke", "--epochs", "1", "--out", str(out)]) == 0
    ckpt = train.load_checkpoint(out)
    assert ckpt["preprocess"]["input"] == "image" and ckpt["model_config"]["dims"] == 2
    assert ckpt["classes"] == ["healthy", "lesion"]
    from helpers.runtime import get_profile

    size = get_profile("smoke").slice_size
    assert ckpt["preprocess"]["pipeline"]["shape"][-2:] == [size, size]


def test_cli_reports_problems_without_a_traceback(isolated, capsys):
    assert train.main(["--data", str(isolated / "nowhere"), "--profile", "smoke"]) == 1
    assert "Problem:" in capsys.readouterr().err
    folder = make_png_folder(isolated / "pngs")
    assert train.main(["--data", str(folder), "--task", "segment", "--profile", "smoke"]) == 1
    assert "nothing to segment" in capsys.readouterr().err


def test_slices_take_their_labels_from_the_lesion_mask(isolated):
    bids = make_bids(isolated / "bids")
    prep = prepare(bids, profile="smoke", input="slices", labels="diagnosis", n_slices=10, verbose=False)
    assert prep.dims == 2 and prep.classes == ["healthy", "tumour"]
    for split in ("train", "val", "test"):
        data = getattr(prep, split)
        subjects = prep.subjects[split]
        healthy_subjects = {s for s in subjects if int(s[-2:]) % 2 == 0}
        labels_of_healthy = {int(y) for y, s in zip(data.y, subjects, strict=True) if s in healthy_subjects}
        assert labels_of_healthy <= {0}
    assert int(prep.train.y.sum()) > 0  # some slices show a lesion


def test_helpers_for_labels_and_flips():
    assert healthy_class(["glioma", "no_tumor"]) == "no_tumor"
    with pytest.raises(ValueError, match="labels='diagnosis'"):
        healthy_class(["glioma", "meningioma"])
    x = torch.arange(2 * 1 * 4 * 3 * 2, dtype=torch.float32).reshape(2, 1, 4, 3, 2)
    y = (x[:, 0] > 20).long()
    torch.manual_seed(0)
    fx, fy = flip_left_right(x, y, p=1.0)
    assert torch.equal(fx, torch.flip(x, dims=[2])) and torch.equal(fy, torch.flip(y, dims=[1]))
    same_x, same_y = flip_left_right(x, y, p=0.0)
    assert torch.equal(same_x, x) and torch.equal(same_y, y)


def test_exported_png_slices_read_back_with_the_same_split(isolated):
    from helpers.datasets import load_dataset

    bids = make_bids(isolated / "bids")
    prep = prepare(bids, profile="smoke", input="slices", n_slices=6, verbose=False)
    folder = export_png_slices(prep, isolated / "png")
    table = load_dataset(folder)
    assert table.kind == "imagefolder" and table.dims == 2
    counts = table.df["split"].value_counts().to_dict()
    assert counts == {s: len(getattr(prep, s)) for s in ("train", "val", "test")}
    back = prepare(table, profile="smoke", labels="diagnosis", verbose=False)
    assert sorted(back.classes) == sorted(set(prep.classes[int(v)] for v in prep.train.y))



def test_classification_data_keeps_its_lesion_masks_for_the_lesion_map_classifier(isolated, capsys):
    root = make_bids(isolated / "bids", n=20)
    prep = prepare(root, task="classify", profile="smoke", cache=False, verbose=False)
    assert prep.info["lesion_masks"]
    for split in ("train", "val", "test"):
        data = getattr(prep, split)
        assert data.masks.dtype == torch.uint8 and data.masks.shape == (len(data), *data.x.shape[2:])
        has = data.masks.flatten(1).any(1).long()
        assert torch.equal(has, data.y)  # the lesion cases, exactly, have lesion voxels
    assert train.main(["--data", str(root), "--task", "classify", "--model", "unet_classifier",
                       "--profile", "smoke", "--epochs", "1", "--out", str(isolated / "run")]) == 0
    assert json.loads((isolated / "run" / "metrics.json").read_text())["test"]["auc"] >= 0
    # a lesion case without a mask file: masks cannot be trusted, so none are kept
    next((root / "derivatives" / "labels").glob("sub-01/anat/*_dseg.nii.gz")).unlink()
    prep = prepare(root, task="classify", profile="smoke", cache=False, verbose=False)
    assert prep.train.masks is None and not prep.info["lesion_masks"]
    capsys.readouterr()
    assert train.main(["--data", str(root), "--task", "classify", "--model", "unet_classifier",
                       "--profile", "smoke", "--epochs", "1", "--out", str(isolated / "run2")]) == 1
    assert "lesion masks" in capsys.readouterr().err
