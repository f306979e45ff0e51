"""helpers.train: learning, determinism, checkpoints, resume, early stopping, time cap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import train
from helpers.io import DataError
from helpers.models import build_model


def blobs(n: int, size: int = 12, dims: int = 3, seed: int = 0, segment: bool = False,
          masks: bool = False) -> train.TensorData:
    """Noise images; odd-numbered samples carry a bright 3-voxel cube (the "lesion").

    ``masks``: classification data that also carries the lesion masks.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1) + (size,) * dims, generator=g)
    mask = torch.zeros((n,) + (size,) * dims, dtype=torch.long)
    for i in range(1, n, 2):
        corner = torch.randint(1, size - 4, (dims,), generator=g).tolist()
        region = tuple(slice(c, c + 3) for c in corner)
        mask[(i, *region)] = 1
    x[:, 0][mask.bool()] += 3.0
    y = mask if segment else torch.arange(n) % 2
    return train.TensorData(x, y, [f"case{i}" for i in range(n)], mask.to(torch.uint8) if masks else None)


def small_cnn(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", 1, 2, dims=3, depth=2, width=4, **kw)


def config(**kw) -> train.TrainConfig:
    base = {"epochs": 4, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "patience": None}
    return train.TrainConfig(**{**base, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ losses and metrics


def test_class_weights_balance_the_classes():
    w = train.class_weights(torch.tensor([0, 0, 0, 1, 2]), 4)
    assert torch.allclose(w[:3], torch.tensor([5 / 12, 5 / 4, 5 / 4]))
    assert w[3] == 0  # absent class
    counts = torch.tensor([3.0, 1.0, 1.0])
    assert torch.allclose((w[:3] * counts), torch.full((3,), 5 / 4))  # every class weighs the same in total


@pytest.mark.filterwarnings("ignore:y_pred contains classes")
def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    probs = rng.dirichlet(np.ones(3), 50)
    m = train.classification_metrics(probs, labels)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    binary = train.classification_metrics(probs[:, :2] / probs[:, :2].sum(1, keepdims=True), labels % 2)
    assert binary["auc"] == pytest.approx(roc_auc_score(labels % 2, probs[:, 1] / probs[:, :2].sum(1)))
    assert np.isnan(train.classification_metrics(probs, np.zeros(50, int))["auc"])


def test_dice_and_soft_dice():
    truth = torch.zeros(3, 4, 4, dtype=torch.long)
    truth[0, :2] = 1  # 8 voxels
    pred = torch.zeros_like(truth)
    pred[0, :1] = 1  # 4 of them
    pred[1, 0, 0] = 1  # a false positive on an empty case
    scores = train.dice_score(pred, truth)
    assert scores[0] == pytest.approx(2 * 4 / 12) and scores[1] == 0 and torch.isnan(scores[2])
    m = train.segmentation_metrics(pred, truth)
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["empty_cases_clean"] == pytest.approx(0.5)
    perfect = torch.nn.functional.one_hot(truth, 2).movedim(-1, 1).float() * 40 - 20
    assert train.soft_dice_loss(perfect, truth) < 0.01
    assert train.soft_dice_loss(-perfect, truth) > 0.9


def test_learning_rate_warms_up_then_follows_a_cosine():
    def f(step):
        return train.lr_factor(step, warmup_steps=4, total_steps=20)

    values = [f(s) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))
    assert f(12) == pytest.approx(0.5)  # half-way through the decay
    assert values[-1] < 0.02


def test_under_a_time_cap_the_cosine_follows_the_clock():
    # 100 planned epochs but a 180 s cap: half the time gone means half-way down the cosine
    assert train.lr_factor(50, 10, 10_000, seconds=90, max_seconds=180) == pytest.approx(0.5)
    assert train.lr_factor(50, 10, 10_000, seconds=180, max_seconds=180) == pytest.approx(0.0)
    # whichever runs out first: the steps, when they are nearly done before the clock
    assert train.lr_factor(9_999, 10, 10_000, seconds=1, max_seconds=180) < 1e-6
    # warm-up is by steps, whatever the clock says
    assert train.lr_factor(4, 10, 10_000, seconds=170, max_seconds=180) == pytest.approx(0.5)
    assert train.lr_factor(50, 10, 10_000) == train.lr_factor(50, 10, 10_000, seconds=90)


def test_a_time_capped_run_ends_with_the_learning_rate_near_zero(monkeypatch):
    clock = iter(range(10**6))  # a fake clock: every reading is 0.1 s after the last, whatever the load
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock) * 0.1)
    data = blobs(32, seed=1)
    result = train.fit(small_cnn(), data, data, config(epochs=100_000, batch_size=4, max_train_seconds=20.0),
                       progress=False, live_plot=False)
    assert result.stopped == "time_limit"
    assert len(result.history) > 3
    assert result.history[0]["lr"] > 0.5 * 3e-3  # after the warm-up epoch: at the peak
    assert [h["lr"] for h in result.history] == sorted(h["lr"] for h in result.history)[::-1]
    assert result.history[-1]["lr"] < 0.05 * 3e-3


