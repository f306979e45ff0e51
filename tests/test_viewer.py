"""helpers.viewer and helpers.orientation: geometry, overlays, controls, headless fallback.

Volumes are small and made here. The same anatomy is stored three ways (RAS, LPS,
permuted axes) to check that the viewer shows the same point at the same
millimetre coordinate and the same screen pixel whatever the storage order.
"""

from __future__ import annotations

import base64
import io
import json
import re

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from helpers import orientation as ori
from helpers import series
from helpers import viewer as V
from helpers.io import DataError
from helpers.paths import PROJECT_ROOT

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "viewer_demo.ipynb"
SHAPE = (20, 24, 16)
RAS_AFFINE = np.array([[1.0, 0, 0, -10], [0, 1.5, 0, -18], [0, 0, 2.0, -12], [0, 0, 0, 1]])
MARK = (14, 5, 11)  # a voxel on the patient's right, posterior, superior (RAS indices)


def ras_volume() -> np.ndarray:
    """Values that differ along every axis, plus one bright marker voxel."""
    i, j, k = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
    data = 100 + 3 * i + 2 * j + k
    data[MARK] = 1000.0
    return data


def stored(data_ras: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool],
           affine_ras: np.ndarray = RAS_AFFINE) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored with array axis ``a`` holding RAS axis ``perm[a]`` (reversed if flipped).

    The affine is built by hand (not by nibabel) so that each stored voxel keeps the
    world coordinate it had in RAS storage.
    """
    data = np.transpose(data_ras, perm)
    to_ras = np.zeros((4, 4))
    to_ras[3, 3] = 1
    for a, flip in enumerate(flips):
        if flip:
            data = np.flip(data, a)
        to_ras[perm[a], a] = -1.0 if flip else 1.0
        to_ras[perm[a], 3] = data.shape[a] - 1 if flip else 0.0
    return np.ascontiguousarray(data), affine_ras @ to_ras


STORAGES = {
    "RAS": ((0, 1, 2), (False, False, False)),
    "LPS": ((0, 1, 2), (True, True, False)),
    "SRA": ((2, 0, 1), (False, False, False)),   # permuted axes
    "ILP": ((2, 0, 1), (True, True, True)),      # permuted and reversed
}


def world_of_mark() -> np.ndarray:
    return ori.world_coordinate(RAS_AFFINE, MARK)


@pytest.fixture(autouse=True)
def _no_pyplot_leak():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before, "the viewer must not register figures with pyplot"


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("code", STORAGES)
def test_storage_orders_are_what_their_names_say(code):
    data, affine = stored(ras_volume(), *STORAGES[code])
    assert ori.orientation_code(affine) == code
    # the marker voxel, found in the stored array, sits at the same world point
    found = np.unravel_index(np.argmax(data), data.shape)
    np.testing.assert_allclose(ori.world_coordinate(affine, found), world_of_mark())


@pytest.mark.parametrize("code", STORAGES)
def test_same_point_same_mm_and_same_pixel_whatever_the_storage(code):
    data, affine = stored(ras_volume(), *STORAGES[code])
    v = V.SliceViewer((data, affine), crosshair=False, window=(500, 1000))
    try:
        assert v.stored_orientation == code
        assert ori.orientation_code(v.affine) == "RAS"
        assert v.spacing == (1.0, 1.5, 2.0)
        v.set_cursor_mm(world_of_mark())
        r = v.readout()
        assert r["voxel"] == MARK
        np.testing.assert_allclose(r["world_mm"], world_of_mark(), atol=0.01)
        assert r["intensity"] == 1000.0
        for view in ("axial", "coronal", "sagittal"):
            v.set_view(view)
            shown = ori.plane(v._data[v.modality], view, r["voxel"][ori.SLICE_AXIS[view]])
            row, col = ori.pixel_of_voxel(v.shape, view, MARK)
            assert shown[row, col] == 1000.0
            assert np.count_nonzero(shown == 1000.0) == 1
    finally:
        v.close()


def test_rendered_frames_are_identical_for_every_storage():
    frames = {}
    for code, (perm, flips) in STORAGES.items():
        v = V.SliceViewer(stored(ras_volume(), perm, flips), view="three", window=(300, 400))
        v.set_cursor_mm(world_of_mark())
        frames[code] = v.frame()
        v.close()
    for code, frame in frames.items():
        # the top 30 pixel rows hold the caption, which names the storage order
        np.testing.assert_array_equal(frame[30:], frames["RAS"][30:], err_msg=f"{code} differs")
        assert np.any(frame[:30] != frames["RAS"][:30]) == (code != "RAS")


def test_edge_letters_follow_the_convention():
    assert ori.edge_letters("axial") == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    assert ori.edge_letters("axial", radiological=True)["left"] == "R"
    assert ori.edge_letters("coronal", radiological=True) == {
        "left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert ori.edge_letters("sagittal", radiological=True) == {
        "left": "A", "right": "P", "top": "S", "bottom": "I"}
    with pytest.raises(ValueError, match="unknown view"):
        ori.edge_letters("oblique")


@pytest.mark.parametrize("radiological", [False, True])
def test_anatomy_lands_on_the_edge_its_letter_names(radiological):
    """A blob on the patient's right, anterior and superior is drawn next to R, A and S."""
    data = np.zeros(SHAPE, np.float32)
    data[16:19, 18:22, 12:15] = 1  # right (high i), anterior (high j), superior (high k)
    for view in ("axial", "coronal", "sagittal"):
        index = {"axial": 13, "coronal": 20, "sagittal": 17}[view]
        cut = ori.plane(data, view, index, radiological)
        rows, cols = np.nonzero(cut)
        letters = ori.edge_letters(view, radiological)
        centre_row, centre_col = rows.mean() / cut.shape[0], cols.mean() / cut.shape[1]
        expect_vertical = "A" if view == "axial" else "S"
        assert letters["top" if centre_row < 0.5 else "bottom"] == expect_vertical, view
        expect_horizontal = "A" if view == "sagittal" else "R"
        assert letters["left" if centre_col < 0.5 else "right"] == expect_horizontal, view


