"""helpers.runtime: profiles, device choice, seeds and CPU speed settings."""

from __future__ import annotations

import pytest
import torch

from helpers import runtime


def test_profiles_grow_from_smoke_to_full():
    smoke, workshop, full = (runtime.PROFILES[n] for n in ("smoke", "workshop", "full"))
    for field in ("n_subjects", "volume_size", "slice_size", "epochs"):
        assert getattr(smoke, field) < getattr(workshop, field) <= getattr(full, field), field


def test_overrides_apply_and_none_means_keep():
    p = runtime.get_profile("smoke", epochs=7, n_subjects=None)
    assert p.epochs == 7
    assert p.n_subjects == runtime.PROFILES["smoke"].n_subjects
    assert runtime.get_profile(p, batch_size=1).batch_size == 1


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="smoke, workshop, full"):
        runtime.get_profile("huge")
    with pytest.raises(ValueError, match="epochs"):
        runtime.get_profile("smoke", epoch=3)


def test_auto_profile_follows_cuda(monkeypatch):
    monkeypatch.setattr(runtime, "_cuda_available", lambda: False)
    assert runtime.get_profile("auto").name == "workshop"
    monkeypatch.setattr(runtime, "_cuda_available", lambda: True)
    assert runtime.get_profile("auto").name == "full"


def test_get_device_explains_its_choice(capsys, monkeypatch):
    monkeypatch.delenv(runtime.DEVICE_ENV_VAR, raising=False)
    device = runtime.get_device()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if runtime._mps_available() else "cpu")
    assert device.type == expected
    assert "Device:" in capsys.readouterr().out


def test_get_device_can_be_forced(monkeypatch, capsys):
    monkeypatch.setenv(runtime.DEVICE_ENV_VAR, "cpu")
    assert runtime.get_device().type == "cpu"
    assert "forced" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU exists")
def test_forcing_a_missing_gpu_fails_clearly(monkeypatch):
    monkeypatch.setenv(runtime.DEVICE_ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="sees none"):
        runtime.get_device()


def test_set_seed_repeats_python_numpy_and_torch():
    import random

    import numpy as np

    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()  # noqa: NPY002

    runtime.set_seed(123)
    first = draw()
    runtime.set_seed(123)
    assert draw() == first
    runtime.set_seed(124)
    assert draw() != first


def test_speed_settings_on_cpu_follow_bf16_support():
    settings = runtime.speed_settings("cpu")
    if runtime.cpu_supports_bf16():
        assert settings.amp_dtype == torch.bfloat16 and settings.channels_last
    else:
        assert settings.amp_dtype is None
    assert runtime.speed_settings("cpu", mixed_precision=False).amp_dtype is None
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(2, 1, 6, 6, 6).to(memory_format=settings.memory_format(3))
    with settings.autocast():
        y = conv(x)
    assert y.shape == (2, 2, 4, 4, 4)
    assert y.dtype == (settings.amp_dtype or torch.float32)
