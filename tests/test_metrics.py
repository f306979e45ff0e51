"""helpers.metrics against scikit-learn, SciPy, brute force and hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist, directed_hausdorff
from scipy.stats import norm
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve as sk_calibration_curve

from helpers import metrics as M

# --------------------------------------------------------------------------- data


def binary_data(n: int, seed: int = 0, separation: float = 1.0, ties: bool = False):
    """Labels and probabilities from two overlapping normal score distributions."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    z = rng.normal(size=n) + separation * y
    p = 1 / (1 + np.exp(-z))
    if ties:
        p = np.round(p, 1)
    return y, p


def multiclass_data(n: int, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


# --------------------------------------------------------------------------- classification vs scikit-learn


@pytest.mark.parametrize("ties", [False, True])
def test_binary_report_matches_scikit_learn(ties):
    y, p = binary_data(157, seed=3, ties=ties)
    thr = 0.55
    r = M.classification_report(y, p, class_names=["healthy", "lesion"], threshold=thr, n_boot=0)
    pred = (p >= thr).astype(int)
    assert r.value("accuracy") == pytest.approx(skm.accuracy_score(y, pred))
    assert r.value("sensitivity") == pytest.approx(skm.recall_score(y, pred))
    assert r.value("specificity") == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert r.value("precision") == pytest.approx(skm.precision_score(y, pred))
    assert r.value("f1") == pytest.approx(skm.f1_score(y, pred))
    for avg in ("macro", "weighted"):
        assert r.value("f1", avg) == pytest.approx(skm.f1_score(y, pred, average=avg))
        assert r.value("precision", avg) == pytest.approx(skm.precision_score(y, pred, average=avg))
        assert r.value("sensitivity", avg) == pytest.approx(skm.recall_score(y, pred, average=avg))
    assert r.value("roc_auc") == pytest.approx(skm.roc_auc_score(y, p))
    assert r.value("average_precision") == pytest.approx(skm.average_precision_score(y, p))
    assert r.value("brier") == pytest.approx(skm.brier_score_loss(y, p))
    np.testing.assert_array_equal(r.confusion, skm.confusion_matrix(y, pred))
    # Two-column probabilities mean the same thing as the class-1 column.
    r2 = M.classification_report(y, np.stack([1 - p, p], 1), threshold=thr, n_boot=0)
    assert r2.value("f1") == pytest.approx(r.value("f1"))


def test_multiclass_report_matches_scikit_learn():
    y, proba = multiclass_data(240, k=3, seed=1)
    r = M.classification_report(y, proba, class_names=["a", "b", "c"], n_boot=0)
    pred = proba.argmax(axis=1)
    assert r.value("accuracy") == pytest.approx(skm.accuracy_score(y, pred))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred)
    mcm = skm.multilabel_confusion_matrix(y, pred)  # per class [[tn, fp], [fn, tp]]
    spec = mcm[:, 0, 0] / (mcm[:, 0, 0] + mcm[:, 0, 1])
    for c, name in enumerate("abc"):
        assert r.value("sensitivity", name) == pytest.approx(rec[c])
        assert r.value("precision", name) == pytest.approx(prec[c])
        assert r.value("f1", name) == pytest.approx(f1[c])
        assert r.value("specificity", name) == pytest.approx(spec[c])
        assert r.value("roc_auc", name) == pytest.approx(skm.roc_auc_score(y == c, proba[:, c]))
    assert r.value("specificity", "macro") == pytest.approx(spec.mean())
    for avg in ("macro", "weighted"):
        assert r.value("f1", avg) == pytest.approx(skm.f1_score(y, pred, average=avg))
        assert r.value("sensitivity", avg) == pytest.approx(skm.recall_score(y, pred, average=avg))
    assert r.value("roc_auc") == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"))
    assert r.value("average_precision") == pytest.approx(
        skm.average_precision_score(np.eye(3)[y], proba, average="macro"))
    assert r.value("brier") == pytest.approx(skm.brier_score_loss(y, proba))
    np.testing.assert_array_equal(r.confusion, skm.confusion_matrix(y, pred))
    assert r.threshold is None


def test_confusion_matrix_matches_scikit_learn_with_absent_classes():
    y = np.array([0, 0, 2, 2, 1])
    pred = np.array([0, 2, 2, 2, 0])
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, 4),
                                  skm.confusion_matrix(y, pred, labels=[0, 1, 2, 3]))


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_and_ap_match_scikit_learn_sample_weights(ties):
    y, p = binary_data(80, seed=7, ties=ties)
    w = np.random.default_rng(0).integers(0, 4, size=(5, 80)).astype(float)
    w[:, :2] = 1  # keep both classes present
    auc = M.weighted_auc(p, y == 1, w)
    ap = M.weighted_average_precision(p, y == 1, w)
    brier = M.weighted_brier(np.stack([1 - p, p], 1), y, w)
    for b in range(len(w)):
        assert auc[b] == pytest.approx(skm.roc_auc_score(y, p, sample_weight=w[b]))
        assert ap[b] == pytest.approx(skm.average_precision_score(y, p, sample_weight=w[b]))
        assert brier[b] == pytest.approx(skm.brier_score_loss(y, p, sample_weight=w[b]))


