"""helpers.preprocess, helpers.intensity, helpers.skullstrip: geometry keeps world coordinates,
masks stay binary and aligned, intensity steps do what they say, the pipeline round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from helpers import preprocess as pp
from helpers.intensity import (
    clahe,
    correct_bias_field,
    denoise,
    equalise_histogram,
    histogram_standardise,
    learn_histogram_landmarks,
    percentile_normalise,
    window,
    zscore,
)
from helpers.skullstrip import dice, skull_strip

# An oblique-free but awkward header: axes permuted and flipped (I, L, A), anisotropic voxels.
AFFINE = np.array([[0, -1.2, 0, 50], [0, 0, 1.5, -30], [-0.9, 0, 0, 20], [0, 0, 0, 1.0]])
SHAPE = (40, 50, 36)
LANDMARK = np.array([12, 30, 20])


def blob(centre=LANDMARK, sigma_mm=4.0, shape=SHAPE, affine=AFFINE):
    """A smooth Gaussian blob centred on a voxel, its width in mm."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre_mm = affine[:3, :3] @ centre + affine[:3, 3]
    d2 = ((world - centre_mm) ** 2).sum(1)
    return np.exp(-d2 / (2 * sigma_mm**2)).reshape(shape).astype(np.float32), centre_mm


def centroid_mm(data, affine):
    idx = np.argwhere(data > 0)
    w = data[tuple(idx.T)].astype(np.float64)
    c = (idx * w[:, None]).sum(0) / w.sum()
    return affine[:3, :3] @ c + affine[:3, 3]


