"""The tap contract on torchvision models, the paper's segmenter and the autoencoder (fx and hooks)."""
from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mike_ray.errors import ModelError
from mike_ray.models import (
    AutoEncoder,
    Segmenter,
    TappedModel,
    build_model,
    check_input_shape,
    paper_segmenter,
    tap_names,
)

torch.set_num_threads(1)


def images(b: int = 2, seed: int = 0, **kw) -> torch.Tensor:
    return torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed), **kw)


def tiny_segmenter() -> Segmenter:
    return build_model({"arch": "segmenter", "width": 4, "depth": 5, "num_downsamples": 1, "seed": 0})


def assert_one_line(err: pytest.ExceptionInfo, start: str) -> None:
    msg = str(err.value)
    assert msg.startswith(start), msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------------------------
# Name resolution


def test_blocks_of_the_paper_segmenter_are_its_18_layers_in_order():
    names = tap_names(paper_segmenter(), "blocks")
    assert names == ["stem"] + [f"block{i:02d}" for i in range(1, 17)] + ["head"]


def test_patterns_lists_and_deduplication():
    m = build_model({"arch": "resnet18"})
    assert tap_names(m, "layer*") == ["layer1", "layer2", "layer3", "layer4"]
    assert tap_names(m, "layer[2-3]") == ["layer2", "layer3"]
    assert tap_names(m, "layer1.*") == ["layer1.0", "layer1.1"]  # '*' stays within one component
    assert tap_names(m, "**.conv1")[:3] == ["conv1", "layer1.0.conv1", "layer1.1.conv1"]
    assert tap_names(m, ["layer4", "conv1", "layer*"]) == ["layer4", "conv1", "layer1", "layer2", "layer3"]


@pytest.mark.parametrize("spec, start", [
    ("layer5", "model 'ResNet': unknown tap 'layer5' (did you mean 'layer4'"),
    (["layer1.0.conv9"],
     "model 'ResNet': unknown tap 'layer1.0.conv9' (did you mean 'layer1.0.conv2', 'layer1.0.conv1'"),
    ("fc.weight", "model 'ResNet': tap 'fc.weight' is a parameter or buffer, not a module; tap 'fc'"),
    ("decoder.*", "model 'ResNet': tap pattern 'decoder.*' matches no module"),
    ([], "model 'ResNet': empty tap list"),
])
def test_bad_tap_names_raise_one_line_model_errors(spec, start):
    with pytest.raises(ModelError) as e:
        TappedModel(build_model({"arch": "resnet18"}), spec)
    assert_one_line(e, start)


# ------------------------------------------------------------------------------------------------
# The contract on torchvision models at 64×64


TORCHVISION_CASES = [
    # resnet18: layer1.0.bn1 is followed by an in-place ReLU (the notes' pitfall)
    ("resnet18", ["layer1", "layer1.0.bn1", "layer2", "layer3", "layer4"],
     [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]),
    ("mobilenet_v3_small", "features.*",
     [(16, 32, 32), (16, 16, 16), (24, 8, 8), (24, 8, 8), (40, 4, 4), (40, 4, 4), (40, 4, 4), (48, 4, 4),
      (48, 4, 4), (96, 2, 2), (96, 2, 2), (96, 2, 2), (576, 2, 2)]),
    ("efficientnet_b0", "features.*",
     [(32, 32, 32), (16, 32, 32), (24, 16, 16), (40, 8, 8), (80, 4, 4), (112, 4, 4), (192, 2, 2),
      (320, 2, 2), (1280, 2, 2)]),
]


