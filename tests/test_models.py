"""helpers.models: shapes, depth/width knobs, the summary table, export by tracing."""

from __future__ import annotations

import pytest
import torch

from helpers import models

CASES = [
    ("mlp", 2, (2, 3, 32, 32)),
    ("mlp", 3, (2, 1, 16, 16, 16)),
    ("cnn", 2, (2, 3, 32, 32)),
    ("cnn", 3, (2, 2, 32, 32, 32)),
    ("cnn_gru", 3, (2, 1, 16, 16, 12)),
    ("unet", 2, (2, 1, 32, 32)),
    ("unet", 3, (2, 3, 16, 16, 16)),
]


@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=[f"{c[0]}{c[1]}d" for c in CASES])
def test_output_shapes(name, dims, shape):
    model = models.build_model(name, shape[1], 3, dims=dims, depth=2, width=4)
    out = model(torch.randn(shape))
    expected = (shape[0], 3, *shape[2:]) if name == "unet" else (shape[0], 3)
    assert tuple(out.shape) == expected
    assert model.dims == dims


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_depth_and_width_are_one_parameter_each(name):
    def n(depth, width):
        return models.count_parameters(models.build_model(name, 1, 2, dims=3, depth=depth, width=width))

    assert n(2, 8) < n(3, 8), "deeper must add parameters"
    assert n(2, 8) < n(2, 16), "wider must add parameters"


def test_config_rebuilds_the_same_architecture():
    model = models.build_model("cnn", 2, 4, dims=3, depth=3, width=6, head="avg")
    again = models.build_model(**model.config)
    again.load_state_dict(model.state_dict())  # same keys and shapes
    assert again.config == model.config
    x = torch.randn(2, 2, 16, 16, 16)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


def test_cnn_has_the_documented_size():
    # 4 stages 16-32-64-128 of 3x3x3 convolutions: 432 + 13824 + 55296 + 221184 conv weights
    model = models.build_model("cnn", 1, 2, dims=3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert sum(c.weight.numel() for c in convs) == 432 + 13824 + 55296 + 221184


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="mlp, cnn, cnn_gru, unet, unet_classifier"):
        models.build_model("resnet", 1, 2)
    with pytest.raises(ValueError, match="dims"):
        models.build_model("cnn", 1, 2, dims=4)
    with pytest.raises(ValueError, match="dims=3"):
        models.build_model("cnn_gru", 1, 2, dims=2)
    with pytest.raises(ValueError, match="depth"):
        models.build_model("unet", 1, 2, depth=0)


def test_default_models_follow_task_and_data():
    assert models.default_model_name("segment", 3) == "unet"
    assert models.default_model_name("classify", 2) == "cnn"
    with pytest.raises(ValueError, match="task"):
        models.default_model_name("regress", 3)


def test_summary_receptive_field_and_parameters():
    model = models.build_model("cnn", 1, 2, dims=2, depth=2, width=4)
    table = models.summarize(model, (1, 1, 32, 32))
    # conv3 -> 3, pool2 -> 4, conv3 at stride 2 -> 8, pool2 -> 10, then global pooling
    convs_pools = table[table["type"].isin(["Conv2d", "MaxPool2d"])]
    assert convs_pools["receptive field"].tolist() == ["3", "4", "8", "10"]
    assert table["receptive field"].iloc[-1] == "whole input"
    assert table["parameters"].sum() == models.count_parameters(model)
    assert table.attrs["total_parameters"] == models.count_parameters(model)
    assert table["output shape"].iloc[-1] == (1, 2)
    assert models.receptive_field(model, (1, 1, 32, 32)) == 10


def test_max_pool_head_sees_a_single_bright_voxel_that_average_pooling_dilutes():
    # The reason the 3D CNN uses a max-pool head: one voxel in 32^3 changes the max
    # feature a lot and the average feature almost not at all.
    x = torch.zeros(1, 1, 32, 32, 32)
    y = x.clone()
    y[0, 0, 5, 9, 20] = 10.0
    for head, small in (("max", False), ("avg", True)):
        torch.manual_seed(0)
        model = models.build_model("cnn", 1, 2, dims=3, depth=2, width=4, head=head, norm=False).eval()
        change = (model.embed(y) - model.embed(x)).abs().max().item()
        assert (change < 0.01) == small, (head, change)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=[f"{c[0]}{c[1]}d" for c in CASES])
def test_models_trace_for_export(name, dims, shape):
    model = models.build_model(name, shape[1], 2, dims=dims, depth=2, width=4).eval()
    x = torch.randn(shape)
    traced = torch.jit.trace(model, x)
    x2 = torch.randn((3, *shape[1:]))  # another batch size must work too
    assert torch.allclose(traced(x2), model(x2), atol=1e-5)


def test_instance_norm_option_makes_predictions_independent_of_the_batch():
    torch.manual_seed(0)
    model = models.build_model("cnn", 1, 2, dims=3, depth=2, width=4, norm="instance", dropout=0.0).train()
    x = torch.randn(4, 1, 16, 16, 16)
    alone = model(x[:1])
    together = model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5)
    batch = models.build_model("cnn", 1, 2, dims=3, depth=2, width=4, dropout=0.0).train()
    assert not torch.allclose(batch(x[:2])[:1], batch(x)[:1], atol=1e-5)
    with pytest.raises(ValueError, match="norm"):
        models.build_model("cnn", 1, 2, norm="layer")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("dims", [2, 3])
def test_lesion_map_classifier_answers_with_its_most_suspicious_voxel(dims):
    torch.manual_seed(0)
    model = models.build_model("unet_classifier", 2, 2, dims=dims, depth=2, width=4).eval()
    x = torch.randn((3, 2) + (16,) * dims)
    logits, voxel_logits = model(x, return_map=True)
    assert tuple(logits.shape) == (3, 2) and tuple(voxel_logits.shape) == (3, 2) + (16,) * dims
    assert torch.equal(logits, model(x))
    p_lesion = torch.softmax(logits, 1)[:, 1]
    assert torch.allclose(p_lesion, model.lesion_map(x).flatten(1).amax(1), atol=1e-5)
    traced = torch.jit.trace(model, x)
    assert torch.allclose(traced(x[:1]), model(x[:1]), atol=1e-5)
    assert models.build_model(**model.config).config == model.config
    with pytest.raises(ValueError, match="healthy versus lesion"):
        models.build_model("unet_classifier", 1, 3)
