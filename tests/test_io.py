"""helpers.io: atomic writes and clear errors for bad NIfTI files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from helpers.io import DataError, atomic_write, load_volume, save_nifti, sha256_file, write_json


def _img(data=None, affine=None):
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32) if data is None else data
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine)


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
def test_save_and_load_round_trip(tmp_path, name):
    img = _img()
    path = save_nifti(img, tmp_path / name)
    back = load_volume(path)
    np.testing.assert_allclose(back.get_fdata(), img.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(back.affine, img.affine)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.json"
    write_json(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b'{"version": 2, "half')
        raise RuntimeError("interrupted")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"missing\.nii\.gz: file not found"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.nii\.gz: file is empty"):
        load_volume(tmp_path / "empty.nii.gz")


def test_truncated_gzip_is_detected(tmp_path):
    path = save_nifti(_img(), tmp_path / "scan.nii.gz")
    raw = path.read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: .*(truncated|corrupt|readable)"):
        load_volume(bad)


def test_not_a_nifti_file(tmp_path):
    path = tmp_path / "notes.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"this is not an MRI volume" * 20)
    with pytest.raises(DataError, match="notes.nii.gz"):
        load_volume(path)


def test_wrong_dimensions_nan_and_all_zero(tmp_path):
    flat = save_nifti(nib.Nifti1Image(np.ones((5, 5), np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(DataError, match="2D image .* expected 3D"):
        load_volume(flat)
    series = save_nifti(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "s.nii")
    with pytest.raises(DataError, match="4D series"):
        load_volume(series)
    assert load_volume(series, ndim=4).shape == (4, 4, 4, 3)
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(DataError, match="1 NaN"):
        load_volume(save_nifti(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii"))
    with pytest.raises(DataError, match="every voxel is zero"):
        load_volume(save_nifti(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "z.nii"))


def test_checksum_changes_with_content(tmp_path):
    a = save_nifti(_img(), tmp_path / "a.nii")
    first = sha256_file(a)
    assert first == sha256_file(a)
    save_nifti(_img(np.zeros((6, 7, 8), np.float32) + 1), a)
    assert sha256_file(a) != first


def test_finished_files_get_the_usual_permissions_not_mkstemp_private_ones(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "shared.json", {"a": 1})
        nifti = save_nifti(_img(), tmp_path / "shared.nii.gz")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert nifti.stat().st_mode & 0o777 == 0o644
