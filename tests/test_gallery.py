"""Static plane figures: reoriented, aspect from spacing, letters, overlays on the right voxels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

from helpers import gallery


def _pair(affine):
    data = np.zeros((10, 12, 6), np.float32)
    data[7, 3, 2] = 5.0  # a bright voxel on the patient's right-ish, posterior
    data[data == 0] = 1.0
    lab = (data > 2).astype(np.uint8) * 4
    return nib.Nifti1Image(data, affine), nib.Nifti1Image(lab, affine)


def test_flipped_storage_draws_the_same_picture():
    ras = np.diag([2.0, 2.0, 5.0, 1.0])
    img, lab = _pair(ras)
    # The same head stored LPS: flip the first two axes and move the origin to match.
    lps = ras @ np.array([[-1, 0, 0, 9], [0, -1, 0, 11], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    img2 = nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1], lps)
    lab2 = nib.Nifti1Image(np.asarray(lab.dataobj)[::-1, ::-1], lps)
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    fig, (a, b) = plt.subplots(1, 2)
    one = gallery.draw_plane(a, img, labels=lab, colorbar=True)
    two = gallery.draw_plane(b, img2, labels=lab2)
    np.testing.assert_array_equal(one.get_array(), two.get_array())
    picture = np.asarray(one.get_array())
    assert picture.shape == (12, 10)                        # rows A->P, columns L->R
    row, col = np.unravel_index(np.argmax(picture), picture.shape)
    assert (row, col) == (12 - 1 - 3, 7)                     # posterior is low on screen
    texts = sorted(t.get_text() for t in a.texts)
    assert texts == ["A", "L", "P", "R"]
    assert gallery.busiest_slice(np.asarray(lab.dataobj), "axial") == 2
    plt.close(fig)


def test_aspect_follows_voxel_spacing_and_legend_lists_labels():
    img, lab = _pair(np.diag([2.0, 2.0, 5.0, 1.0]))
    fig, ax = plt.subplots()
    gallery.draw_plane(ax, img, view="coronal", labels=lab)
    assert ax.get_aspect() == 2.5
    legend = gallery.label_legend(ax, {4: "infarct", 5: "MS-like"})
    assert [t.get_text() for t in legend.get_texts()] == ["4: infarct", "5: MS-like"]
    plt.close(fig)
