"""The paper's segmenter and autoencoder, the model registry, and weights round-trips."""
from __future__ import annotations

import torch
import pytest
from torch import nn

from mike_ray.errors import ModelError
from mike_ray.models import (
    AutoEncoder,
    ModelSpec,
    Segmenter,
    available_archs,
    build_model,
    load_weights,
    paper_autoencoder,
    paper_segmenter,
    save_weights,
)

torch.set_num_threads(1)

# Parameter counts of the paper-sized configs (width 16). A change means the topology changed.
PAPER_SEGMENTER_PARAMS = 1_110_267
PAPER_AUTOENCODER_PARAMS = 1_600_177


def images(b: int = 2, seed: int = 0) -> torch.Tensor:
    """B×3×64×64 uniform images in [0, 1]."""
    return torch.rand(b, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_segmenter(**kw) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(**{"width": 4, "depth": 5, "num_downsamples": 1, **kw})


def spatial_sizes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """C×H×W of the named children's outputs, recorded with forward hooks."""
    out: dict[str, tuple[int, ...]] = {}
    handles = [getattr(model, n).register_forward_hook(
        lambda m, a, y, n=n: out.__setitem__(n, tuple(y.shape[1:]))) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


# ------------------------------------------------------------------------------------------------
# Segmenter


def test_tiny_segmenter_maps_images_to_mask_logits():
    m = tiny_segmenter(num_classes=5)
    y = m(images())
    assert y.shape == (2, 5, 64, 64)
    assert [n for n, _ in m.named_children()] == ["stem", "block01", "block02", "block03", "block04",
                                                   "block05", "head"]


def test_paper_segmenter_has_18_conv_layers_and_the_documented_resolutions(capsys):
    m = paper_segmenter().eval()
    names = [n for n, _ in m.named_children()]
    assert names == ["stem"] + [f"block{i:02d}" for i in range(1, 17)] + ["head"]
    sizes = spatial_sizes(m, names, images(1))
    assert sizes["stem"] == sizes["block01"] == (16, 64, 64)
    assert sizes["block06"] == sizes["block07"] == sizes["block08"] == (128, 8, 8)  # 64 → 8
    assert sizes["block13"] == sizes["block14"] == sizes["block16"] == (16, 64, 64)  # back to 64
    assert sizes["head"] == (3, 64, 64)
    assert n_params(m) == PAPER_SEGMENTER_PARAMS
    with capsys.disabled():
        print(f"\n[params] paper segmenter (width 16, 16 MBConv): {n_params(m):,}")


def test_skip_concatenates_block01_into_the_second_to_last_block():
    m = tiny_segmenter().eval()
    x = images()
    seen: dict[str, torch.Tensor] = {}
    h1 = m.block01.register_forward_hook(lambda mod, a, y: seen.__setitem__("block01", y))
    h2 = m.block04.register_forward_pre_hook(lambda mod, a: seen.__setitem__("merge_in", a[0]))
    with torch.no_grad():
        base = m(x)
    h1.remove()
    h2.remove()
    w = m.width
    assert seen["merge_in"].shape == (2, 2 * w, 64, 64)
    torch.testing.assert_close(seen["merge_in"][:, w:], seen["block01"], rtol=0, atol=0)

    # The skip half really drives the output: blanking it changes the logits.
    def drop_skip(mod, args):
        z = args[0].clone()
        z[:, w:] = 0
        return (z,)

    h = m.block04.register_forward_pre_hook(drop_skip)
    with torch.no_grad():
        cut = m(x)
    h.remove()
    assert (cut - base).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, field", [({"depth": 8}, "depth"), ({"width": 0}, "width"),
                                           ({"num_classes": 0}, "num_classes")])
def test_segmenter_rejects_bad_sizes_with_one_line(kwargs, field):
    with pytest.raises(ModelError) as e:
        Segmenter(**kwargs)
    msg = str(e.value)
    assert msg.startswith("model 'segmenter': " + field) and "\n" not in msg


# ------------------------------------------------------------------------------------------------
# Autoencoder


def test_tiny_autoencoder_encode_decode_forward():
    torch.manual_seed(0)
    ae = AutoEncoder(embed_channels=3, width=4, depth=4).eval()
    x = images()
    z = ae.encode(x)
    assert z.shape == (2, 3, 8, 8) and ae.embedding_shape(64) == (3, 8, 8)
    logits = ae.decode(z)
    assert logits.shape == (2, 3, 64, 64)
    xbar = ae(x)
    torch.testing.assert_close(xbar, torch.sigmoid(logits))
    assert xbar.min() >= 0 and xbar.max() <= 1