def test_aspect_comes_from_voxel_spacing():
    spacing = ori.voxel_spacing(RAS_AFFINE)
    assert spacing == (1.0, 1.5, 2.0)
    assert ori.pixel_aspect(spacing, "axial") == pytest.approx(1.5)
    assert ori.pixel_aspect(spacing, "coronal") == pytest.approx(2.0)
    assert ori.pixel_aspect(spacing, "sagittal") == pytest.approx(2.0 / 1.5)
    v = V.SliceViewer((ras_volume(), RAS_AFFINE), view="coronal")
    try:
        assert v.figure.axes[0].get_aspect() == pytest.approx(2.0)
    finally:
        v.close()


def test_voxel_index_inverts_world_coordinate():
    _, affine = stored(ras_volume(), *STORAGES["ILP"])
    world = ori.world_coordinate(affine, (3, 7, 9))
    assert ori.voxel_index(affine, world) == (3, 7, 9)
    assert ori.voxel_index(affine, world + 1000, shape=(16, 20, 24)) in {
        tuple(int(x) for x in c) for c in np.ndindex(16, 20, 24)}


# --------------------------------------------------------------------------- overlays


def panel_pixels(v: V.SliceViewer) -> np.ndarray:
    """True for the frame's pixels that lie inside a visible image panel."""
    height, width = int(v.figure.bbox.height), int(v.figure.bbox.width)
    mask = np.zeros((height, width), bool)
    for ax in v.figure.axes:
        if ax.get_visible() and ax.get_images() and ax.get_label() != "<colorbar>":
            box = ax.get_window_extent()
            mask[height - int(box.y1) + 2: height - int(box.y0) - 2, int(box.x0) + 2: int(box.x1) - 2] = True
    return mask


def blob_subject(code: str, label_code: str):
    """An image that is bright only inside a blob, and a label map of that blob."""
    i, j, k = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = ((i - 13) ** 2 + (j - 7) ** 2 + (k - 10) ** 2) <= 9
    image = np.where(blob, 1000.0, 10.0).astype(np.float32)
    labels = blob.astype(np.int16) * 4
    return stored(image, *STORAGES[code]), stored(labels, *STORAGES[label_code])


@pytest.mark.parametrize(("code", "label_code"), [("LPS", "LPS"), ("SRA", "SRA"), ("LPS", "RAS"),
                                                   ("ILP", "SRA")])
def test_mask_stays_on_the_blob_after_reorientation(code, label_code):
    image, labels = blob_subject(code, label_code)
    v = V.SliceViewer(image, labels=labels, crosshair=False, window="min-max", view="three",
                      cursor=(13, 7, 10), opacity=0.0)
    try:
        np.testing.assert_array_equal(v._label_raw == 4, v._data[v.modality] == 1000.0)
        assert v.readout()["label"] == 4
        plain = v.frame().astype(int)
        v.set_opacity(1.0)
        inside = panel_pixels(v)
        coloured = (np.abs(v.frame().astype(int) - plain).sum(axis=2) > 30) & inside
        bright = (plain.sum(axis=2) > 600) & inside
        overlap = np.count_nonzero(coloured & bright) / np.count_nonzero(coloured | bright)
        assert np.count_nonzero(coloured) > 200
        assert overlap > 0.85, f"label pixels and blob pixels overlap only {overlap:.2f}"
    finally:
        v.close()