def head_phantom(shape=(48, 56, 48), spacing=2.0, seed=0):
    """A brain (ellipsoid: WM core, GM rim), dark skull, bright scalp, air; plus its brain mask."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing for n in shape], indexing="ij"))
    radii = np.array([34.0, 42.0, 34.0])
    r = np.sqrt(((g / radii[:, None, None, None]) ** 2).sum(0))  # 1 at the brain surface
    img = np.zeros(shape, np.float32)
    img[r < 1.0] = 70  # grey matter
    img[r < 0.75] = 100  # white matter
    img[(r >= 1.0) & (r < 1.08)] = 15  # CSF
    img[(r >= 1.08) & (r < 1.2)] = 8  # skull
    img[(r >= 1.2) & (r < 1.3)] = 80  # scalp
    img += rng.normal(0, 3, shape).astype(np.float32) * (r < 1.3)
    img = np.clip(img, 0, None)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return img, affine, r < 1.08


# --------------------------------------------------------------------------- geometry


def test_reorient_keeps_world_coordinates_of_a_landmark():
    data = np.zeros(SHAPE, np.float32)
    data[tuple(LANDMARK)] = 1
    out, aff = pp.reorient(data, AFFINE)
    assert pp.orientation_of(AFFINE) == "ILA" and pp.orientation_of(aff) == "RAS"
    v = np.argwhere(out == 1)[0]
    np.testing.assert_allclose(aff @ np.r_[v, 1], AFFINE @ np.r_[LANDMARK, 1])
    assert np.all(np.diag(aff[:3, :3]) > 0)


@pytest.mark.parametrize("order", [1, 3])
def test_resample_keeps_world_coordinates_of_a_landmark(order):
    data, centre_mm = blob()
    ras, aff = pp.reorient(data, AFFINE)
    out, new = pp.resample(ras, aff, 2.0, order=order)
    np.testing.assert_allclose(pp.spacing_of(new), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(centroid_mm(np.clip(out, 0, None), new), centre_mm, atol=0.1)
    # the field of view is kept: same first-voxel corner in mm
    corner_old = aff @ np.r_[-0.5, -0.5, -0.5, 1]
    corner_new = new @ np.r_[-0.5, -0.5, -0.5, 1]
    np.testing.assert_allclose(corner_new, corner_old, atol=1e-9)


def test_linear_resample_matches_scipy_reference():
    data, _ = blob(sigma_mm=6)
    out, new = pp.resample(data, np.diag([1.0, 1.0, 1.0, 1.0]), (2.0, 1.5, 3.0), order=1)
    f = np.array([2.0, 1.5, 3.0])
    ref = ndimage.affine_transform(data, f, offset=0.5 * (f - 1), output_shape=out.shape, order=1, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mask_resampling_stays_binary_and_aligned():
    data, _ = blob(sigma_mm=6)
    mask = (data > 0.5).astype(np.uint8)
    ras, aff = pp.reorient(data, AFFINE)
    mras, maff = pp.reorient(mask, AFFINE)
    np.testing.assert_array_equal(aff, maff)
    img2, a2 = pp.resample(ras, aff, 2.0)
    m2, am2 = pp.resample(mras, aff, 2.0, is_label=True)
    assert m2.dtype == np.uint8 and set(np.unique(m2)) == {0, 1}
    np.testing.assert_array_equal(a2, am2)
    assert dice(m2 > 0, img2 > 0.5) > 0.9  # the resampled mask still sits on the resampled blob


def test_crop_and_crop_or_pad_move_the_affine_with_the_data():
    data, centre_mm = blob()
    data[data < 0.1] = 0
    box = pp.foreground_box(data > 0, margin=2)
    c, ca = pp.crop(data, AFFINE, box)
    np.testing.assert_allclose(centroid_mm(c, ca), centroid_mm(data, AFFINE), atol=1e-6)
    for shape in [(64, 64, 64), (20, 22, 18)]:
        p, pa = pp.crop_or_pad(c, ca, shape)
        assert p.shape == shape
        np.testing.assert_allclose(centroid_mm(p, pa), centroid_mm(c, ca), atol=0.3)


def test_resample_to_grid_and_back_through_the_pipeline():
    data, centre_mm = blob(sigma_mm=8)
    mask = (data > 0.4).astype(np.int16) * 2
    cfg = pp.PreprocessConfig(spacing=2.0, shape=(32, 32, 32))
    out = cfg.apply(data + 0.05, AFFINE, mask)
    assert out.image.shape == (1, 32, 32, 32) and set(np.unique(out.mask)) <= {0, 2}
    back = pp.to_original_grid(out.mask, out.geometry)
    assert back.shape == SHAPE and set(np.unique(back)) <= {0, 2}
    assert dice(back > 0, mask > 0) > 0.85
    probs = pp.to_original_grid(out.image[:1], out.geometry, order=1)
    assert probs.shape == (1, *SHAPE)


def test_resize_and_slices():
    data, _ = blob(sigma_mm=6)
    r, ra = pp.resize(data, AFFINE, (20, 20, 20))
    assert r.shape == (20, 20, 20)
    np.testing.assert_allclose(centroid_mm(np.clip(r, 0, None), ra), centroid_mm(data, AFFINE), atol=0.6)
    slices, idx = pp.extract_slices(data, axis=2, mask=data > 0.5)
    assert slices.shape[1:] == (40, 50) and len(idx) == slices.shape[0] < 36
    assert np.all((data > 0.5)[:, :, idx].any(axis=(0, 1)))


# --------------------------------------------------------------------------- intensity


def test_zscore_and_percentile_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(300, 50, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    z = zscore(x, mask)
    assert abs(z[mask].mean()) < 1e-5 and abs(z[mask].std() - 1) < 1e-4
    p = percentile_normalise(x, 1, 99)
    assert p.min() == 0 and p.max() == 1
    assert abs(np.mean(p <= 0) - 0.01) < 0.003 and abs(np.mean(p >= 1) - 0.01) < 0.003


def test_window_and_equalisation():
    x = np.linspace(0, 100, 1000, dtype=np.float32).reshape(10, 10, 10) ** 2 / 100
    w = window(x, level=50, width=20)
    assert w.min() == 0 and w.max() == 1 and np.all(w[x < 40] == 0)
    e = equalise_histogram(x)
    hist, _ = np.histogram(e, bins=10, range=(0, 1))
    assert hist.min() > 0.7 * hist.max()  # roughly flat after equalisation


def test_clahe_raises_local_contrast_in_a_dark_region():
    img = np.full((64, 64), 100.0)
    img[:, :32] = 10 + 2 * (np.indices((64, 32))[0] % 2)  # faint stripes in a dark half
    out = clahe(img, tiles=4, clip_limit=0.1)
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    before = np.ptp(img[:, 8:24]) / np.ptp(img)
    after = np.ptp(out[:, 8:24]) / np.ptp(out)
    assert after > 3 * before


def test_denoise_methods_reduce_noise():
    rng = np.random.default_rng(1)
    clean = np.zeros((24, 24, 24), np.float32)
    clean[6:18, 6:18, 6:18] = 100
    noisy = clean + rng.normal(0, 10, clean.shape).astype(np.float32)
    for method in ("gaussian", "median", "anisotropic"):
        out = denoise(noisy, method, sigma_mm=1.0)
        assert np.abs(out - clean).mean() < 0.7 * np.abs(noisy - clean).mean(), method
    with pytest.raises(ValueError, match="Unknown denoising method"):
        denoise(noisy, "nlm")


def test_bias_field_correction_removes_a_smooth_field():
    img, aff, brain = head_phantom()
    x = np.linspace(-1, 1, img.shape[0])[:, None, None]
    field = np.broadcast_to(np.exp(0.3 * x + 0.15 * x**2), img.shape).astype(np.float32)
    biased = img * field
    head = img > 5
    corrected, est = correct_bias_field(biased, head & (biased > 0))
    wm = img > 90

    def cov(v):
        return float(v[wm].std() / v[wm].mean())

    assert cov(corrected) < 0.6 * cov(biased)
    assert np.corrcoef(np.log(est[head]), np.log(field[head] / field[head].mean()))[0, 1] > 0.9


def test_histogram_standardisation_aligns_sites():
    rng = np.random.default_rng(2)

    def scan(scale, gamma):
        tissue = rng.choice([20.0, 60.0, 100.0], size=20_000, p=[0.2, 0.4, 0.4])
        return (scale * (tissue + rng.normal(0, 4, tissue.size)).clip(1) ** gamma).astype(np.float32)

    site_a = [scan(1.0, 1.0) for _ in range(3)]
    site_b = [scan(7.0, 1.3) for _ in range(3)]
    landmarks = learn_histogram_landmarks(site_a + site_b)
    med = lambda xs: np.median([np.median(x) for x in xs])  # noqa: E731
    before = abs(med(site_a) / np.ptp(site_a[0]) - med(site_b) / np.ptp(site_b[0]))
    std_a = [histogram_standardise(x, landmarks) for x in site_a]
    std_b = [histogram_standardise(x, landmarks) for x in site_b]
    after = abs(med(std_a) - med(std_b)) / 100
    assert after < 0.02 and after < before / 5
    assert np.all(np.diff(landmarks) > 0) and landmarks[0] == 0 and landmarks[-1] == 100


# --------------------------------------------------------------------------- brain extraction


def test_skull_strip_finds_the_brain_of_a_head_phantom():
    img, aff, brain = head_phantom()
    found = skull_strip(img, aff)
    assert dice(found, brain) > 0.9
    assert not found[img.shape[0] // 2, img.shape[1] - 2, img.shape[2] // 2]  # scalp excluded


# --------------------------------------------------------------------------- the config


def test_config_round_trips_through_json_and_hash_follows_settings(tmp_path):
    cfg = pp.PreprocessConfig(spacing=(1.0, 1.0, 2.0), shape=(64, 64, 32), skull_strip=True,
                              histogram_landmarks=[[0.0, 50.0, 100.0]])
    path = cfg.save(tmp_path / "preprocess.json")
    again = pp.PreprocessConfig.load(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert pp.PreprocessConfig(spacing=2.0).hash() != pp.PreprocessConfig(spacing=2.5).hash()
    with pytest.raises(ValueError, match="Unknown preprocessing setting"):
        pp.PreprocessConfig.from_dict({**cfg.to_dict(), "new_knob": 1})
    with pytest.raises(ValueError, match="normalise must be"):
        pp.PreprocessConfig(normalise="minmax")


def test_pipeline_with_every_step_on_a_head(tmp_path):
    img, aff, brain = head_phantom()
    lps = aff.copy()
    lps[:2] *= -1  # stored LPS, as DICOM converters do
    cfg = pp.PreprocessConfig(spacing=3.0, denoise="gaussian", bias_correction=True, skull_strip=True,
                              shape=(32, 32, 32))
    out = cfg.apply(np.stack([img, img * 2]), lps, brain.astype(np.uint8))
    assert out.image.shape == (2, 32, 32, 32)
    assert pp.orientation_of(out.geometry.affine) == "RAS"
    inside = out.brain
    assert abs(out.image[0][inside].mean()) < 1e-4 and abs(out.image[0][inside].std() - 1) < 1e-3
    assert dice(out.brain, out.mask > 0) > 0.85
    assert [s.split()[0] for s in out.geometry.steps] == [
        "reorient", "denoise", "bias-field", "resample", "brain", "crop", "crop_or_pad"]


def test_fit_histograms_then_apply():
    heads = [head_phantom(seed=s)[0] * k for s, k in ((0, 1.0), (1, 3.0))]
    cfg = pp.PreprocessConfig(normalise="histogram").fit_histograms(heads, [np.eye(4) * 2 + np.diag([0, 0, 0, -1])] * 2)
    assert len(cfg.histogram_landmarks) == 1 and len(cfg.histogram_landmarks[0]) == 11
    a = cfg.apply(heads[0], np.diag([2.0, 2, 2, 1])).image
    b = cfg.apply(heads[1], np.diag([2.0, 2, 2, 1])).image
    assert abs(np.median(a[a > 1]) - np.median(b[b > 1])) < 2.0
    with pytest.raises(ValueError, match="needs histogram_landmarks"):
        pp.PreprocessConfig(normalise="histogram").apply(heads[0], np.eye(4))


def test_command_line_preprocesses_a_file(tmp_path, capsys):
    import nibabel as nib

    img, aff, _ = head_phantom()
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "in.nii.gz")
    assert pp.main([str(tmp_path / "in.nii.gz"), str(tmp_path / "out.nii.gz"), "--spacing", "4", "--shape", "24"]) == 0
    assert nib.load(tmp_path / "out.nii.gz").shape == (24, 24, 24)
    assert pp.main([str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.nii.gz")]) == 1


# --------------------------------------------------------------------------- figures


def test_before_after_shows_the_same_point_in_mm_on_different_grids():
    import matplotlib

    matplotlib.use("Agg")
    from helpers import prepfigures

    data, centre_mm = blob(sigma_mm=5)
    res, res_aff = pp.resample(*pp.reorient(data, AFFINE), 3.0)
    fig = prepfigures.before_after([("stored", data, AFFINE), ("resampled", res, res_aff)], world=centre_mm,
                                   hist=True, overlays=[data > 0.5, res > 0.5])
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2
    # both panels cut through the blob's centre: their brightest pixel is the blob's peak
    assert all(float(np.max(im)) > 0.8 for im in images)
    fig2 = prepfigures.montage([np.ones((4, 4)), np.zeros((4, 4))], [None, np.eye(4)], titles=["a", "b"], ncols=2)
    assert len([ax for ax in fig2.axes if ax.images]) == 2


def test_skullstrip_command_line(tmp_path, capsys):
    import nibabel as nib

    from helpers import skullstrip

    img, aff, brain = head_phantom()
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), aff), tmp_path / "truth.nii.gz")
    assert skullstrip.main([str(tmp_path / "t1.nii.gz"), str(tmp_path / "b.nii.gz"), "--truth",
                            str(tmp_path / "truth.nii.gz")]) == 0
    dice_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(dice_line.rsplit(" ", 1)[1]) > 0.9
    assert skullstrip.main([str(tmp_path / "none.nii.gz"), str(tmp_path / "b.nii.gz")]) == 1