@pytest.mark.parametrize("arch, spec, shapes", TORCHVISION_CASES, ids=[c[0] for c in TORCHVISION_CASES])
def test_torchvision_taps_fx_equal_hooks_and_pass_gradients(arch, spec, shapes):
    model = build_model({"arch": arch, "num_classes": 3, "seed": 0}).eval()
    model.requires_grad_(False)  # a frozen teacher
    fx_taps = TappedModel(model, spec, name=arch)
    assert fx_taps.method == "fx", fx_taps.fallback_reason
    hook_taps = TappedModel(model, spec, name=arch, method="hooks")

    x = images(requires_grad=True)
    out = fx_taps(x)
    assert isinstance(out, OrderedDict) and list(out) == fx_taps.paths == tap_names(model, spec)
    assert [tuple(v.shape) for v in out.values()] == [(2, *s) for s in shapes]
    with torch.no_grad():
        ref = hook_taps(x)
    for p in out:
        torch.testing.assert_close(out[p], ref[p], rtol=1e-6, atol=1e-6)

    # Gradients reach the input through the frozen model (MIKE backpropagates to x̄).
    sum(v.square().mean() for v in out.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_tap_before_an_inplace_relu_keeps_pre_activation_values():
    model = build_model({"arch": "resnet18", "seed": 0}).eval()
    x = images()
    for method in ("fx", "hooks"):
        taps = TappedModel(model, ["maxpool", "layer1.0.bn1", "layer1"], method=method)
        with torch.no_grad():
            out = taps(x)
            block = model.layer1[0]
            expected = block.bn1(block.conv1(out["maxpool"]))
        assert (out["layer1.0.bn1"] < 0).any(), method  # not overwritten by the ReLU after it
        torch.testing.assert_close(out["layer1.0.bn1"], expected, rtol=1e-6, atol=1e-6)


def test_fx_cuts_the_graph_after_the_last_tap():
    model = build_model({"arch": "resnet18", "seed": 0}).eval()
    fx_taps = TappedModel(model, ["layer1"], method="fx")
    hook_taps = TappedModel(model, ["layer1"], method="hooks")
    runs = {"n": 0}
    # a leaf module: the fx graph calls leaves as modules, so their hooks fire when they run
    model.layer4[0].conv1.register_forward_hook(lambda m, a, y: runs.__setitem__("n", runs["n"] + 1))
    with torch.no_grad():
        fx_taps(images())
        assert runs["n"] == 0  # layer4 never ran
        hook_taps(images())
        assert runs["n"] == 1  # the hooks fallback runs the whole model


@pytest.mark.parametrize("method", ["fx", "hooks"])
@pytest.mark.parametrize("arch", ["resnet18", "segmenter"])
def test_early_exit_returns_the_same_taps_and_runs_nothing_after_them(method, arch):
    """``upto`` stops the forward after that tap: values and gradients equal the full forward's,
    and a leaf module after the cut never runs (residual adds and in-place ReLUs included)."""
    if arch == "resnet18":
        model = build_model({"arch": "resnet18", "seed": 0}).eval().double()
        spec, after = ["layer1", "layer2.0.bn1", "layer2", "layer3"], "layer3.1"
    else:
        model = tiny_segmenter().eval().double()
        spec, after = "blocks", None
    taps = TappedModel(model, spec, method=method)
    after = after or f"{taps.paths[-1]}"  # the segmenter's last block: after every cut below
    runs = {"n": 0}
    leaf = next(m for m in model.get_submodule(after).modules() if isinstance(m, nn.Conv2d))
    leaf.register_forward_hook(lambda m, a, y: runs.__setitem__("n", runs["n"] + 1))
    x = images(dtype=torch.float64)
    full = taps(x)
    assert runs["n"] == 1
    for k in (0, 1, len(taps.paths) - 2):
        runs["n"] = 0
        xr = x.clone().requires_grad_(True)
        cut = taps(xr, upto=taps.paths[k])
        assert list(cut) == taps.paths[:k + 1]
        assert runs["n"] == 0, f"{arch}/{method}: a module after '{taps.paths[k]}' ran"
        for p in cut:
            torch.testing.assert_close(cut[p], full[p], rtol=0, atol=0)
        # the gradient of the deepest kept tap equals the full forward's
        (g_cut,) = torch.autograd.grad(cut[taps.paths[k]].sum(), xr)
        xf = x.clone().requires_grad_(True)
        (g_full,) = torch.autograd.grad(taps(xf)[taps.paths[k]].sum(), xf)
        torch.testing.assert_close(g_cut, g_full, rtol=1e-12, atol=1e-12)
    assert list(taps(x, upto=taps.paths[-1])) == taps.paths
    with pytest.raises(ModelError) as e:
        taps(x, upto="nope")
    assert_one_line(e, f"model '{taps.name}': upto='nope' is not one of its taps")


def test_early_exit_graphs_follow_dtype_and_copies():
    model = tiny_segmenter().eval()
    taps = TappedModel(model, "blocks", method="fx")
    x = images()
    cut = taps(x, upto=taps.paths[1])
    taps.double()
    cut64 = taps(x.double(), upto=taps.paths[1])
    assert all(v.dtype == torch.float64 for v in cut64.values())
    torch.testing.assert_close(cut64[taps.paths[1]].float(), cut[taps.paths[1]], rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(taps)
    torch.testing.assert_close(twin(x.double(), upto=taps.paths[1])[taps.paths[1]], cut64[taps.paths[1]])


def test_module_run_twice_is_rejected_by_both_methods():
    model = build_model({"arch": "resnet18"})
    with pytest.raises(ModelError) as e:
        TappedModel(model, ["layer1.0.relu"], name="r18")
    assert_one_line(e, "model 'r18': tap 'layer1.0.relu' runs 2 times per forward")
    taps = TappedModel(model, ["layer1.0.relu"], name="r18", method="hooks")
    with pytest.raises(ModelError) as e:
        taps(images())
    assert_one_line(e, "model 'r18': tap 'layer1.0.relu' runs 2 times per forward")


def test_tap_inside_a_leaf_module_falls_back_to_hooks():
    model = build_model({"arch": "mobilenet_v3_small", "seed": 0}).eval()
    path = "features.1.block.1.fc1"  # inside a SqueezeExcitation, a leaf for torchvision's tracer
    taps = TappedModel(model, [path, "features.2"])
    assert taps.method == "hooks"
    assert "features.1.block.1" in taps.fallback_reason
    with torch.no_grad():
        out = taps(images())
    assert out[path].shape == (2, 8, 1, 1)
    with pytest.raises(ModelError) as e:
        TappedModel(model, [path], name="mnv3", method="fx")
    assert_one_line(e, "model 'mnv3': cannot tap with fx: tap 'features.1.block.1.fc1' lies inside")


# ------------------------------------------------------------------------------------------------
# Custom modules: train/eval branches, untraceable code, non-tensor outputs


class ModeBranch(nn.Module):
    """×2 in train mode, ×3 in eval mode: the fx graph must follow the mode."""

    def forward(self, x):
        return x * 2 if self.training else x * 3


class DataDependent(nn.Module):
    """A data-dependent branch: torch.fx cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


class PairOut(nn.Module):
    def forward(self, x):
        return x, x + 1


class Net(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = inner
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.inner(self.conv(x))
        return self.bn(y[0] if isinstance(y, tuple) else y)


def test_fx_follows_train_and_eval_graphs_and_keeps_module_flags():
    torch.manual_seed(0)
    net = Net(ModeBranch())
    net.bn.eval()  # a frozen BN inside a model in train mode: construction must not flip it
    taps = TappedModel(net, ["conv", "inner"])
    assert taps.method == "fx" and net.training and not net.bn.training
    x = images()
    out = taps(x)
    torch.testing.assert_close(out["inner"], 2 * out["conv"])
    taps.eval()
    assert not net.training  # modules are shared: eval() applies to the wrapped model
    out = taps(x)
    torch.testing.assert_close(out["inner"], 3 * out["conv"])


def test_untraceable_model_falls_back_to_hooks_with_same_contract():
    torch.manual_seed(0)
    net = Net(DataDependent()).eval()
    taps = TappedModel(net, ["conv", "inner", "bn"], name="dd")
    assert taps.method == "hooks" and "cannot trace" in taps.fallback_reason
    x = images(requires_grad=True)
    out = taps(x)
    assert list(out) == ["conv", "inner", "bn"] and out["bn"].shape == (2, 4, 64, 64)
    out["bn"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ModelError) as e:
        TappedModel(net, ["inner"], name="dd", method="fx")
    assert_one_line(e, "model 'dd': cannot tap with fx: torch.fx cannot trace it")


def test_non_tensor_output_is_rejected():
    net = Net(PairOut())
    with pytest.raises(ModelError) as e:
        TappedModel(net, ["inner"], name="pair")
    assert_one_line(e, "model 'pair': tap 'inner' outputs a tuple, not a tensor")
    taps = TappedModel(net, ["inner"], name="pair", method="hooks")
    with pytest.raises(ModelError) as e:
        taps(images())
    assert_one_line(e, "model 'pair': tap 'inner' outputs a tuple, not a tensor")


# ------------------------------------------------------------------------------------------------
# Our models


def test_segmenter_taps_every_layer_with_gradients_and_matching_hooks():
    model = tiny_segmenter().eval().requires_grad_(False)
    taps = TappedModel(model, "blocks", name="seg")
    assert taps.method == "fx"
    assert taps.paths == ["stem", "block01", "block02", "block03", "block04", "block05", "head"]
    x = images(requires_grad=True)
    out = taps(x)
    assert [tuple(v.shape[1:]) for v in out.values()] == [
        (4, 64, 64), (4, 64, 64), (8, 32, 32), (4, 64, 64), (4, 64, 64), (4, 64, 64), (3, 64, 64)]
    torch.testing.assert_close(out["head"], model(x))  # the last tap is the model's output
    with torch.no_grad():
        ref = TappedModel(model, "blocks", method="hooks")(x)
    for p in out:
        torch.testing.assert_close(out[p], ref[p], rtol=1e-6, atol=1e-6)
    out["block02"].square().mean().backward()
    assert x.grad.abs().sum() > 0


def test_paper_segmenter_tap_shapes():
    shapes = TappedModel(paper_segmenter(), "blocks").shapes((3, 64, 64))
    assert shapes["block07"] == (128, 8, 8) and shapes["block15"] == (16, 64, 64)
    assert shapes["head"] == (3, 64, 64) and len(shapes) == 18


def test_autoencoder_taps_by_nested_path():
    torch.manual_seed(0)
    ae = AutoEncoder(width=4, depth=4).eval()
    taps = TappedModel(ae, ["encoder.block*", "encoder.embed", "decoder.block02"])
    assert taps.method == "fx"
    assert taps.paths == ["encoder.block01", "encoder.block02", "encoder.block03", "encoder.block04",
                          "encoder.embed", "decoder.block02"]
    x = images(requires_grad=True)
    out = taps(x)
    assert out["encoder.embed"].shape == (2, 2, 8, 8)
    torch.testing.assert_close(out["encoder.embed"], ae.encode(x))
    with torch.no_grad():
        ref = TappedModel(ae, taps.paths, method="hooks")(x)
    for p in out:
        torch.testing.assert_close(out[p], ref[p], rtol=1e-6, atol=1e-6)
    out["decoder.block02"].sum().backward()
    assert x.grad.abs().sum() > 0


def test_tapped_model_state_dict_and_dtype_follow_the_model():
    model = tiny_segmenter().eval()
    taps = TappedModel(model, ["block02", "head"])
    assert list(taps.state_dict()) == [f"model.{k}" for k in model.state_dict()]
    taps.double()
    assert next(model.parameters()).dtype == torch.float64
    out = taps(images().double())
    assert out["head"].dtype == torch.float64


def test_copies_and_pickles_keep_outputs_and_train_eval_flags():
    model = build_model({"arch": "resnet18", "seed": 0}).eval()
    taps = TappedModel(model, ["layer1.0.bn1", "layer2"])
    assert not taps.training  # starts in the model's mode
    x = images()
    with torch.no_grad():
        ref = taps(x)
        dup = copy.deepcopy(taps)
        buf = io.BytesIO()
        torch.save(taps, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (dup, loaded):
            assert not any(m.training for m in other.modules())
            assert other.model is not model
            out = other(x)
            assert all(torch.equal(out[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------
# Input-shape check


def test_check_input_shape_accepts_fitting_models_and_restores_modes():
    model = build_model({"arch": "resnet18"})  # train mode
    stats = model.bn1.running_mean.clone()
    check_input_shape(model, (3, 64, 64), "r18")
    assert model.training and torch.equal(model.bn1.running_mean, stats)
    check_input_shape(tiny_segmenter(), (3, 64, 64), "seg")


def test_check_input_shape_rejects_a_one_channel_model():
    gray = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ModelError) as e:
        check_input_shape(gray, (3, 64, 64), "gray")
    assert_one_line(e, "teacher 'gray': expects 1-channel input (first layer '0'), got input 3×64×64: "
                       "RuntimeError:")


def test_check_input_shape_rejects_a_model_whose_maps_collapse():
    big_kernel = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.Conv2d(8, 8, 7, stride=4),
                               nn.Conv2d(8, 8, 7))  # 64 → 15 → 3 → kernel 7 does not fit
    with pytest.raises(ModelError) as e:
        check_input_shape(big_kernel, (3, 64, 64), "tiny_maps")
    assert_one_line(e, "teacher 'tiny_maps': expects another input size (a layer cannot take the "
                       "feature map it receives), got input 3×64×64: RuntimeError:")