def test_paper_autoencoder_topology_and_mirror(capsys):
    ae = paper_autoencoder()
    enc = [n for n, _ in ae.encoder.named_children()]
    dec = [n for n, _ in ae.decoder.named_children()]
    assert enc == ["stem"] + [f"block{i:02d}" for i in range(1, 9)] + ["embed"]
    assert dec == ["expand"] + [f"block{i:02d}" for i in range(1, 9)] + ["out"]
    z = ae.encode(images(1))
    assert z.shape == (1, 2, 8, 8) and z[0].numel() == 128
    # Mirror: decoder block k has the channel counts of encoder block 9-k, reversed.
    for k in range(1, 9):
        e_blk, d_blk = getattr(ae.encoder, f"block{9 - k:02d}"), getattr(ae.decoder, f"block{k:02d}")
        e_conv = [m for m in e_blk.modules() if isinstance(m, nn.Conv2d)]
        d_conv = [m for m in d_blk.modules() if isinstance(m, nn.Conv2d)]
        assert (e_conv[0].in_channels, e_conv[-1].out_channels) == (d_conv[-1].out_channels,
                                                                    d_conv[0].in_channels)
    enc_ids = {id(p) for p in ae.encoder.parameters()}
    assert not enc_ids & {id(p) for p in ae.decoder.parameters()}  # own parameters, not shared
    assert n_params(ae) == PAPER_AUTOENCODER_PARAMS
    with capsys.disabled():
        print(f"\n[params] paper autoencoder (width 16, C=2): {n_params(ae):,} "
              f"(encoder {n_params(ae.encoder):,}, decoder {n_params(ae.decoder):,})")


def test_reset_decoder_is_seeded_in_place_and_leaves_encoder_and_global_rng_alone():
    torch.manual_seed(0)
    a = AutoEncoder(width=4, depth=4)
    b = AutoEncoder(width=4, depth=4)
    enc_before = {k: v.clone() for k, v in a.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in a.decoder.state_dict().items()}
    params_before = [id(p) for p in a.decoder.parameters()]
    rng_before = torch.random.get_rng_state()

    a.reset_decoder(seed=3)
    b.reset_decoder(seed=3)

    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert [id(p) for p in a.decoder.parameters()] == params_before
    for k, v in a.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k])
    for k, v in a.decoder.state_dict().items():
        assert torch.equal(v, b.decoder.state_dict()[k])
    changed = [k for k, v in a.decoder.state_dict().items()
               if k.endswith("weight") and not torch.equal(v, dec_before[k])]
    assert changed, "reset_decoder did not change any decoder weight"


# ------------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("spec, cls, out_shape", [
    ({"arch": "segmenter", "width": 4, "depth": 5, "num_downsamples": 1, "num_classes": 2}, "Segmenter",
     (2, 2, 64, 64)),
    ({"arch": "autoencoder", "width": 4, "depth": 4, "embed_channels": 1}, "AutoEncoder", (2, 3, 64, 64)),
    ({"arch": "resnet18", "num_classes": 7}, "ResNet", (2, 7)),
    ({"arch": "mobilenet_v3_small", "num_classes": 4}, "MobileNetV3", (2, 4)),
    ({"arch": "efficientnet_b0", "num_classes": 3, "kwargs": {"dropout": 0.0}}, "EfficientNet", (2, 3)),
    ({"arch": "torch.nn:Conv2d", "kwargs": {"in_channels": 3, "out_channels": 5, "kernel_size": 1}},
     "Conv2d", (2, 5, 64, 64)),
])
def test_build_model_builds_each_kind_of_arch(spec, cls, out_shape):
    m = build_model(spec, imports="any").eval()  # as for a spec from the sweep file being run
    assert type(m).__name__ == cls
    with torch.no_grad():
        assert m(images()).shape == out_shape


def test_build_model_seed_is_reproducible_and_leaves_global_rng_alone():
    spec = {"arch": "segmenter", "width": 4, "depth": 5, "num_downsamples": 1}
    rng = torch.random.get_rng_state()
    a, b = build_model({**spec, "seed": 1}), build_model(ModelSpec(**spec, seed=1))
    c = build_model({**spec, "seed": 2})
    assert torch.equal(torch.random.get_rng_state(), rng)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])