def test_a_weight_row_scores_like_the_explicit_resample():
    """Weights are draw counts: scoring them equals scoring the repeated cases."""
    y, p = binary_data(60, seed=2)
    w = M.bootstrap_weights(60, 3, seed=5, strata=y)
    for row in w:
        idx = np.repeat(np.arange(60), row.astype(int))
        r = M.classification_report(y[idx], p[idx], n_boot=0)
        assert M.weighted_auc(p, y == 1, row[None])[0] == pytest.approx(r.value("roc_auc"))
        assert r.value("roc_auc") == pytest.approx(skm.roc_auc_score(y[idx], p[idx]))
        assert r.value("f1") == pytest.approx(skm.f1_score(y[idx], (p[idx] >= 0.5).astype(int)))


def test_curves_match_scikit_learn():
    y, p = binary_data(90, seed=4, ties=True)
    roc = M.roc_curve(y == 1, p)
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(roc["fpr"], fpr)
    np.testing.assert_allclose(roc["tpr"], tpr)
    np.testing.assert_allclose(roc["threshold"][1:], thr[1:])
    pr = M.pr_curve(y == 1, p)
    precision, recall, thr = skm.precision_recall_curve(y, p, drop_intermediate=False)
    # scikit-learn lists thresholds from low to high and ends at (recall 0, precision 1).
    np.testing.assert_allclose(pr["precision"], precision[::-1])
    np.testing.assert_allclose(pr["recall"], recall[::-1])
    np.testing.assert_allclose(pr["threshold"][1:], thr[::-1])


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_calibration_curve_matches_scikit_learn(strategy):
    y, p = binary_data(300, seed=9)
    ours = M.calibration_curve(y, p, n_bins=8, strategy=strategy)
    obs, pred = sk_calibration_curve(y, p, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(ours["observed"], obs)
    np.testing.assert_allclose(ours["predicted"], pred)
    assert ours["count"].sum() == 300


# --------------------------------------------------------------------------- hand-made cases


def test_perfect_inverted_and_uninformative_scores():
    y = np.array([0, 0, 0, 1, 1])
    good = M.classification_report(y, [0.1, 0.2, 0.3, 0.8, 0.9], n_boot=0)
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert good.value(name) == 1.0
    bad = M.classification_report(y, [0.9, 0.8, 0.7, 0.2, 0.1], n_boot=0)
    assert bad.value("roc_auc") == 0.0 and bad.value("accuracy") == 0.0
    flat = M.classification_report(y, [0.5] * 5, n_boot=0)
    assert flat.value("roc_auc") == 0.5
    assert flat.value("sensitivity") == 1.0 and flat.value("specificity") == 0.0
    assert flat.value("brier") == pytest.approx(0.25)


def test_precision_with_no_positive_calls_is_zero_like_scikit_learn():
    r = M.classification_report([0, 1, 1], [0.1, 0.2, 0.3], n_boot=0)
    assert r.value("precision") == 0.0 and r.value("sensitivity") == 0.0
    assert r.value("precision") == skm.precision_score([0, 1, 1], [0, 0, 0], zero_division=0)


def test_expected_calibration_error_known_answers():
    # Every case says 0.8; half are positive: one bin, |0.5 - 0.8| = 0.3.
    y = np.array([1, 0] * 10)
    r = M.classification_report(y, np.full(20, 0.8), n_boot=0)
    assert r.value("ece") == pytest.approx(0.3)
    # Two bins, each calibrated exactly: 0.25 says 1 of 4, 0.75 says 3 of 4.
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert M.classification_report(y, p, n_boot=0).value("ece") == pytest.approx(0.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="labels but"):
        M.classification_report([0, 1], [0.2, 0.3, 0.4], n_boot=0)
    with pytest.raises(ValueError, match="outside"):
        M.classification_report([0, 3], [0.2, 0.3], n_boot=0)
    with pytest.raises(ValueError, match="shape"):
        M.dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        M.hausdorff95(np.ones((2, 2, 2)), np.ones((2, 2, 2)), spacing=(1, 1))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_weights_are_stratified_and_reproducible():
    strata = np.array([0] * 7 + [1] * 3)
    w = M.bootstrap_weights(10, 400, seed=11, strata=strata)
    assert w.shape == (400, 10)
    np.testing.assert_array_equal(w.sum(axis=1), 10)
    np.testing.assert_array_equal(w[:, strata == 1].sum(axis=1), 3)  # every resample has both
    np.testing.assert_array_equal(w, M.bootstrap_weights(10, 400, seed=11, strata=strata))
    assert not np.array_equal(w, M.bootstrap_weights(10, 400, seed=12, strata=strata))
    # Each case is drawn once per resample on average.
    assert np.allclose(w.mean(axis=0), 1, atol=0.2)


def test_intervals_cover_the_point_estimate_and_shrink_with_more_cases():
    widths = {}
    for n in (60, 600):
        y, p = binary_data(n, seed=1)
        r = M.classification_report(y, p, n_boot=500, seed=0)
        for (metric, scope), e in r.estimates.items():
            if metric in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "brier"):
                assert e.low <= e.value <= e.high, (n, metric, scope, e)
        widths[n] = {m: r.get(m).high - r.get(m).low for m in ("accuracy", "roc_auc", "f1")}
    for m in widths[60]:
        # The width of an interval falls roughly as 1/sqrt(n): 10x the cases, about 1/3 the width.
        assert widths[600][m] < 0.6 * widths[60][m], (m, widths)


