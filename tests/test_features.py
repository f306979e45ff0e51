"""helpers.features: handcrafted features respond to what they are meant to measure."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import features


def brain_volume(seed: int = 0, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[:size, :size, :size] - (size - 1) / 2
    brain = x**2 + y**2 + z**2 < (size / 2 - 1) ** 2
    vol = rng.normal(size=(size,) * 3).astype(np.float32) * 0.3
    return vol, brain


def test_tissue_fractions_find_three_intensity_classes():
    vol, brain = brain_volume()
    third = vol.shape[2] // 3
    vol[:, :, :third] -= 2.0
    vol[:, :, 2 * third:] += 2.0
    frac = features.tissue_fractions(vol, brain)
    counts = np.array([brain[:, :, :third].sum(), brain[:, :, third:2 * third].sum(), brain[:, :, 2 * third:].sum()])
    assert frac == pytest.approx(counts / brain.sum(), abs=0.02)
    assert frac.sum() == pytest.approx(1.0)


def test_a_one_sided_lesion_raises_asymmetry_and_the_top_histogram_bin():
    vol, brain = brain_volume()
    healthy = features.extract_features(vol, brain, ["T1w"])
    lesion = vol.copy()
    lesion[4:8, 8:12, 8:12] += 3.5  # bright, on one side of the left-right axis (axis 0)
    sick = features.extract_features(lesion, brain, ["T1w"])
    assert sick["T1w_asym_p99"] > healthy["T1w_asym_p99"] + 1.0
    top = [k for k in healthy if "_hist_" in k][-3:]
    assert sum(sick[k] for k in top) > sum(healthy[k] for k in top)
    mirrored = features.extract_features(np.flip(lesion, 0), np.flip(brain, 0), ["T1w"])
    assert mirrored["T1w_asym_mean"] == pytest.approx(sick["T1w_asym_mean"], rel=1e-5)


def test_texture_grows_with_noise_and_histogram_sums_to_one():
    vol, brain = brain_volume()
    smooth = features.texture_features(vol * 0.1, brain)
    rough = features.texture_features(vol * 3.0, brain)
    assert np.all(rough > smooth)
    assert features.histogram_features(vol * 10, brain).sum() == pytest.approx(1.0)


def test_features_have_stable_names_grouped_by_kind():
    vol, brain = brain_volume()
    feats = features.extract_features(np.stack([vol, vol]), brain, ["T1w", "FLAIR"])
    groups = features.feature_groups(list(feats))
    assert len(groups["histogram"]) == 2 * 12 and len(groups["tissue"]) == 6
    assert len(groups["texture"]) == 8 and len(groups["asymmetry"]) == 4
    assert all(np.isfinite(v) for v in feats.values())
    with pytest.raises(ValueError, match="empty"):
        features.extract_features(vol, np.zeros_like(brain))


def test_classical_models_are_compared_with_cross_validation_inside_the_training_split():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = rng.normal(size=(60, 5))
    x[:, 0] += 2.5 * y  # one informative feature
    table, fitted = features.compare_classifiers(x[:40], y[:40], x[40:], y[40:], cv_folds=4)
    assert set(table.index) == {"logistic regression", "SVM (RBF kernel)", "random forest"}
    assert (table["folds"] == 4).all()
    assert (table["validation ROC-AUC"] > 0.8).all()
    # a class with only 2 training samples forces 2 folds instead of failing
    y3 = y.copy()
    y3[:40][np.flatnonzero(y3[:40] == 1)[2:]] = 0
    table3, _ = features.compare_classifiers(x[:40], y3[:40], x[40:], y[40:], cv_folds=5)
    assert (table3["folds"] == 2).all()


def test_inner_mask_removes_the_rim_of_the_head():
    vol, brain = brain_volume(size=20)
    inner = features.inner_mask(brain, 0.1)
    assert inner.sum() < brain.sum() and not (inner & ~brain).any()
    rim = brain & ~inner
    assert rim[0:3].sum() > 0 or rim[:, 0:3].sum() > 0  # the shell is what went
