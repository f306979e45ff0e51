"""helpers.evaluate: threshold on validation only, groups, segmentation summaries, the comparison
table, and the command line end to end on a tiny BIDS fixture."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from datafixtures import make_bids

from helpers import evaluate as EV
from helpers import metrics as M
from helpers.runtime import get_profile


def scores(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y)))
    return y, p


# --------------------------------------------------------------------------- classification


def test_threshold_is_chosen_on_validation_and_test_only_measures_it():
    y_val, p_val = scores(60, 0)
    y_test, p_test = scores(40, 1)
    meta = pd.DataFrame({"site": ["A", "B"] * 20, "diagnosis": np.where(y_test == 1, "tumour", "healthy"),
                         "lesion_volume_ml": np.where(y_test == 1, 12.0, 0.0)},
                        index=pd.Index([f"sub-{i:02d}" for i in range(40)], name="subject"))
    ev = EV.evaluate_classifier(y_val, p_val, y_test, p_test, ["healthy", "lesion"], meta,
                                min_sensitivity=0.9, n_boot=200)
    expected = M.choose_threshold(y_val, p_val, 0.9).threshold
    assert ev.chosen.threshold == ev.operating.threshold == expected == ev.report.threshold
    # Other test predictions cannot move the threshold.
    ev2 = EV.evaluate_classifier(y_val, p_val, y_test, 1 - p_test, ["healthy", "lesion"], meta, 0.9, 200)
    assert ev2.operating.threshold == expected
    assert ev.operating.sensitivity.value == pytest.approx(((p_test >= expected) & (y_test == 1)).sum() / 20)
    # Cases come worst first, with their metadata.
    assert list(ev.cases["error"]) == sorted(ev.cases["error"], reverse=True)
    assert {"site", "diagnosis", "probability of lesion", "call"} <= set(ev.cases.columns)
    # Groups: counts add up; sensitivity only where there are lesions.
    site = ev.groups["site"]
    assert site["cases"].sum() == 40
    diag = ev.groups["diagnosis"].set_index("group")
    assert np.isnan(diag.loc["healthy", "sensitivity"]) and np.isnan(diag.loc["tumour", "specificity"])
    assert diag.loc["tumour", "sensitivity"] == pytest.approx(ev.operating.sensitivity.value)
    assert set(ev.groups["lesion size"]["group"]) == {"none", "10-50 ml"}
    json.dumps(ev.as_dict())  # JSON-ready


def test_multiclass_evaluation_has_no_threshold():
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(3), 10)
    p = rng.dirichlet(np.ones(3), size=30)
    ev = EV.evaluate_classifier(y, p, y, p, ["healthy", "ms", "tumour"], n_boot=50)
    assert ev.operating is None and ev.report.threshold is None
    assert ev.cases["error"].between(0, 1).all()


def test_subject_probabilities_take_the_most_suspicious_slice():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    subjects, p = EV.subject_probabilities(probs, ["a", "a", "b", "b"], healthy_index=0)
    assert subjects == ["a", "b"]
    np.testing.assert_allclose(p, [[0.2, 0.8], [0.6, 0.4]])


def test_size_bins():
    assert [EV.size_bin(v) for v in (0, 1.0, 2.0, 12, 50, np.nan)] == [
        "none", "< 2 ml", "2-10 ml", "10-50 ml", ">= 50 ml", "none"]


# --------------------------------------------------------------------------- segmentation


def test_segmentation_summary_bland_altman_and_conventions():
    truth, pred = [], []
    for i in range(4):
        t = np.zeros((10, 10, 10), np.int64)
        p = t.copy()
        if i < 3:
            t[2:6, 2:6, 2:6] = 1
            p[2:6, 2:6, 2 + i:6] = 1 if i < 2 else 0  # case 2: lesion missed entirely
        else:
            p[0, 0, 0] = 1  # case 3: healthy, one false voxel
        truth.append(t)
        pred.append(p)
    spacing = [(1.0, 1.0, 2.0)] * 4
    ev = EV.evaluate_segmenter(pred, truth, spacing, n_boot=100)
    dices = [M.dice(p, t) for p, t in zip(pred, truth, strict=True)]
    assert ev.summary["dice"].value == pytest.approx(np.mean(dices[:3]))  # lesion cases only
    assert ev.summary["missed_lesion_cases"].value == 1
    assert ev.summary["false_lesion_cases"].value == 1
    assert np.isnan(ev.cases.sort_index().loc[2, "hd95_mm"])  # one mask empty
    vol_err = [M.volume_ml(p, s) - M.volume_ml(t, s) for p, t, s in zip(pred, truth, spacing, strict=True)]
    assert ev.bland_altman["bias"] == pytest.approx(np.mean(vol_err))
    json.dumps(ev.as_dict())


def test_overlap_labels():
    t = np.array([1, 1, 0, 0])
    p = np.array([1, 0, 1, 0])
    assert EV.overlap_labels(p, t).tolist() == [3, 1, 2, 0]


# --------------------------------------------------------------------------- comparison


def entry(name, y, p, subjects, params=10):
    return {"approach": name, "y_test": y, "p_test": p, "subjects": subjects, "parameters": params,
            "train_seconds": 1.5}


def test_comparison_table_matches_the_reports_and_checks_subjects():
    y, p = scores(30, 2)
    subjects = [f"s{i}" for i in range(30)]
    table = EV.comparison_table([entry("a", y, p, subjects), entry("b", y, 1 - p, subjects[::-1])],
                                n_boot=100)
    r = M.classification_report(y, p, n_boot=100, seed=0)
    row = table.set_index("approach").loc["a"]
    assert row["roc_auc"] == pytest.approx(r.value("roc_auc"))
    assert row["roc_auc low"] == pytest.approx(r.get("roc_auc").low)
    assert table.set_index("approach").loc["b", "roc_auc"] == pytest.approx(1 - r.value("roc_auc"))
    text = EV.format_table(table)
    assert text.loc["a", "roc_auc"].count("[") == 1 and text.loc["a", "parameters"] == "10"
    with pytest.raises(ValueError, match="same subjects"):
        EV.comparison_table([entry("a", y, p, subjects), entry("c", y, p, [f"x{i}" for i in range(30)])])


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMRI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BRAINMRI_RUNS", str(tmp_path / "runs"))
    root = make_bids(tmp_path / "bids", n_subjects=20)
    profile = get_profile("smoke", volume_size=12, epochs=1, bootstrap=50, max_train_seconds=20)
    return root, profile


def test_ensure_run_trains_once_then_evaluate_cli_writes_json_and_pngs(tiny, capsys):
    root, profile = tiny
    run = EV.ensure_run(root, profile, "cnn", depth=2, width=4)
    assert (run / "checkpoint.pt").exists() and run.name.endswith("_smoke")
    assert EV.ensure_run(root, profile, "cnn", depth=2, width=4) == run  # found, not retrained
    assert "Using the trained run" in capsys.readouterr().out
    out = run.parent / "eval"
    assert EV.main(["--run", str(run), "--n-boot", "50", "--out", str(out)]) == 0
    for name in ("metrics.json", "confusion.png", "roc.png", "pr.png", "calibration.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "classify" and saved["test"]["n_boot"] == 50
    assert set(saved["test"]["scores"]) >= {"roc_auc", "sensitivity", "specificity", "brier", "ece"}
    assert saved["operating_point"]["test"] is None or saved["operating_point"]["test"]["chosen_on"] == "test"
    assert len(saved["cases"]) == saved["test_subjects"] == saved["test"]["n_cases"]
    entry_ = EV.run_entry(run, "tiny cnn")
    assert entry_["parameters"] > 0 and sorted(entry_["subjects"]) == sorted(c["subject"] for c in saved["cases"])


def test_segmentation_run_end_to_end(tiny):
    root, profile = tiny
    run = EV.ensure_run(root, profile, "unet", task="segment", depth=2, width=4)
    result = EV.evaluate_run(run, n_boot=30, verbose=False)
    assert (result.out / "bland_altman.png").exists()
    cases = result.segmentation.cases
    assert len(cases) == len(result.data.prep.test) and cases["dice"].between(0, 1).all()
    spacing = EV.case_spacings(result.data)
    assert len(spacing) == len(cases) and all(s > 0 for sp in spacing for s in sp)


def test_cli_names_the_problem_for_a_folder_without_a_run(tmp_path, capsys):
    assert EV.main(["--run", str(tmp_path)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_comparison_rows_use_the_same_resamples_whatever_the_subject_order():
    y, p = scores(30, 4)
    subjects = [f"s{i}" for i in range(30)]
    order = np.random.default_rng(0).permutation(30)
    table = EV.comparison_table([entry("a", y, p, subjects),
                                 entry("a shuffled", y[order], p[order], [subjects[i] for i in order])],
                                n_boot=200)
    a, b = table.iloc[0], table.iloc[1]
    for col in ("roc_auc", "roc_auc low", "roc_auc high", "f1 low", "f1 high"):
        assert a[col] == pytest.approx(b[col]), col


def test_slice_model_with_diagnosis_labels_is_scored_per_subject(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINMRI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BRAINMRI_RUNS", str(tmp_path / "runs"))
    root = make_bids(tmp_path / "bids", n_subjects=24, labels=("healthy", "tumour", "ms"))
    profile = get_profile("smoke", slice_size=12, epochs=1, bootstrap=30, max_train_seconds=20)
    run = EV.ensure_run(root, profile, "cnn", "slices", labels="diagnosis", depth=2, width=4, verbose=False)
    result = EV.evaluate_run(run, n_boot=30, verbose=False)
    ev = result.classification
    subjects = result.data.prep.subjects["test"]
    assert len(subjects) > len(set(subjects))  # several slices per subject...
    assert len(ev.cases) == len(set(subjects)) == ev.report.n_cases  # ...one row per subject
    assert ev.report.class_names == ["healthy", "ms", "tumour"] and ev.operating is None
    truth = result.data.table.df.set_index("subject").loc[ev.cases.index, "label"]
    assert list(ev.cases["truth"]) == list(truth)
    assert (result.out / "confusion.png").exists() and not (result.out / "calibration.png").exists()
