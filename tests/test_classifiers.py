"""CIFAR-style classifiers: shapes, the sensing-point contract, registry entries, the default MHGD pair."""
from __future__ import annotations

import pytest
import torch

from mike_ray.errors import ModelError
from mike_ray.models import TappedModel, build_model
from mike_ray.models.classifiers import (DEFAULT_STUDENT, DEFAULT_TEACHER, check_same_channels, stage_names,
                                         vgg_cifar)

torch.set_num_threads(1)

TINY = [
    ({"arch": "wrn", "depth": 10, "width": 1}, (16, 32, 64)),
    ({"arch": "resnet_cifar", "depth": 8, "width": 8}, (8, 16, 32)),
    ({"arch": "vgg_cifar", "depth": 4, "width": 8}, (8, 16, 32, 64)),
    ({"arch": "mobilenet_cifar", "depth": 3, "width": 8}, (8, 16, 32)),
]


@pytest.mark.parametrize("spec,channels", TINY, ids=[s["arch"] for s, _ in TINY])
@pytest.mark.parametrize("size", [32, 64])
def test_logits_and_sensing_points(spec: dict, channels: tuple[int, ...], size: int) -> None:
    model = build_model({**spec, "num_classes": 7, "seed": 0})
    assert model.channels == channels and model.sensing_points == stage_names(len(channels))
    points = model.sensing_points
    tapped = TappedModel(model, points + [f"{p}.body" for p in points] + ["fc"])
    out = tapped(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert out["fc"].shape == (2, 7)
    for k, (p, c) in enumerate(zip(points, channels)):
        side = size // 2 ** k
        assert out[p].shape == (2, c, side, side)
        assert out[p].min() >= 0                                   # post-activation
        assert torch.equal(out[p], torch.relu(out[f"{p}.body"]))  # body = the same point before its ReLU
        assert out[f"{p}.body"].min() < 0
    model.eval()
    with torch.no_grad():  # the plain forward returns the logits
        x = torch.rand(2, 3, size, size)
        assert torch.allclose(model(x), TappedModel(model, ["fc"])(x)["fc"], atol=1e-6)


def test_default_pair_has_equal_channels_and_a_smaller_student() -> None:
    teacher = build_model({**DEFAULT_TEACHER, "num_classes": 33, "seed": 0})
    student = build_model({**DEFAULT_STUDENT, "num_classes": 33, "seed": 0})
    assert check_same_channels(teacher, student, ["stage1", "stage2", "stage3"]) == [64, 128, 256]
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s < 0.5 * n_t


def test_channel_mismatch_is_named() -> None:
    teacher = build_model({"arch": "wrn", "depth": 10, "width": 1, "num_classes": 3})
    student = build_model({"arch": "resnet_cifar", "depth": 8, "width": 8, "num_classes": 3})
    with pytest.raises(ModelError, match="teacher 'stage1' has 16, student 'stage1' has 8"):
        check_same_channels(teacher, student, ["stage1", "stage2", "stage3"])
    # a ResNet/MobileNet student can take the teacher's widths explicitly
    for arch, depth in (("resnet_cifar", 8), ("mobilenet_cifar", 3)):
        s = build_model({"arch": arch, "depth": depth, "num_classes": 3, "kwargs": {"widths": [16, 32, 64]}})
        assert check_same_channels(teacher, s, ["stage1", "stage2", "stage3"]) == [16, 32, 64]


def test_depth_notation_and_errors() -> None:
    assert len(build_model({"arch": "wrn", "depth": 16, "width": 1}).stage1.body) == 2 + 1  # 2 blocks + bn
    assert len(build_model({"arch": "resnet_cifar", "depth": 14, "width": 4}).stage2.body) == 2
    convs = [sum(1 for n, _ in getattr(vgg_cifar(depth=13, width=4), f"stage{k}").body.named_children()
                 if n.startswith("conv")) for k in range(1, 5)]
    assert convs == [3, 3, 3, 4]
    with pytest.raises(ModelError, match="depth must be 6n\\+4"):
        build_model({"arch": "wrn", "depth": 12})
    with pytest.raises(ModelError, match="depth must be 6n\\+2"):
        build_model({"arch": "resnet_cifar", "depth": 9})
    with pytest.raises(ModelError, match="option 'embed_channels' does not apply to arch 'vgg_cifar'"):
        build_model({"arch": "vgg_cifar", "embed_channels": 2})
    with pytest.raises(ModelError, match="widths"):
        build_model({"arch": "vgg_cifar", "kwargs": {"widths": []}})


def test_seeded_build_is_reproducible() -> None:
    a = build_model({"arch": "mobilenet_cifar", "depth": 3, "width": 8, "seed": 3})
    b = build_model({"arch": "mobilenet_cifar", "depth": 3, "width": 8, "seed": 3})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