def test_heatmap_below_threshold_is_transparent():
    data = ras_volume()
    heat = np.zeros(SHAPE, np.float32)
    heat[2:6, 2:6, :] = 0.9
    v = V.SliceViewer((data, RAS_AFFINE), heatmap=(heat, RAS_AFFINE), opacity=1.0, crosshair=False)
    try:
        with_heat = v.frame()
        v.set_opacity(0.0)
        without = v.frame()
        changed = np.any(with_heat != without, axis=2)
        # only the heat square (16 of 480 voxels of the slice) and its colour bar area change
        panel = v.figure.axes[0].get_window_extent()
        inside = changed[int(v.figure.bbox.height - panel.y1):int(v.figure.bbox.height - panel.y0),
                         int(panel.x0):int(panel.x1)]
        assert 0 < inside.mean() < 0.1
    finally:
        v.close()


# --------------------------------------------------------------------------- controls


def two_modalities():
    data = ras_volume()
    return {"T1": (data, RAS_AFFINE), "FLAIR": (data[::-1].copy() * 2 + 50, RAS_AFFINE)}


def test_every_control_updates_readout_and_picture_in_one_figure():
    labels = np.zeros(SHAPE, np.int16)
    labels[8:14, 8:14, 4:12] = 1
    figures = V._Renderer.figures_created
    v = V.SliceViewer(two_modalities(), labels=(labels, RAS_AFFINE), label_names={1: "lesion"})
    try:
        assert V._Renderer.figures_created == figures + 1
        steps = [
            ("slice", lambda: v.set_slice(9)),
            ("slider from the front end", lambda: setattr(v.slice_slider, "value", 6)),
            ("view", lambda: v.set_view("coronal")),
            ("three-plane", lambda: v.set_view("three")),
            ("opacity", lambda: v.set_opacity(0.9)),
            ("modality", lambda: v.set_modality("FLAIR")),
            ("window preset", lambda: v.set_window("min-max")),
            ("window level", lambda: v.set_window(level=400.0, width=200.0)),
            ("convention", lambda: v.set_convention(True)),
        ]
        for name, step in steps:
            before_text, before_png, before_frames = v.readout_html.value, v.image_widget.value, v.frames_drawn
            step()
            assert v.frames_drawn == before_frames + 1, f"{name}: one redraw per change"
            assert v.image_widget.value != before_png, f"{name}: the picture did not change"
            if name not in {"window preset", "window level", "convention"}:
                assert v.readout_html.value != before_text, f"{name}: the readout did not change"
        assert v.readout()["modality"] == "FLAIR"
        assert v.window == (400.0, 200.0)
        assert v.preset_select.value == "custom"
        assert V._Renderer.figures_created == figures + 1, "a new figure was made by a control"
        assert len(v.figure.axes) == 5  # the single view, 3 planes, 1 colour bar: made once
    finally:
        v.close()


def test_slice_readout_and_world_coordinate():
    v = V.SliceViewer((ras_volume(), RAS_AFFINE), view="sagittal")
    try:
        v.set_slice(4)
        r = v.readout()
        assert r["slice"] == 4 and r["voxel"][0] == 4
        np.testing.assert_allclose(r["world_mm"], RAS_AFFINE[:3, :3] @ r["voxel"] + RAS_AFFINE[:3, 3])
        assert "sagittal · slice 4 / 19" in v.readout_text()
        assert "(-6.0, 0.0, 4.0) mm" in v.readout_text()
        v.set_view("coronal")
        assert v.slice_slider.max == SHAPE[1] - 1 and v.slice_slider.value == v.cursor[1]
    finally:
        v.close()


def test_window_presets_use_percentiles():
    data = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    level, width = V.window_for(data, "1-99 %")
    lo, hi = np.percentile(data, [1, 99])
    assert (level, width) == pytest.approx(((lo + hi) / 2, hi - lo))
    assert V.window_for(data, "min-max") == pytest.approx((500.5, 999.0))
    with pytest.raises(ValueError, match="unknown window preset"):
        V.window_for(data, "bone")


def test_modality_switch_recomputes_the_window():
    v = V.SliceViewer(two_modalities())
    try:
        first = v.window
        v.set_modality("FLAIR")
        assert v.window != first
        assert v.window == pytest.approx(V.window_for(v._data["FLAIR"], "1-99 %"))
    finally:
        v.close()


# --------------------------------------------------------------------------- inputs and errors