def test_intervals_are_reproducible_for_a_seed():
    y, p = binary_data(100, seed=2)
    a = M.classification_report(y, p, n_boot=200, seed=3).as_dict()
    b = M.classification_report(y, p, n_boot=200, seed=3).as_dict()
    c = M.classification_report(y, p, n_boot=200, seed=4).as_dict()
    assert a == b
    assert a["scores"]["roc_auc"] != c["scores"]["roc_auc"]


def test_auc_interval_covers_the_true_auc_about_95_percent_of_the_time():
    """Coverage check: scores from two unit normals one SD apart have AUC Phi(1/sqrt 2)."""
    true_auc = norm.cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(0)
    hits = 0
    trials = 120
    for t in range(trials):
        y = np.r_[np.zeros(60, int), np.ones(60, int)]
        s = rng.normal(size=120) + y
        e = M.bootstrap(lambda w, s=s, y=y: M.weighted_auc(s, y == 1, w), 120, n_boot=400,
                        seed=t, strata=y)
        hits += e.low <= true_auc <= e.high
    # Percentile intervals run a little narrow at n = 120; a broken bootstrap lands far outside.
    assert 0.85 <= hits / trials <= 0.995, hits / trials


def test_bootstrap_mean_ignores_nan_and_handles_all_nan():
    e = M.bootstrap_mean([0.5, np.nan, 0.7], n_boot=200, seed=0)
    assert e.value == pytest.approx(0.6)
    assert 0.5 <= e.low <= e.value <= e.high <= 0.7
    assert math.isnan(M.bootstrap_mean([np.nan], n_boot=10).value)


def test_estimate_as_dict_is_json_safe():
    assert M.Estimate(math.nan).as_dict() == {"value": None, "low": None, "high": None}
    assert str(M.Estimate(0.5, 0.4, 0.6)) == "0.500 [0.400, 0.600]"


# --------------------------------------------------------------------------- operating point


def test_choose_threshold_on_validation_then_measure_on_test():
    y_val, p_val = binary_data(200, seed=5)
    op = M.choose_threshold(y_val, p_val, min_sensitivity=0.9)
    pos = np.sort(p_val[y_val == 1])
    assert (p_val[y_val == 1] >= op.threshold).mean() >= 0.9
    # The next-higher positive score would miss the target: this is the highest threshold.
    higher = pos[pos > op.threshold]
    if len(higher):
        assert (p_val[y_val == 1] >= higher.min()).mean() < 0.9
    # The chosen point lies on the validation ROC curve.
    roc = M.roc_curve(y_val == 1, p_val)
    at = np.flatnonzero(roc["threshold"] == op.threshold)[0]
    assert op.sensitivity.value == pytest.approx(roc["tpr"][at])
    assert op.specificity.value == pytest.approx(1 - roc["fpr"][at])
    y_test, p_test = binary_data(150, seed=6)
    test = M.operating_point(y_test, p_test, op, n_boot=300, seed=0)
    pred = p_test >= op.threshold
    assert test.chosen_on == "test" and test.threshold == op.threshold
    assert test.sensitivity.value == pytest.approx(skm.recall_score(y_test, pred))
    assert test.specificity.value == pytest.approx(skm.recall_score(y_test, pred, pos_label=0))
    assert test.sensitivity.low <= test.sensitivity.value <= test.sensitivity.high


def test_choose_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        M.choose_threshold([1, 1], [0.2, 0.3])


