"""helpers.datasets: every adapter on a small fake dataset, the splits, and every bad input."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from datafixtures import (
    head,
    make_bids,
    make_brats,
    make_decathlon,
    make_imagefolder,
    png,
    write_nifti,
)

from helpers import datasets
from helpers.datasets import (
    assign_splits,
    check_subject_leak,
    detect_kind,
    find_duplicates,
    load_dataset,
)
from helpers.io import DataError
from helpers.preprocess import PreprocessConfig, load_case, read_case_arrays

# --------------------------------------------------------------------------- adapters


def test_bids_adapter_reads_modalities_labels_masks_and_metadata(tmp_path):
    root = make_bids(tmp_path / "bids", n_subjects=10)
    table = load_dataset(root, check="full")
    assert table.kind == "bids" and table.dims == 3
    assert table.modalities == ["T1w", "FLAIR"]
    assert table.classes == ["healthy", "tumour"]
    assert table.label_names == {0: "background", 1: "necrotic core", 2: "oedema"}
    df = table.df
    assert len(df) == 10 and set(df["split"]) == {"train", "val", "test"}
    assert {"site", "age", "brain_mask"} <= set(df.columns)
    assert all(p.endswith("_dseg.nii.gz") for p in df["mask"])
    assert df.loc[df["subject"] == "sub-003", "label"].item() == "tumour"
    arrays, affine, mask = read_case_arrays(table, 0)
    assert arrays.shape == (2, 12, 12, 12) and arrays.dtype == np.float32 and mask.shape == (12, 12, 12)


def test_bids_sessions_of_one_subject_stay_on_one_side(tmp_path):
    root = make_bids(tmp_path / "bids", n_subjects=12, sessions=3)
    for seed in range(5):
        table = load_dataset(root, seed=seed)
        assert len(table.df) == 36
        assert (table.df.groupby("subject")["split"].nunique() == 1).all()
        assert set(table.df["session"]) == {"ses-01", "ses-02", "ses-03"}


def test_split_is_deterministic_stratified_and_seed_dependent():
    df = pd.DataFrame({"subject": [f"s{i}" for i in range(40)], "label": ["a"] * 20 + ["b"] * 20})
    a = assign_splits(df, seed=1, val_fraction=0.2, test_fraction=0.2)
    assert a.equals(assign_splits(df, seed=1, val_fraction=0.2, test_fraction=0.2))
    assert not a.equals(assign_splits(df, seed=2, val_fraction=0.2, test_fraction=0.2))
    counts = pd.crosstab(df["label"], a)
    assert (counts["test"] == 4).all() and (counts["val"] == 4).all() and (counts["train"] == 12).all()


def test_csv_manifest_with_several_image_columns_and_relative_paths(tmp_path):
    for i in range(6):
        write_nifti(tmp_path / "vols" / f"s{i}_t1.nii.gz", head(i))
        write_nifti(tmp_path / "vols" / f"s{i}_t2.nii.gz", head(i) + 1)
    rows = [f"s{i},vols/s{i}_t1.nii.gz,vols/s{i}_t2.nii.gz,{'ad' if i % 2 else 'cn'},{'test' if i == 5 else 'train'},{60 + i}"
            for i in range(6)]
    (tmp_path / "m.csv").write_text("subject,image_T1w,image_T2w,label,split,age\n" + "\n".join(rows) + "\n")
    table = load_dataset(tmp_path / "m.csv", val_fraction=0.0)
    assert table.kind == "csv" and table.modalities == ["T1w", "T2w"] and table.dims == 3
    assert (tmp_path / "vols" / "s0_t1.nii.gz").resolve() == datasets.Path(table.df.loc[0, "T1w"])
    assert table.df.set_index("subject")["split"].to_dict()["s5"] == "test"
    assert "age" in table.df.columns
    out = load_case(table, 0, PreprocessConfig(crop=False))
    assert out.image.shape[0] == 2


def test_csv_manifest_with_a_modality_column(tmp_path):
    lines = ["subject,modality,image,label"]
    for i in range(4):
        for m in ("T1w", "FLAIR"):
            write_nifti(tmp_path / f"{i}_{m}.nii.gz", head(i))
            lines.append(f"p{i},{m},{i}_{m}.nii.gz,{'x' if i < 2 else 'y'}")
    (tmp_path / "long.csv").write_text("\n".join(lines) + "\n")
    table = load_dataset(tmp_path / "long.csv")
    assert table.modalities == ["T1w", "FLAIR"] and len(table.df) == 4
    assert table.df.set_index("subject")["label"].to_dict() == {"p0": "x", "p1": "x", "p2": "y", "p3": "y"}


def test_csv_manifest_of_2d_images_keeps_slices_of_a_subject_together(tmp_path):
    lines = ["subject,image,label"]
    for s in range(6):
        for k in range(3):
            png(tmp_path / "png" / f"s{s}_{k}.png", s * 10 + k)
            lines.append(f"subj{s},png/s{s}_{k}.png,{'a' if s % 2 else 'b'}")
    (tmp_path / "slices.csv").write_text("\n".join(lines) + "\n")
    table = load_dataset(tmp_path / "slices.csv", check="full")
    assert table.dims == 2 and len(table.df) == 18 and table.df["case"].is_unique
    assert (table.df.groupby("subject")["split"].nunique() == 1).all()
    out = load_case(table, 0, PreprocessConfig(shape=(16, 16, 16)))
    assert out.image.shape == (1, 16, 16) and 0 <= out.image.min() and out.image.max() <= 1


def test_decathlon_adapter_reads_4d_multimodal_volumes(tmp_path):
    root = make_decathlon(tmp_path / "Task01_BrainTumour")
    assert detect_kind(root) == "decathlon"
    table = load_dataset(root, check="full")
    assert table.modalities == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert table.volume_index == {"FLAIR": 0, "T1w": 1, "T1gd": 2, "T2w": 3}
    assert table.label_names[3] == "enhancing tumour"
    arrays, _, mask = read_case_arrays(table, 0)
    assert arrays.shape == (4, 12, 12, 12)
    np.testing.assert_allclose(arrays[2], arrays[0] * 3, rtol=1e-5)  # channel k = head * (k + 1)
    assert set(np.unique(mask)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("year", [2021, 2023])
def test_brats_adapter_2021_and_2023_names(tmp_path, year):
    root = make_brats(tmp_path / f"brats{year}", year=year)
    assert detect_kind(root) == "brats"
    table = load_dataset(root, check="full")
    assert table.modalities == ["T1w", "T1gd", "T2w", "FLAIR"]
    assert max(table.label_names) == (4 if year == 2021 else 3)
    if year == 2023:  # BraTS-GLI-00000-000 and -001: one subject, two time points, one side
        assert table.df["subject"].nunique() == 3 and set(table.df["session"]) == {"000", "001"}
        assert (table.df.groupby("subject")["split"].nunique() == 1).all()


def test_brats_2021_mask_with_label_3_is_outside_the_expected_set(tmp_path):
    root = make_brats(tmp_path / "b", year=2021)
    seg = sorted(root.glob("*/*_seg.nii.gz"))[0]
    write_nifti(seg, (head(0) > 50).astype(np.uint8) * 3)
    with pytest.raises(DataError, match=r"label value\(s\) \[3\] outside the expected set") as err:
        load_dataset(root, check="full")
    assert seg.name in str(err.value)


@pytest.mark.parametrize("with_splits", [True, False])
def test_imagefolder_adapter_with_and_without_training_testing(tmp_path, with_splits):
    root = make_imagefolder(tmp_path / "slices", with_splits=with_splits)
    assert detect_kind(root) == "imagefolder"
    table = load_dataset(root, check="full")
    assert table.dims == 2 and table.classes == ["glioma", "meningioma", "no_tumor"]
    if with_splits:  # Testing/ is kept as the test split, val comes out of Training/
        testing = table.df["image"].str.contains("/Testing/")
        assert (table.df.loc[testing, "split"] == "test").all()
        assert set(table.df.loc[~testing, "split"]) == {"train", "val"}
    else:
        assert set(table.df["split"]) == {"train", "val", "test"}


def test_kind_can_be_overridden(tmp_path):
    root = make_bids(tmp_path / "bids", n_subjects=4)
    (root / "manifest.csv").write_text("subject,image\n" + "\n".join(
        f"sub-{i:03d},sub-{i:03d}/anat/sub-{i:03d}_T1w.nii.gz" for i in range(4)) + "\n")
    assert detect_kind(root) == "bids"
    table = load_dataset(root / "manifest.csv", kind="csv")
    assert table.kind == "csv" and table.modalities == ["image"]


# --------------------------------------------------------------------------- leaks and duplicates


def test_planted_subject_leak_is_caught_and_named(tmp_path):
    for i in range(4):
        write_nifti(tmp_path / f"v{i}.nii.gz", head(i))
    (tmp_path / "leak.csv").write_text(
        "subject,session,image,split\nalice,1,v0.nii.gz,train\nalice,2,v1.nii.gz,test\n"
        "bob,1,v2.nii.gz,train\ncarol,1,v3.nii.gz,val\n")
    with pytest.raises(DataError, match="subject alice is in more than one split"):
        load_dataset(tmp_path / "leak.csv")
    df = pd.DataFrame({"subject": ["a", "b", "b"], "split": ["train", "val", "val"]})
    check_subject_leak(df)  # no leak: no error


def test_duplicate_check_finds_identical_and_near_identical_images_across_splits(tmp_path):
    root = make_imagefolder(tmp_path / "dups", with_splits=True)
    src = sorted((root / "Training" / "glioma").glob("*.png"))[0]
    shutil.copy(src, root / "Testing" / "glioma" / "copy.png")  # identical
    near = np.asarray(datasets.read_image_2d(sorted((root / "Training" / "meningioma").glob("*.png"))[0]))
    near = np.clip(near * 1.05 + 3, 0, 255).astype(np.uint8)  # a little brighter: near-identical
    from PIL import Image

    Image.fromarray(near).save(root / "Testing" / "meningioma" / "brighter.png")
    table = load_dataset(root)
    dups = find_duplicates(table)
    found = {(r.kind, datasets.Path(r.image_b).name if "Testing" in r.image_b else datasets.Path(r.image_a).name)
             for r in dups.itertuples()}
    assert ("identical", "copy.png") in found
    assert ("near-identical", "brighter.png") in found
    assert set(dups["split_a"]) | set(dups["split_b"]) >= {"test"}
    assert not ((dups["split_a"] == dups["split_b"]).any())


def test_duplicate_check_reports_nothing_on_distinct_images(tmp_path):
    table = load_dataset(make_imagefolder(tmp_path / "clean", with_splits=True))
    assert find_duplicates(table).empty


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def csv3d(tmp_path):
    """A valid 3D manifest of 4 subjects; tests break one file."""
    for i in range(4):
        write_nifti(tmp_path / f"v{i}.nii.gz", head(i))
        write_nifti(tmp_path / f"m{i}.nii.gz", (head(i) > 50).astype(np.uint8))
    (tmp_path / "m.csv").write_text("subject,image,mask,label\n" + "\n".join(
        f"s{i},v{i}.nii.gz,m{i}.nii.gz,{'a' if i % 2 else 'b'}" for i in range(4)) + "\n")
    return tmp_path


def _expect(path, problem, **kwargs):
    with pytest.raises(DataError) as err:
        load_dataset(path.parent / "m.csv" if path.name != "m.csv" else path, check="full", **kwargs)
    message = str(err.value)
    assert path.name in message, message
    assert problem in message, message
    return message


def test_missing_file(csv3d):
    (csv3d / "v1.nii.gz").unlink()
    _expect(csv3d / "v1.nii.gz", "file not found")


def test_truncated_nifti(csv3d):
    raw = (csv3d / "v2.nii.gz").read_bytes()
    (csv3d / "v2.nii.gz").write_bytes(raw[: len(raw) // 2])
    _expect(csv3d / "v2.nii.gz", "truncated or corrupt")


def test_unreadable_nifti(csv3d):
    (csv3d / "v2.nii.gz").write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    _expect(csv3d / "v2.nii.gz", "not a readable NIfTI")


def test_2d_where_3d_expected(csv3d):
    write_nifti(csv3d / "v0.nii.gz", head(0)[:, :, 5])
    _expect(csv3d / "v0.nii.gz", "is a 2D image of shape (12, 12), expected 3D")


def test_4d_where_3d_expected(csv3d):
    write_nifti(csv3d / "v0.nii.gz", np.stack([head(0)] * 3, -1))
    _expect(csv3d / "v0.nii.gz", "is a 4D series of shape (12, 12, 12, 3), expected 3D")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_values(csv3d, bad):
    vol = head(3)
    vol[4, 4, 4] = bad
    write_nifti(csv3d / "v3.nii.gz", vol)
    _expect(csv3d / "v3.nii.gz", "1 NaN or infinite voxel value(s)")


def test_all_zero_image(csv3d):
    write_nifti(csv3d / "v1.nii.gz", np.zeros(head(0).shape, np.float32))
    _expect(csv3d / "v1.nii.gz", "every voxel is zero")


def test_mask_shape_differs_from_image(csv3d):
    write_nifti(csv3d / "m2.nii.gz", np.ones((12, 12, 10), np.uint8))
    _expect(csv3d / "m2.nii.gz", "mask shape (12, 12, 10) differs from the image")


def test_mask_affine_differs_from_image(csv3d):
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    write_nifti(csv3d / "m2.nii.gz", (head(2) > 50).astype(np.uint8), affine=shifted)
    _expect(csv3d / "m2.nii.gz", "mask affine differs from the image")


def test_mask_labels_outside_expected_set(csv3d):
    write_nifti(csv3d / "m0.nii.gz", (head(0) > 50).astype(np.uint8) * 7)
    _expect(csv3d / "m0.nii.gz", "label value(s) [7] outside the expected set [0, 1]",
            label_names={0: "background", 1: "lesion"})


def test_class_label_outside_expected_classes(csv3d):
    message = _expect(csv3d / "m.csv", "label 'b' of subject s0 is not one of the expected classes",
                      classes=["a", "c"])
    assert "m.csv" in message


def test_duplicate_subject_rows(csv3d):
    with open(csv3d / "m.csv", "a") as handle:
        handle.write("s1,v0.nii.gz,m0.nii.gz,a\n")
    _expect(csv3d / "m.csv", "duplicate subject rows: s1")


def test_duplicate_participants_row(tmp_path):
    root = make_bids(tmp_path / "bids", n_subjects=3)
    with open(root / "participants.tsv", "a") as handle:
        handle.write("sub-001\thealthy\tsite1\t50\n")
    with pytest.raises(DataError, match=r"participants.tsv: duplicate subject row\(s\): sub-001"):
        load_dataset(root)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder is empty") as err:
        load_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)


def test_empty_folder_for_a_given_kind_names_the_folder(tmp_path):
    (tmp_path / "e").mkdir()
    for kind in ("bids", "imagefolder", "brats"):
        with pytest.raises(DataError) as err:
            load_dataset(tmp_path / "e", kind=kind)
        assert str(tmp_path / "e") in str(err.value)


def test_truncated_png(tmp_path):
    root = make_imagefolder(tmp_path / "img", with_splits=False)
    victim = sorted(root.glob("glioma/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(DataError, match="not a readable image, or truncated") as err:
        load_dataset(root, check="full")
    assert victim.name in str(err.value)


def test_skip_keeps_the_good_cases_and_lists_the_bad(csv3d):
    (csv3d / "v1.nii.gz").unlink()
    with pytest.warns(UserWarning, match="skipped 1 case"):
        table = load_dataset(csv3d / "m.csv", check="full", on_error="skip")
    assert sorted(table.df["subject"]) == ["s0", "s2", "s3"]
    assert len(table.problems) == 1 and "v1.nii.gz: file not found" in table.problems[0]


def test_all_problems_are_reported_at_once(csv3d):
    (csv3d / "v1.nii.gz").unlink()
    write_nifti(csv3d / "v3.nii.gz", np.zeros((12, 12, 12), np.float32))
    with pytest.raises(DataError) as err:
        load_dataset(csv3d / "m.csv", check="full")
    assert "v1.nii.gz" in str(err.value) and "v3.nii.gz: every voxel is zero" in str(err.value)


def test_command_line_describes_a_dataset(tmp_path, capsys):
    root = make_bids(tmp_path / "bids", n_subjects=6)
    assert datasets.main([str(root)]) == 0
    assert "bids dataset" in capsys.readouterr().out
    assert datasets.main([str(tmp_path / "nowhere")]) == 1


def test_affine_checked_with_nibabel_header_only(tmp_path):
    """check='headers' already catches a grid mismatch without reading voxels."""
    root = make_bids(tmp_path / "bids", n_subjects=3)
    f = root / "sub-001" / "anat" / "sub-001_FLAIR.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 1, 1, 1])), f)
    with pytest.raises(DataError, match="image affine differs"):
        load_dataset(root)


def test_participant_ids_without_the_sub_prefix_still_match(tmp_path):
    root = make_bids(tmp_path / "bids", n_subjects=4)
    tsv = root / "participants.tsv"
    tsv.write_text(tsv.read_text().replace("sub-", ""))
    table = load_dataset(root)
    assert set(table.df["label"]) == {"healthy", "tumour"} and table.df["site"].notna().all()
