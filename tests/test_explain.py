"""helpers.explain on a planted-lesion toy task: small conv nets trained for a few seconds on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import explain as E
from helpers.models import build_model

# --------------------------------------------------------------------------- toy task


def plant(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return dist2 <= radius**2


def toy_cases(n: int, size: int, dims: int, seed: int, radius: float = 2.5,
              lesion_all: bool = False):
    """Noisy images; half (or all) hold one bright ball at a random place. Returns x, y, masks."""
    rng = np.random.default_rng(seed)
    shape = (size,) * dims
    x = rng.normal(0, 0.5, size=(n, 1) + shape).astype(np.float32)
    y = np.ones(n, int) if lesion_all else (np.arange(n) % 2)
    masks = np.zeros((n,) + shape, bool)
    for i in np.flatnonzero(y):
        centre = tuple(rng.integers(4, size - 4, dims))
        masks[i] = plant(shape, centre, radius)
        x[i, 0][masks[i]] += 2.0
    return torch.from_numpy(x), torch.from_numpy(y), masks


class TinyCNN(nn.Module):
    """Two conv stages and a global max-pool head (the head the series uses)."""

    def __init__(self, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        self.dims = dims
        self.features = nn.Sequential(conv(1, 8, 3, padding=1), nn.ReLU(), pool(2),
                                      conv(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(2).amax(dim=2))


def train_toy(dims: int, size: int, steps: int, seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    x, y, _ = toy_cases(256, size, dims, seed)
    model = TinyCNN(dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model2d() -> TinyCNN:
    return train_toy(dims=2, size=24, steps=80)


@pytest.fixture(scope="module")
def model3d() -> TinyCNN:
    return train_toy(dims=3, size=16, steps=40)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("dims", [2, 3])
def test_toy_models_learn_the_task(dims, model2d, model3d):
    model = model2d if dims == 2 else model3d
    x, y, _ = toy_cases(64, 24 if dims == 2 else 16, dims, seed=99)
    assert accuracy(model, x, y) >= 0.9  # otherwise the tests below would prove nothing


@pytest.mark.parametrize("dims", [2, 3])
def test_grad_cam_has_the_input_shape_and_is_non_negative(dims, model2d, model3d):
    model = model2d if dims == 2 else model3d
    size = 24 if dims == 2 else 16
    x, _, _ = toy_cases(3, size, dims, seed=1)
    heat = E.grad_cam(model, x, class_index=1)
    assert heat.shape == (3,) + (size,) * dims
    assert heat.dtype == np.float32 and (heat >= 0).all()
    one = E.grad_cam(model, x[0], class_index=1)  # a single image without batch axis
    np.testing.assert_allclose(one[0], heat[0], rtol=1e-4, atol=1e-6)
    norm = E.grad_cam(model, x, class_index=1, normalize=True)
    assert norm.max() == pytest.approx(1.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_grad_cam_follows_the_planted_lesion(dims, model2d, model3d):
    """The same noise with the lesion in two places: the hottest spot moves with it."""
    model = model2d if dims == 2 else model3d
    size = 24 if dims == 2 else 16
    rng = np.random.default_rng(5)
    found = 0
    trials = 8
    for _ in range(trials):
        noise = rng.normal(0, 0.5, (1,) + (size,) * dims).astype(np.float32)
        places = [tuple([4] * dims), tuple([size - 5] * dims)]
        for centre in places:
            mask = plant((size,) * dims, centre, 2.5)
            img = noise.copy()
            img[0][mask] += 2.0
            heat = E.grad_cam(model, torch.from_numpy(img), class_index=1)[0]
            found += E.peak_in_mask(heat, mask, tolerance=2)
    assert found >= 0.8 * 2 * trials, found


def test_heat_falls_in_the_lesion_and_beats_a_randomised_model(model2d):
    x, _, masks = toy_cases(16, 24, 2, seed=7, lesion_all=True)
    check = E.sanity_check(model2d, x, masks, method="grad_cam", seed=0)
    assert check["trained"].shape == (16,)
    assert check["trained_mean"] > 3 * check["chance_mean"]
    assert check["trained_mean"] > check["random_mean"] + 0.1
    assert -1 <= check["rank_correlation"] <= 1


def test_occlusion_drops_the_probability_where_the_lesion_is(model2d):
    x, _, masks = toy_cases(4, 24, 2, seed=3, lesion_all=True)
    heat = E.occlusion(model2d, x, class_index=1, patch=6, stride=3, baseline=0.0)
    assert heat.shape == (4, 24, 24)
    for h, m in zip(heat, masks, strict=True):
        assert h[m].mean() > h[~m].mean() + 0.05
        assert E.peak_in_mask(h, m, tolerance=3)
    check = E.sanity_check(model2d, x, masks, method="occlusion", patch=6, stride=3)
    assert check["trained_mean"] > check["chance_mean"]


def test_occlusion_covers_every_voxel_even_when_stride_does_not_divide():
    net = TinyCNN(2).eval()
    heat = E.occlusion(net, torch.randn(1, 1, 13, 11), class_index=0, patch=5, stride=4)
    assert heat.shape == (1, 13, 11) and np.isfinite(heat).all()


# --------------------------------------------------------------------------- the series' models


def test_grad_cam_on_the_series_models_cnn_and_cnn_gru():
    torch.manual_seed(0)
    cnn = build_model("cnn", 2, 2, dims=3, depth=2, width=4).eval()
    assert E.find_layer(cnn) is cnn.features[-1][0]  # the last conv block, after its ReLU
    assert E.grad_cam(cnn, torch.randn(2, 2, 16, 16, 16)).shape == (2, 16, 16, 16)
    gru = build_model("cnn_gru", 1, 2, dims=3, depth=2, width=4).eval()
    heat = E.grad_cam(gru, torch.randn(2, 1, 16, 12, 8), class_index=1)
    assert heat.shape == (2, 16, 12, 8)  # per-slice maps stacked back along Z
    cnn2d = build_model("cnn", 1, 3, dims=2, depth=2, width=4).eval()
    assert E.grad_cam(cnn2d, torch.randn(1, 1, 20, 20), class_index=2).shape == (1, 20, 20)


def test_find_layer_by_name_and_errors():
    net = TinyCNN(2)
    assert E.find_layer(net, "features.3") is net.features[3]
    with pytest.raises(ValueError, match="no layer"):
        E.find_layer(net, "nope")
    with pytest.raises(ValueError, match="no convolution"):
        E.find_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_randomized_copy_changes_weights_not_the_original():
    net = TinyCNN(2)
    before = [p.detach().clone() for p in net.parameters()]
    rnd = E.randomized_copy(net, seed=1)
    for b, p, r in zip(before, net.parameters(), rnd.parameters(), strict=True):
        assert torch.equal(b, p)
        assert r.shape == p.shape
    assert not torch.equal(next(net.parameters()), next(rnd.parameters()))
    again = E.randomized_copy(net, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(rnd.parameters(), again.parameters(), strict=True))


def test_heat_in_mask_and_chance_level():
    heat = np.ones((10, 10))
    mask = np.zeros((10, 10), bool)
    mask[:2] = True
    assert E.heat_in_mask(heat, mask) == pytest.approx(0.2) == E.mask_share(mask)
    assert np.isnan(E.heat_in_mask(np.zeros((10, 10)), mask))
    with pytest.raises(ValueError, match="shape"):
        E.heat_in_mask(heat, mask[:5])


# --------------------------------------------------------------------------- command line


def test_command_line_writes_heat_map_scan_and_figure(tmp_path, monkeypatch, capsys):
    import nibabel as nib
    from datafixtures import make_bids

    from helpers import evaluate
    from helpers.runtime import get_profile

    monkeypatch.setenv("BRAINMRI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BRAINMRI_RUNS", str(tmp_path / "runs"))
    root = make_bids(tmp_path / "bids", n_subjects=12)
    profile = get_profile("smoke", volume_size=12, epochs=1, max_train_seconds=20)
    run = evaluate.ensure_run(root, profile, "cnn", depth=2, width=4, verbose=False)
    out = tmp_path / "explained"
    for method in ("grad_cam", "occlusion"):
        assert E.main(["--run", str(run), "--subject", "sub-001", "--method", method,
                       "--class-index", "1", "--out", str(out)]) == 0
        heat = nib.load(out / f"sub-001_{method}.nii.gz")
        scan = nib.load(out / "sub-001_preprocessed.nii.gz")
        assert heat.shape == scan.shape[:3] == (12, 12, 12)
        np.testing.assert_allclose(heat.affine, scan.affine)
        assert (out / f"sub-001_{method}.png").stat().st_size > 0
    assert E.main(["--run", str(run), "--subject", "sub-999"]) == 1
    assert "no subject" in capsys.readouterr().err


def test_occlusion_mean_baseline_is_per_channel():
    """Hiding a patch of a constant image with each channel's own mean changes nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    x = torch.stack([torch.full((10, 10), 5.0), torch.full((10, 10), -3.0)])[None]
    assert np.abs(E.occlusion(net, x, class_index=1, patch=4, baseline="mean")).max() < 1e-6
    assert np.abs(E.occlusion(net, x, class_index=1, patch=4, baseline=0.0)).max() > 1e-4