# --------------------------------------------------------------------------- segmentation


def brute_force_surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels by checking the six face neighbours one by one (outside = empty)."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        p = tuple(i + 1 for i in idx)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                if not padded[tuple(q)]:
                    out[idx] = True
    return out


def test_dice_and_iou_match_scikit_learn_on_flattened_masks():
    rng = np.random.default_rng(0)
    a = rng.random((6, 7, 5)) < 0.3
    b = rng.random((6, 7, 5)) < 0.4
    assert M.dice(a, b) == pytest.approx(skm.f1_score(b.ravel(), a.ravel()))
    assert M.iou(a, b) == pytest.approx(skm.jaccard_score(b.ravel(), a.ravel()))
    # Dice and IoU are tied: D = 2J / (1 + J).
    j = M.iou(a, b)
    assert M.dice(a, b) == pytest.approx(2 * j / (1 + j))


def test_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.hausdorff95(empty, empty) == 0.0
    assert M.dice(full, empty) == 0.0 and M.iou(empty, full) == 0.0
    assert math.isnan(M.hausdorff95(full, empty)) and math.isnan(M.hausdorff95(empty, full))
    assert M.hausdorff95(full, full, spacing=(2, 2, 2)) == 0.0


def test_hausdorff_of_single_voxels_and_shifted_cubes_known_answers():
    a = np.zeros((5, 5, 12), bool)
    b = a.copy()
    a[1, 1, 2] = True
    b[4, 1, 6] = True
    # 3 voxels of 0.5 mm and 4 voxels of 3 mm: sqrt(1.5^2 + 12^2).
    assert M.hausdorff95(a, b, spacing=(0.5, 1, 3)) == pytest.approx(math.hypot(1.5, 12))
    # A 4-voxel cube and the same cube moved 2 voxels along axis 0 (3 mm voxels):
    # the far faces are 6 mm apart; everything else is closer.
    c = np.zeros((10, 8, 8), bool)
    d = c.copy()
    c[1:5, 2:6, 2:6] = True
    d[3:7, 2:6, 2:6] = True
    assert M.hausdorff95(c, d, spacing=(3, 1, 1), percentile=100) == pytest.approx(6.0)
    assert 0 < M.hausdorff95(c, d, spacing=(3, 1, 1)) <= 6.0


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force_pairwise_distances_with_anisotropic_spacing(seed):
    rng = np.random.default_rng(seed)
    spacing = (0.8, 1.5, 3.0)
    a = rng.random((7, 6, 5)) < 0.25
    b = rng.random((7, 6, 5)) < 0.25
    sa, sb = brute_force_surface(a), brute_force_surface(b)
    np.testing.assert_array_equal(M.surface(a), sa)
    pa = np.argwhere(sa) * spacing
    pb = np.argwhere(sb) * spacing
    d = cdist(pa, pb)
    expected = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
    assert M.hausdorff95(a, b, spacing) == pytest.approx(expected)
    hd = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
    assert M.hausdorff95(a, b, spacing, percentile=100) == pytest.approx(hd)


def test_volumes_and_segmentation_scores_per_region():
    truth = np.zeros((10, 10, 10), np.int16)
    truth[2:6, 2:6, 2:6] = 2  # oedema, 64 voxels
    truth[3:5, 3:5, 3:5] = 1  # core, 8 voxels
    pred = truth.copy()
    pred[6, 2:6, 2:6] = 2  # 16 extra oedema voxels
    spacing = (2.0, 2.0, 2.0)  # 8 mm^3 per voxel
    s = M.segmentation_scores(pred, truth, spacing, {"whole": [1, 2], "core": [1]})
    assert s["core"]["dice"] == 1.0 and s["core"]["hd95_mm"] == 0.0
    assert s["whole"]["volume_true_ml"] == pytest.approx(64 * 8 / 1000)
    assert s["whole"]["volume_error_ml"] == pytest.approx(16 * 8 / 1000)
    assert s["whole"]["dice"] == pytest.approx(2 * 64 / (64 + 80))
    assert set(M.segmentation_scores(pred, truth, spacing)) == {"lesion"}


def test_bland_altman_known_answer():
    ba = M.bland_altman([10.0, 12.0, 9.0, 7.0], [9.0, 11.0, 10.0, 7.0])
    diff = np.array([1.0, 1.0, -1.0, 0.0])
    assert ba["bias"] == pytest.approx(0.25)
    assert ba["sd"] == pytest.approx(diff.std(ddof=1))
    assert ba["loa_high"] - ba["loa_low"] == pytest.approx(2 * 1.96 * diff.std(ddof=1))
    np.testing.assert_allclose(ba["mean"], [9.5, 11.5, 9.5, 7.0])
