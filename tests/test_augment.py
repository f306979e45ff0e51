"""helpers.augment: spatial transforms keep image and mask aligned, masks stay labels,
seeded draws repeat, and the same code runs on any device."""

from __future__ import annotations

import pytest
import torch

from helpers.augment import AugmentConfig, augment, intensity, random_patches
from helpers.skullstrip import dice

SPATIAL_ONLY = AugmentConfig(flip_p=0.5, affine_p=1.0, elastic_p=1.0, rotate_deg=15, bias_p=0,
                             noise_p=0, gamma_p=0, contrast_p=0)


def batch(b=3, size=24, nd=3):
    g = torch.Generator().manual_seed(0)
    coords = torch.stack(torch.meshgrid(*[torch.arange(size) for _ in range(nd)], indexing="ij")).float()
    masks = []
    for _ in range(b):
        centre = 6 + torch.rand(nd, generator=g) * (size - 12)
        r = ((coords - centre.view(-1, *[1] * nd)) ** 2).sum(0).sqrt()
        masks.append((r < 5).long() + (r < 2).long())
    mask = torch.stack(masks)[:, None]
    image = mask.float() + 0.01 * torch.randn(mask.shape, generator=g)
    return image, mask


def test_no_augmentation_changes_nothing():
    image, mask = batch()
    xa, ma = augment(image, mask, AugmentConfig.none(), torch.Generator().manual_seed(1))
    assert torch.equal(xa, image) and torch.equal(ma, mask)


@pytest.mark.parametrize("nd", [2, 3])
def test_spatial_transforms_keep_image_and_mask_aligned(nd):
    image, mask = batch(nd=nd)
    xa, ma = augment(image, mask, SPATIAL_ONLY, torch.Generator().manual_seed(3))
    assert ma.dtype == mask.dtype and set(ma.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(ma, mask)
    for i in range(image.shape[0]):
        assert dice((xa[i, 0] > 0.5).numpy(), (ma[i, 0] > 0).numpy()) > 0.9
        assert dice((xa[i, 0] > 1.5).numpy(), (ma[i, 0] > 1).numpy()) > 0.6


def test_flip_is_an_exact_flip():
    image, mask = batch()
    cfg = AugmentConfig.none()
    cfg.flip_p, cfg.flip_axes = 1.0, (0,)
    xa, ma = augment(image, mask, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(xa, torch.flip(image, [2]), atol=1e-5, rtol=0)
    assert torch.equal(ma, torch.flip(mask, [2]))


def test_seeded_draws_repeat_and_differ_between_seeds():
    image, mask = batch()
    a = augment(image, mask, AugmentConfig(), torch.Generator().manual_seed(7))
    b = augment(image, mask, AugmentConfig(), torch.Generator().manual_seed(7))
    c = augment(image, mask, AugmentConfig(), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_intensity_transforms_change_the_image_only_within_reason():
    image, mask = batch()
    cfg = AugmentConfig(bias_p=1, noise_p=1, gamma_p=1, contrast_p=1)
    out = intensity(image, cfg, torch.Generator().manual_seed(0))
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, image)
    corr = torch.corrcoef(torch.stack([out.flatten(), image.flatten()]))[0, 1]
    assert corr > 0.8  # still the same picture
    _, ma = augment(image, mask, AugmentConfig(flip_p=0, affine_p=0, elastic_p=0, bias_p=1, noise_p=1),
                    torch.Generator().manual_seed(0))
    assert torch.equal(ma, mask)


def test_mask_without_channel_axis_and_bad_shapes():
    image, mask = batch()
    xa, ma = augment(image, mask[:, 0], SPATIAL_ONLY, torch.Generator().manual_seed(0))
    assert ma.shape == mask[:, 0].shape
    with pytest.raises(ValueError, match="augment expects"):
        augment(image[0, 0], None)


def test_config_round_trip():
    cfg = AugmentConfig(rotate_deg=5, gamma_range=(0.8, 1.2))
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_code_on_a_gpu_gives_the_same_result():
    from helpers.runtime import get_device

    device = get_device(verbose=False)
    image, mask = batch()
    cpu = augment(image, mask, AugmentConfig(noise_p=0), torch.Generator().manual_seed(5))
    gpu = augment(image.to(device), mask.to(device), AugmentConfig(noise_p=0), torch.Generator().manual_seed(5))
    assert gpu[0].device.type == device.type
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-3, rtol=1e-3)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 0.001


def test_random_patches_cut_image_and_mask_alike_and_find_lesions():
    torch.manual_seed(0)
    image = torch.randn(6, 2, 20, 24, 16)
    mask = torch.zeros(6, 20, 24, 16, dtype=torch.long)
    mask[:3, 15:17, 2:4, 12:14] = 1  # a small lesion far from the centre, in half the cases
    image[:, 0] = mask.float() * 10  # channel 0 shows the mask, so the crops can be compared
    found = 0
    for _ in range(20):
        xp, mp = random_patches(image, mask, 8, foreground_p=1.0)
        assert xp.shape == (6, 2, 8, 8, 8) and mp.shape == (6, 8, 8, 8)
        assert torch.equal(xp[:, 0], mp.float() * 10)  # image and mask cut at the same place
        found += int(mp[:3].flatten(1).any(1).sum())
    assert found == 60  # always centred on the lesion when there is one
    xp, mp = random_patches(image, mask, (32, 8, 4), foreground_p=0.0)
    assert xp.shape == (6, 2, 20, 8, 4)  # an axis smaller than the patch is kept whole
    torch.manual_seed(1)
    a = random_patches(image, mask, 8)
    torch.manual_seed(1)
    assert torch.equal(a[0], random_patches(image, mask, 8)[0])  # seeded: repeatable