def test_a_lesion_map_classifier_explains_itself_and_passes_the_randomisation_check():
    from helpers import train
    from helpers.models import build_model

    x, y, masks = toy_cases(48, 24, 2, seed=11)
    data = train.TensorData(x, y, masks=torch.from_numpy(masks.astype(np.uint8)))
    torch.manual_seed(0)
    model = build_model("unet_classifier", 1, 2, dims=2, depth=2, width=8)
    config = train.TrainConfig(epochs=8, batch_size=8, lr=3e-3, patience=None)
    model = train.fit(model, data, data, config, progress=False, live_plot=False).model
    xt, _, mt = toy_cases(8, 24, 2, seed=12, lesion_all=True)
    heat = E.lesion_map(model, xt)
    assert heat.shape == (8, 24, 24) and 0 <= heat.min() and heat.max() <= 1
    assert np.allclose(E.lesion_map(model, xt[0]), heat[:1], atol=1e-6)  # one image without a batch axis
    assert all(E.peak_in_mask(h, m) for h, m in zip(heat, mt, strict=True))  # the hottest pixel is on the lesion
    check = E.sanity_check(model, xt, mt, method="lesion_map", seed=0)
    assert check["trained_mean"] > 2 * check["chance_mean"]  # measured 0.10 against 0.036 after 8 epochs
    assert check["trained_mean"] > check["random_mean"] + 0.04
    with pytest.raises(ValueError, match="no lesion map"):
        E.lesion_map(TinyCNN(2), xt)