# ------------------------------------------------------------------ training


def test_a_cnn_learns_to_find_a_planted_blob(tmp_path):
    data, val = blobs(48, seed=1), blobs(32, seed=2)
    result = train.fit(small_cnn(), data, val, config(epochs=6), tmp_path / "run", test=blobs(32, seed=3),
                       progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.metrics["test"]["auc"] > 0.9
    assert result.stopped == "epochs"


def test_a_unet_learns_to_segment_a_planted_blob():
    data, val = blobs(32, size=16, seed=1, segment=True), blobs(16, size=16, seed=2, segment=True)
    torch.manual_seed(0)
    model = build_model("unet", 1, 2, dims=3, depth=2, width=8)
    result = train.fit(model, data, val, config(task="segment", epochs=10, batch_size=4, lr=1e-2),
                       progress=False)
    assert result.monitor == "dice"
    assert result.metrics["validation"]["dice"] > 0.5


def test_training_on_the_cpu_repeats_exactly_for_a_seed():
    data, val = blobs(24, seed=1), blobs(8, seed=2)
    a = train.fit(small_cnn(), data, val, config(epochs=2), progress=False)
    b = train.fit(small_cnn(), data, val, config(epochs=2), progress=False)
    c = train.fit(small_cnn(), data, val, config(epochs=2, seed=7), progress=False)
    assert same_weights(weights(a.model), weights(b.model))
    assert not same_weights(weights(a.model), weights(c.model))


def test_resume_after_interruption_continues_exactly(tmp_path):
    data, val = blobs(24, seed=1), blobs(8, seed=2)
    cfg = config(epochs=4, monitor="loss")
    straight = train.fit(small_cnn(), data, val, cfg, tmp_path / "straight", progress=False)

    class Interrupted(Exception):
        pass

    def stop_after_two(epoch, history):
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train.fit(small_cnn(), data, val, cfg, tmp_path / "resumed", progress=False, on_epoch_end=stop_after_two)
    partial = train.load_checkpoint(tmp_path / "resumed")
    assert partial["epoch"] == 2 and not partial["finished"]
    # a fresh model object with other weights: everything must come from the checkpoint
    resumed = train.fit(small_cnn(seed=99), data, val, cfg, tmp_path / "resumed", progress=False)
    assert same_weights(weights(straight.model), weights(resumed.model))
    drop = ("seconds", "samples_per_second")
    assert [{k: v for k, v in h.items() if k not in drop} for h in straight.history] == \
           [{k: v for k, v in h.items() if k not in drop} for h in resumed.history]
    s_last = train.load_checkpoint(tmp_path / "straight")
    r_last = train.load_checkpoint(tmp_path / "resumed")
    assert s_last["best_epoch"] == r_last["best_epoch"]


def test_run_folder_holds_checkpoint_history_config_and_metrics(tmp_path):
    data, val, test = blobs(16, seed=1), blobs(8, seed=2), blobs(8, seed=3)
    run = tmp_path / "runs" / "cls"
    result = train.fit(small_cnn(), data, val, config(epochs=2), run, test=test, classes=["healthy", "lesion"],
                       preprocess={"target_shape": [12, 12, 12], "steps": ["zscore"]}, progress=False)
    for name in ("checkpoint.pt", "history.csv", "config.json", "metrics.json", "curves.png"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*tmp*")), "temporary files left behind"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["validation"]) >= {"auc", "accuracy", "loss"} and "auc" in metrics["test"]
    assert (run / "history.csv").read_text().count("\n") == 3  # header + 2 epochs
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # loads safely
    assert ckpt["classes"] == ["healthy", "lesion"] and ckpt["preprocess"]["steps"] == ["zscore"]
    assert ckpt["finished"] and ckpt["resume"] is None
    model, info = train.load_run(run, device=torch.device("cpu"))
    probs_a = train.predict(model, test.x)
    probs_b = train.predict(result.model, test.x)
    assert torch.allclose(probs_a, probs_b, atol=1e-6)
    assert info["best_epoch"] == result.best_epoch


def test_a_finished_run_is_reused_and_other_settings_retrain(tmp_path, capsys):
    data, val = blobs(16, seed=1), blobs(8, seed=2)
    train.fit(small_cnn(), data, val, config(epochs=1), tmp_path / "r", progress=False)
    again = train.fit(small_cnn(seed=5), data, val, config(epochs=1), tmp_path / "r", progress=False)
    assert again.stopped == "already_finished"
    other = train.fit(small_cnn(), data, val, config(epochs=2), tmp_path / "r", progress=False)
    assert other.stopped == "epochs" and len(other.history) == 2
    assert "other settings" in capsys.readouterr().out


def test_broken_checkpoints_raise_data_error_naming_the_file(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="checkpoint.pt"):
        train.load_checkpoint(bad)
    with pytest.raises(DataError, match="not found"):
        train.load_checkpoint(tmp_path / "missing")


def test_unsafe_pickles_are_refused(tmp_path):
    import argparse

    path = tmp_path / "checkpoint.pt"  # any Python object other than plain data is refused
    torch.save({"model": {}, "model_config": {}, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(DataError, match="not a readable checkpoint"):
        train.load_checkpoint(path)


def test_early_stopping_stops_when_the_metric_stalls():
    data, val = blobs(16, seed=1), blobs(8, seed=2)
    result = train.fit(small_cnn(), data, val, config(epochs=10, lr=0.0, patience=2), progress=False)
    assert result.stopped == "early_stopping"
    assert len(result.history) == 3 and result.best_epoch == 1


def test_the_time_cap_stops_training():
    data, val = blobs(32, seed=1), blobs(8, seed=2)
    result = train.fit(small_cnn(), data, val, config(epochs=50, batch_size=4, max_train_seconds=0.0),
                       progress=False)
    assert result.stopped == "time_limit"
    assert len(result.history) == 1 and result.history[0]["samples_per_second"] > 0


def test_augmentation_runs_on_the_data_device_every_step():
    data, val = blobs(16, seed=1), blobs(8, seed=2)
    seen = []

    def flip(x, y):
        seen.append((x.device, x.shape[0]))
        return torch.flip(x, dims=[2]), y

    train.fit(small_cnn(), data, val, config(epochs=2, batch_size=8), augment=flip, progress=False)
    assert len(seen) == 4  # 2 epochs x 2 steps
    assert all(d == data.x.device and n == 8 for d, n in seen)


def test_classification_on_2d_images_and_multiclass():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 1, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    data = train.TensorData(x, y)
    torch.manual_seed(0)
    model = build_model("cnn", 1, 3, dims=2, depth=2, width=4)
    result = train.fit(model, data.subset(range(40)), data.subset(range(40, 60)), config(epochs=5),
                       progress=False)
    assert result.monitor == "balanced_accuracy"
    assert result.metrics["validation"]["balanced_accuracy"] > 0.6


def test_tensor_data_checks_lengths():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        train.TensorData(torch.zeros(3, 1, 4, 4), torch.zeros(2))


def test_profile_settings():
    from helpers.runtime import get_profile

    smoke = get_profile("smoke")
    cfg = train.TrainConfig.from_profile(smoke, task="classify", dims=3, lr=5e-4)
    assert (cfg.epochs, cfg.batch_size, cfg.max_train_seconds, cfg.lr) == (smoke.epochs, smoke.batch_size,
                                                                          smoke.max_train_seconds, 5e-4)
    with pytest.raises(ValueError, match="task"):
        train.TrainConfig(task="detect")


@pytest.mark.parametrize("name", ["cnn_gru", "mlp"])
def test_every_3d_model_trains_through_the_engine(name):
    # cnn_gru mixes 2D weights with 3D inputs: channels-last must be set per weight
    data, val = blobs(8, seed=1), blobs(4, seed=2)
    torch.manual_seed(0)
    model = build_model(name, 1, 2, dims=3, depth=2, width=4)
    result = train.fit(model, data, val, config(epochs=1, batch_size=4), progress=False)
    assert len(result.history) == 1
    losses = train.overfit_one_batch(build_model(name, 1, 2, dims=3, depth=2, width=4), data.x[:4], data.y[:4],
                                     steps=3, device=torch.device("cpu"))
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_settings_from_a_profile_use_the_measured_learning_rate():
    from helpers.runtime import get_profile

    p = get_profile("workshop")
    seg = train.TrainConfig.from_profile(p, task="segment", dims=3)
    assert seg.lr == 3e-3 and seg.patch_size == p.patch_size and seg.batch_size == p.batch_size
    whole = train.TrainConfig.from_profile(p, task="segment", dims=3, patch_size=0)
    assert whole.patch_size is None and whole.batch_size == max(2, p.batch_size // 2)
    finder = train.TrainConfig.from_profile(p, task="classify", dims=3, model="unet_classifier")
    assert finder.patch_size == p.patch_size
    assert train.TrainConfig.from_profile(p, task="classify", dims=3, model="cnn").patch_size is None
    assert train.TrainConfig.from_profile(p, task="segment", dims=2).patch_size is None
    assert train.TrainConfig.from_profile(p, task="segment", dims=3, lr=1e-4).lr == 1e-4
    assert train.TrainConfig.from_profile(p, task="classify", dims=3).lr == 3e-3


def test_the_lesion_map_classifier_learns_from_labels_and_masks(tmp_path):
    data, val = blobs(48, size=16, seed=1, masks=True), blobs(32, size=16, seed=2, masks=True)
    torch.manual_seed(0)
    model = build_model("unet_classifier", 1, 2, dims=3, depth=2, width=8)
    result = train.fit(model, data, val, config(epochs=8, batch_size=8), tmp_path / "run",
                       test=blobs(32, size=16, seed=3), progress=False, live_plot=False)
    assert result.metrics["test"]["auc"] > 0.95  # the test split needs no masks: it is a classifier
    # its lesion map points at the blobs: the hottest voxel is on the blob or touching it
    test = blobs(32, size=16, seed=3, masks=True)
    heat = result.model.lesion_map(test.x[1::2]).detach()
    peaks = heat.flatten(1).argmax(1)
    near = torch.nn.functional.max_pool3d(test.masks[1::2, None].float(), 3, stride=1, padding=1)
    assert near.flatten(1).gather(1, peaks[:, None]).mean() > 0.9
    reloaded, _ = train.load_run(tmp_path / "run")
    assert torch.allclose(train.predict(reloaded, test.x), train.predict(result.model, test.x), atol=1e-5)


def test_the_lesion_map_classifier_refuses_data_without_masks():
    model = build_model("unet_classifier", 1, 2, dims=3, depth=2, width=4)
    with pytest.raises(ValueError, match="lesion masks"):
        train.fit(model, blobs(8), blobs(8), config(epochs=1), progress=False, live_plot=False)


def test_masks_must_fit_the_images():
    data = blobs(4, masks=True)
    with pytest.raises(ValueError, match="masks of shape"):
        train.TensorData(data.x, data.y, masks=data.masks[:, :5])
    assert data.subset([1, 3]).masks.shape[0] == 2


def test_patch_training_trains_a_unet_that_then_segments_whole_volumes():
    data, val = blobs(32, size=16, seed=1, segment=True), blobs(16, size=16, seed=2, segment=True)
    torch.manual_seed(0)
    model = build_model("unet", 1, 2, dims=3, depth=2, width=8)
    result = train.fit(model, data, val, config(task="segment", epochs=12, batch_size=8, lr=1e-2, patch_size=8),
                       progress=False, live_plot=False)
    assert result.metrics["validation"]["dice"] > 0.5  # scored on whole 16^3 volumes
    with pytest.raises(ValueError, match="label per voxel"):
        train.fit(small_cnn(), blobs(8), blobs(8), config(epochs=1, patch_size=8), progress=False, live_plot=False)


def test_the_best_epoch_breaks_ties_on_the_validation_loss():
    best = {"score": 1.0, "loss": 0.30}
    assert not train._improved(1.0, 0.40, best, "auc")  # same AUC, worse loss
    assert train._improved(1.0, 0.20, best, "auc")  # same AUC, better loss: keep this one
    assert train._improved(0.99, 0.90, {"score": 0.98, "loss": 0.1}, "auc")  # the score comes first
    assert not train._improved(0.97, 0.01, {"score": 0.98, "loss": 0.1}, "auc")
    assert train._improved(0.2, math.nan, {"score": 0.3, "loss": math.nan}, "loss")  # loss monitored: lower wins
    assert not train._improved(math.nan, 0.1, best, "auc")