def test_accepts_paths_and_nibabel_images(tmp_path):
    data, affine = stored(ras_volume(), *STORAGES["LPS"])
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    v = V.SliceViewer({"T1": path, "again": nib.Nifti1Image(data, affine)})
    try:
        v.set_cursor_mm(world_of_mark())
        assert v.readout()["intensity"] == 1000.0
        assert v.stored_orientation == "LPS"
    finally:
        v.close()


def test_4d_image_gives_a_clear_error(tmp_path):
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), path)
    with pytest.raises(DataError, match=r"bold\.nii\.gz.*\(4, 4, 4, 3\).*3D"):
        V.SliceViewer(path)


def test_label_grid_mismatch_names_both_grids():
    data = ras_volume()
    with pytest.raises(DataError, match=r"labels.*shape \(10, 12, 8\).*does not match.*shape \(20, 24, 16\)"):
        V.SliceViewer((data, RAS_AFFINE), labels=(np.zeros((10, 12, 8)), RAS_AFFINE))
    shifted = RAS_AFFINE.copy()
    shifted[0, 3] += 5
    with pytest.raises(DataError, match="heatmap.*does not match"):
        V.SliceViewer((data, RAS_AFFINE), heatmap=(np.zeros(SHAPE), shifted))
    with pytest.raises(DataError, match="modality 'b'.*does not match"):
        V.SliceViewer({"a": (data, RAS_AFFINE), "b": (data, shifted)})


def test_bad_arguments():
    data = ras_volume()
    with pytest.raises(ValueError, match="unknown view"):
        V.SliceViewer((data, RAS_AFFINE), view="oblique")
    with pytest.raises(TypeError, match="expected a path"):
        V.SliceViewer(data)
    with pytest.raises(ValueError, match="outside the volume"):
        V.SliceViewer((data, RAS_AFFINE), cursor=(0, 0, 99))
    v = V.SliceViewer((data, RAS_AFFINE))
    try:
        with pytest.raises(ValueError, match="no modality"):
            v.set_modality("PET")
        with pytest.raises(ValueError, match="outside"):
            v.set_slice(SHAPE[2])
    finally:
        v.close()


# --------------------------------------------------------------------------- headless fallback


def test_mimebundle_carries_a_static_three_plane_png():
    v = V.SliceViewer((ras_volume(), RAS_AFFINE))
    try:
        bundle = v._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        png = Image.open(io.BytesIO(base64.b64decode(bundle["image/png"])))
        assert png.size[0] > 2 * png.size[1]  # three panels side by side
        assert v.view == "axial" and v.figure.get_size_inches()[0] < 10  # live layout restored
    finally:
        v.close()


def test_static_figure_in_executed_notebook_and_offline_html(tmp_path, artifacts_dir):
    out = artifacts_dir / "viewer" / "viewer_demo.ipynb"
    series.execute(FIXTURE, out, cell_timeout=120)
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1, "show() then echoing the viewer must display it exactly once"
    data = shown[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in data
    png = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
    assert png.size[0] >= 800 and np.asarray(png).std() > 20
    html = series.export_html(out).read_text()
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', html)) == 1
    assert "unpkg.com" not in html  # no widget JavaScript from a CDN


def test_command_line_writes_the_static_figure(tmp_path):
    data, affine = stored(ras_volume(), *STORAGES["SRA"])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image((data > 500).astype(np.int16), affine), tmp_path / "mask.nii.gz")
    out = tmp_path / "views.png"
    assert V.main([str(tmp_path / "t1.nii.gz"), "--labels", str(tmp_path / "mask.nii.gz"),
                   "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 800
    assert V.main([str(tmp_path / "missing.nii.gz")]) == 2


def test_label_colours_follow_the_label_value():
    (image, affine), (labels, _) = blob_subject("RAS", "RAS")
    v = V.SliceViewer((image, affine), labels=(labels, affine), label_colors={4: "#ff0000"},
                      opacity=1.0, crosshair=False, cursor=(13, 7, 10))
    try:
        frame = v.frame().astype(int)
        red = (frame[..., 0] > 200) & (frame[..., 1] < 40) & (frame[..., 2] < 40)
        assert np.count_nonzero(red & panel_pixels(v)) > 100
    finally:
        v.close()
    # without a choice, label 4 gets palette entry 4 whatever other labels exist
    v1 = V.SliceViewer((image, affine), labels=(labels, affine))
    labels2 = labels.copy()
    labels2[0, 0, 0] = 1
    v2 = V.SliceViewer((image, affine), labels=(labels2, affine))
    try:
        cmap1, cmap2 = v1._renderer.single.labels.cmap, v2._renderer.single.labels.cmap
        assert cmap1(0) == cmap2(1)  # label 4's colour: first of one map, second of the other
    finally:
        v1.close()
        v2.close()