@pytest.mark.parametrize("spec, expected", [
    ({"arch": "resnt18"}, "model 'resnt18': unknown arch 'resnt18' (did you mean 'resnet18'"),
    ({"arch": "autoencoder", "embed_chanels": 3}, "model 'autoencoder': embed_chanels: unknown key "
                                                  "(did you mean 'embed_channels'?)"),
    ({"arch": "resnet18", "width": 8}, "model 'resnet18': option 'width' does not apply"),
    ({"arch": "segmenter", "embed_channels": 2}, "model 'segmenter': option 'embed_channels' does not apply"),
    ({"arch": "segmenter", "width": -1},
     "model 'segmenter': width: Input should be greater than or equal to 1"),
    ({"arch": "resnet18", "kwargs": {"bogus": 1}}, "model 'resnet18': building 'resnet18' failed: TypeError"),
    ({"arch": "no_such_pkg.mod:make"}, "model 'no_such_pkg.mod:make': cannot import"),
    ({"width": 4}, "model '?': arch: Field required"),
])
def test_build_model_errors_are_one_line_and_name_the_model(spec, expected):
    with pytest.raises(ModelError) as e:
        build_model(spec, imports="any")
    msg = str(e.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_available_archs_lists_ours_and_torchvision_models():
    archs = available_archs()
    assert archs[:2] == ["segmenter", "autoencoder"]
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0"} <= set(archs)
    # segmentation and detection models too (teachers: entries), built without any download
    assert {"fcn_resnet50", "lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn"} <= set(archs)


def test_torchvision_segmentation_and_detection_models_build_without_pretrained_backbones():
    """torchvision would load an ImageNet backbone by default (a download): never here."""
    seg = build_model({"arch": "lraspp_mobilenet_v3_large", "num_classes": 4, "seed": 0})
    again = build_model({"arch": "lraspp_mobilenet_v3_large", "num_classes": 4, "seed": 0})
    other = build_model({"arch": "lraspp_mobilenet_v3_large", "num_classes": 4, "seed": 1})
    w = "backbone.0.0.weight"
    assert torch.equal(seg.state_dict()[w], again.state_dict()[w])  # seeded random init, not fixed weights
    assert not torch.equal(seg.state_dict()[w], other.state_dict()[w])
    det = build_model({"arch": "fasterrcnn_mobilenet_v3_large_fpn", "num_classes": 3,
                       "kwargs": {"min_size": 64, "max_size": 64}})
    assert isinstance(det, torch.nn.Module)


# ------------------------------------------------------------------------------------------------
# Weights


def test_weights_round_trip_with_torch_save_and_weights_only_load(tmp_path):
    src = tiny_segmenter().eval()
    # Non-trivial BN statistics, so the round trip covers buffers too.
    src.train()
    with torch.no_grad():
        src(images(4, seed=1))
    src.eval()
    path = tmp_path / "seg.pt"
    torch.save(src.state_dict(), path)
    dst = Segmenter(width=4, depth=5, num_downsamples=1).eval()
    dst.load_state_dict(torch.load(path, weights_only=True))
    x = images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))

    # The same through our helpers (atomic save, strict load).
    save_weights(src, tmp_path / "sub" / "seg2.pt")
    dst2 = load_weights(Segmenter(width=4, depth=5, num_downsamples=1).eval(), tmp_path / "sub" / "seg2.pt")
    with torch.no_grad():
        assert torch.equal(src(x), dst2(x))


def test_load_weights_rejects_missing_foreign_and_misfit_files(tmp_path):
    model = Segmenter(width=4, depth=5, num_downsamples=1)
    with pytest.raises(ModelError, match=r"seg\.pt: weights file not found"):
        load_weights(model, tmp_path / "seg.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pt: not a readable weights file"):
        load_weights(model, tmp_path / "junk.pt")
    save_weights(Segmenter(width=4, depth=5, num_downsamples=1, num_classes=2), tmp_path / "two.pt")
    with pytest.raises(ModelError, match=r"two\.pt: does not fit model 'teacher7': 'head\.weight' has "
                                         r"shape \(2, 4, 1, 1\) in the file, \(3, 4, 1, 1\)"):
        load_weights(model, tmp_path / "two.pt", name="teacher7")
    save_weights(Segmenter(width=4, depth=9, num_downsamples=1), tmp_path / "deep.pt")
    with pytest.raises(ModelError, match=r"deep\.pt: does not fit model 'Segmenter': .*unexpected"):
        load_weights(model, tmp_path / "deep.pt")
