"""The simulated cohort: determinism, alignment, proportions, orientations, BIDS, safe reruns.

Cohorts here are tiny (4-6 subjects at 4 mm) and live in temp folders; the
template cache goes to a temp data folder too.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import nibabel as nib
import numpy as np
import pytest

from helpers import anatomy, runtime, simulate
from helpers.io import DataError, sha256_file

SPACING = 4.0
ALL_CLASSES = {"healthy": 1, "tumour": 1, "stroke": 1, "ms": 1}


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    """A temp BRAINMRI_DATA so the template cache is not written into the checkout."""
    home = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINMRI_DATA", str(home))
        yield home


@pytest.fixture(scope="module")
def cohort(data_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "bids"
    return simulate.simulate_cohort(root, n_subjects=6, spacing_mm=SPACING, seed=3,
                                    proportions=ALL_CLASSES, n_jobs=2, verbose=False)


def _checksums(root):
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*.nii.gz"))}


def _participants(root):
    with open(root / "participants.tsv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_same_seed_gives_identical_files_whatever_the_workers(cohort, tmp_path):
    again = simulate.simulate_cohort(tmp_path / "again", n_subjects=6, spacing_mm=SPACING, seed=3,
                                     proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    first, second = _checksums(cohort), _checksums(again)
    assert len(first) == 6 * 6
    assert first == second
    assert (cohort / "participants.tsv").read_text() == (again / "participants.tsv").read_text()


def test_a_different_seed_gives_different_images(cohort, tmp_path):
    other = simulate.simulate_cohort(tmp_path / "other", n_subjects=6, spacing_mm=SPACING, seed=4,
                                     proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    first, second = _checksums(cohort), _checksums(other)
    t1 = [k for k in first if k.endswith("_T1w.nii.gz")]
    assert all(first[k] != second[k] for k in t1)


def test_labels_and_images_share_one_grid_and_the_right_types(cohort):
    for row in _participants(cohort):
        pid = row["participant_id"]
        files = simulate.subject_files(pid)
        imgs = {key: nib.load(cohort / rel) for key, rel in files.items()}
        ref = imgs["T1w"]
        for key, img in imgs.items():
            assert img.shape == ref.shape, (pid, key)
            np.testing.assert_allclose(img.affine, ref.affine, err_msg=f"{pid} {key}")
            expected = np.int16 if key in simulate.MODALITIES else np.uint8
            assert img.get_data_dtype() == expected, (pid, key)
        # nibabel moves scl_slope/scl_inter from the header into the array proxy on load
        assert ref.dataobj.get_unscaled().dtype == np.int16 and ref.dataobj.slope not in (0, 1)
        assert "".join(nib.aff2axcodes(ref.affine)) == row["orientation"]
        dseg = np.asanyarray(imgs["dseg"].dataobj)
        mask = np.asanyarray(imgs["brain_mask"].dataobj)
        tissue = np.asanyarray(imgs["tissue"].dataobj)
        assert set(np.unique(dseg)) <= {0, *simulate.LESION_LABELS}
        assert set(np.unique(tissue)) <= {0, 1, 2, 3}
        assert np.all(mask[dseg > 0] == 1), f"{pid}: lesion voxels outside the brain mask"
        assert np.array_equal(tissue > 0, mask > 0)


def test_lesions_are_where_the_labels_say(cohort):
    for row in _participants(cohort):
        if row["diagnosis"] == "healthy":
            assert float(row["lesion_volume_ml"]) == 0
            continue
        files = simulate.subject_files(row["participant_id"])
        flair = np.asanyarray(nib.load(cohort / files["FLAIR"]).dataobj, dtype=np.float32)
        dseg = np.asanyarray(nib.load(cohort / files["dseg"]).dataobj)
        tissue = np.asanyarray(nib.load(cohort / files["tissue"]).dataobj)
        assert float(row["lesion_volume_ml"]) > 0
        wm = flair[(tissue == 3) & (dseg == 0)].mean()
        assert flair[dseg > 0].mean() > 1.05 * wm, row


def test_requested_class_proportions_hold():
    counts = simulate.class_counts(10, simulate.DEFAULT_PROPORTIONS)
    assert counts == {"healthy": 4, "tumour": 2, "stroke": 2, "ms": 2}
    assert sum(simulate.class_counts(7, simulate.DEFAULT_PROPORTIONS).values()) == 7
    settings = simulate.CohortSettings(50, 2.0, 1, 0.4, tuple({"healthy": 0.5, "tumour": 0.5}.items()))
    diagnoses = [p.diagnosis for p in simulate.plan_cohort(settings)]
    assert diagnoses.count("healthy") == 25 and diagnoses.count("tumour") == 25
    with pytest.raises(ValueError, match="unknown diagnosis"):
        simulate.class_counts(4, {"flu": 1.0})


def test_cohort_table_has_the_requested_classes(cohort):
    diagnoses = sorted(r["diagnosis"] for r in _participants(cohort))
    expected = simulate.class_counts(6, ALL_CLASSES)
    assert {d: diagnoses.count(d) for d in simulate.DIAGNOSES} == expected


def test_every_orientation_stores_the_same_anatomy_in_world_coordinates(data_home):
    settings = simulate.CohortSettings(4, SPACING, 5, 0.2, tuple({"tumour": 1.0}.items()))
    plan = simulate.plan_cohort(settings)[0]
    centroids, canonical = {}, {}
    for code in simulate.ORIENTATIONS:
        res = simulate.simulate_subject(dataclasses.replace(plan, orientation=code), settings)
        assert "".join(nib.aff2axcodes(res["affine"])) == code
        dseg = res["labels"]["dseg"]
        ijk = np.argwhere(dseg > 0).mean(axis=0)
        centroids[code] = nib.affines.apply_affine(res["affine"], ijk)
        img = nib.as_closest_canonical(nib.Nifti1Image(res["images"]["T1w"], res["affine"]))
        canonical[code] = (np.asanyarray(img.dataobj), img.affine)
    for code in simulate.ORIENTATIONS:
        np.testing.assert_allclose(centroids[code], centroids["RAS"], atol=1e-6, err_msg=code)
        np.testing.assert_array_equal(canonical[code][0], canonical["RAS"][0], err_msg=code)
        np.testing.assert_allclose(canonical[code][1], canonical["RAS"][1], atol=1e-9, err_msg=code)


def test_bids_names_and_tables_are_valid(cohort):
    rows = _participants(cohort)
    columns = list(rows[0])
    for needed in ("participant_id", "diagnosis", "age", "sex", "site", "lesion_volume_ml",
                   "difficulty", "spacing_mm", "orientation"):
        assert needed in columns
    folders = sorted(p.name for p in cohort.glob("sub-*") if p.is_dir())
    assert folders == sorted(r["participant_id"] for r in rows)
    assert all(r["diagnosis"] in simulate.DIAGNOSES for r in rows)
    pattern = re.compile(r"^sub-\d{3}/anat/sub-\d{3}_(T1w|T2w|FLAIR)\.nii\.gz$")
    raw = [p.relative_to(cohort).as_posix() for p in cohort.glob("sub-*/**/*") if p.is_file()]
    assert raw and all(pattern.match(name) for name in raw), raw
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    assert "simulated" in description["Name"].lower() and description["Simulated"] is True
    labels = cohort / "derivatives" / "labels"
    assert json.loads((labels / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    table = (labels / "dseg.tsv").read_text().splitlines()
    assert table[0] == "index\tname" and len(table) == 1 + len(simulate.LESION_LABELS)
    sidecar = json.loads((cohort / "participants.json").read_text())
    assert set(columns) <= set(sidecar)


def test_a_truncated_or_corrupted_file_is_detected_and_regenerated(cohort, tmp_path):
    root = simulate.simulate_cohort(tmp_path / "c", n_subjects=4, spacing_mm=SPACING, seed=3,
                                    proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    before = _checksums(root)
    truncated = root / simulate.subject_files("sub-002")["FLAIR"]
    truncated.write_bytes(truncated.read_bytes()[:500])
    flipped = root / simulate.subject_files("sub-003")["dseg"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content, newer time
    flipped.write_bytes(bytes(data))
    assert simulate.check_cohort(root)["bad"] == ["sub-002", "sub-003"]
    simulate.simulate_cohort(root, n_subjects=4, spacing_mm=SPACING, seed=3,
                             proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    assert _checksums(root) == before
    assert simulate.check_cohort(root, full=True)["bad"] == []


def test_an_interrupted_run_leaves_no_finished_looking_file(data_home, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = simulate._nifti_bytes

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # the second subject's second file
            raise KeyboardInterrupt("simulated power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate, "_nifti_bytes", failing)
    root = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        simulate.simulate_cohort(root, n_subjects=4, spacing_mm=SPACING, seed=3,
                                 proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    assert not list(root.rglob(".*.tmp-*")), "a temporary file was left behind"
    manifest = json.loads((root / simulate.MANIFEST).read_text())
    assert manifest["complete"] is False
    assert not (root / "participants.tsv").exists()
    monkeypatch.setattr(simulate, "_nifti_bytes", real)
    simulate.simulate_cohort(root, n_subjects=4, spacing_mm=SPACING, seed=3,
                             proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    assert simulate.check_cohort(root, full=True) == {
        "ok": ["sub-001", "sub-002", "sub-003", "sub-004"], "bad": []}


def test_other_settings_in_the_same_folder_are_refused(cohort):
    with pytest.raises(DataError, match="other settings"):
        simulate.simulate_cohort(cohort, n_subjects=6, spacing_mm=SPACING, seed=99,
                                 proportions=ALL_CLASSES, verbose=False)


def test_ensure_cohort_takes_a_profile_and_reuses(data_home, tmp_path, capsys):
    profile = runtime.get_profile("smoke", n_subjects=4, spacing_mm=SPACING, seed=8)
    root = simulate.ensure_cohort(profile, root=tmp_path / "p")
    assert (root / "participants.tsv").exists()
    mtime = (root / "participants.tsv").stat().st_mtime_ns
    assert simulate.ensure_cohort(profile, root=tmp_path / "p") == root
    assert "Reusing" in capsys.readouterr().out
    assert (root / "participants.tsv").stat().st_mtime_ns == mtime
    default = simulate.ensure_cohort(profile)
    assert default == data_home / "simulated" / "n4_4mm_seed8"
    from helpers.environment import default_data_status  # finds cohorts by dataset_description.json

    assert default_data_status()["cohorts"] == [default]  # not its derivatives/labels


def test_command_line(data_home, tmp_path, capsys):
    code = simulate.main(["--out", str(tmp_path / "cli"), "--subjects", "4", "--spacing", "4",
                          "--seed", "2", "--jobs", "1", "--difficulty", "hard"])
    assert code == 0
    assert len(_participants(tmp_path / "cli")) == 4
    assert simulate.main(["--out", str(tmp_path / "cli"), "--subjects", "5", "--spacing", "4"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_difficulty_makes_lesions_smaller_and_fainter(data_home):
    assert simulate.parse_difficulty("hard") > simulate.parse_difficulty("easy")
    with pytest.raises(ValueError):
        simulate.parse_difficulty(1.5)
    easy = simulate.CohortSettings(40, SPACING, 1, 0.1, tuple({"stroke": 1.0}.items()))
    hard = dataclasses.replace(easy, difficulty=0.9)
    s_easy = np.mean([p.subtlety for p in simulate.plan_cohort(easy)])
    s_hard = np.mean([p.subtlety for p in simulate.plan_cohort(hard)])
    assert s_easy < 0.25 < 0.75 < s_hard
    plan = simulate.plan_cohort(easy)[0]
    volumes = [simulate.simulate_subject(dataclasses.replace(plan, subtlety=s), easy)["row"]["lesion_volume_ml"]
               for s in (0.0, 1.0)]
    assert volumes[0] > volumes[1] > 0


def test_template_cache_is_reused(data_home):
    path = anatomy.template_cache_path(SPACING)
    anatomy.load_template(SPACING)
    assert path.exists()
    anatomy._MEMORY.clear()
    tpl = anatomy.load_template(SPACING)
    assert tpl.names == anatomy.CHANNELS and tpl.channels.shape[0] == len(anatomy.CHANNELS)
    wm = tpl.value_at("wm", np.array([[28.0, -10.0, 25.0]]))  # deep white matter (corona radiata)
    assert wm[0] > 0.5


def test_a_cohort_from_an_older_generator_is_remade_in_place(data_home, tmp_path, capsys):
    root = simulate.simulate_cohort(tmp_path / "v", n_subjects=4, spacing_mm=SPACING, seed=3,
                                    proportions=ALL_CLASSES, n_jobs=1, verbose=False)
    manifest_path = root / simulate.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["settings"]["version"] = "0.9"
    manifest_path.write_text(json.dumps(manifest))
    stale = root / simulate.subject_files("sub-001")["T1w"]
    stale.write_bytes(b"old generator output")
    simulate.simulate_cohort(root, n_subjects=4, spacing_mm=SPACING, seed=3,
                             proportions=ALL_CLASSES, n_jobs=1, verbose=True)
    assert "remaking it" in capsys.readouterr().out
    assert json.loads(manifest_path.read_text())["settings"]["version"] == simulate.SIM_VERSION
    assert simulate.check_cohort(root, full=True)["bad"] == []
    assert nib.load(stale).shape  # a real image again
