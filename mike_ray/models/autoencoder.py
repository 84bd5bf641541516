"""The MIKE student: a fully convolutional MBConv autoencoder with a C×8×8 embedding (paper §4).

Encoder (defaults ``width=16, depth=8, num_downsamples=3``), input B×3×64×64 in [0, 1]::

    encoder.stem     3×3 conv + BN + SiLU           16×64×64
    encoder.block01  MBConv (expand 1)              16×64×64
    encoder.block02  MBConv stride 2                32×32×32
    encoder.block03  MBConv                         32×32×32
    encoder.block04  MBConv stride 2                64×16×16
    encoder.block05  MBConv                         64×16×16
    encoder.block06  MBConv stride 2               128×8×8
    encoder.block07-08 MBConv                      128×8×8
    encoder.embed    1×1 conv                        C×8×8     (the embedding z; C=2 → 128 numbers)

The decoder mirrors it with its own parameters: ``decoder.expand`` (1×1 conv + BN + SiLU, C→128),
``decoder.block01`` … ``block08`` (the encoder's blocks in reverse, stride 2 replaced by ×2 upsampling
+ MBConv), ``decoder.out`` (3×3 conv to 3 channels). ``decode`` returns logits, so the same decoder
can later be retrained to output 3-channel mask logits (paper §4.2) without any change of topology.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from mike_ray.errors import ModelError
from mike_ray.models._blocks import (
    UpBlock,
    check_int,
    disable_inplace,
    down_strides,
    init_weights,
    mbconv,
    norm_layer,
    seeded_init,
)

__all__ = ["AutoEncoder", "paper_autoencoder"]


class AutoEncoder(nn.Module):
    """MBConv autoencoder: ``encode`` B×3×H×W → B×C×(H/2^n)×(W/2^n), ``decode`` back to B×3×H×W logits.

    Args:
        embed_channels: C, channels of the embedding (2 in the paper: 2×8×8 = 128 numbers).
        width: channels at full resolution; each stride-2 level doubles it.
        depth: MBConv blocks per side (8 in the paper); at least ``num_downsamples + 1``.
        num_downsamples: stride-2 blocks in the encoder; 3 takes 64×64 to 8×8.
        expand_ratio: MBConv expansion of every block but the full-resolution first/last (1).
        kernel_size: depthwise kernel of every MBConv.
        in_channels: image channels; out_channels: channels ``decode`` produces (3: RGB or a
            3-class mask).
        stem_stride: 2 makes the stem stride 2 (and adds a ×2 upsampling before the decoder's output
            conv): blocks run at half resolution; use ``num_downsamples=2`` to keep an 8×8 embedding.
    """

    def __init__(self, embed_channels: int = 2, width: int = 16, depth: int = 8, num_downsamples: int = 3,
                 expand_ratio: float = 6.0, kernel_size: int = 3, in_channels: int = 3,
                 out_channels: int = 3, stem_stride: int = 1) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ModelError(f"model 'autoencoder': stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem_stride = stem_stride
        for field, value, minimum in (("embed_channels", embed_channels, 1), ("width", width, 1),
                                      ("num_downsamples", num_downsamples, 0),
                                      ("in_channels", in_channels, 1), ("out_channels", out_channels, 1)):
            check_int("autoencoder", field, value, minimum)
        check_int("autoencoder", "depth", depth, num_downsamples + 1)
        if not expand_ratio > 0:
            raise ModelError(f"model 'autoencoder': expand_ratio must be > 0, got {expand_ratio!r}")
        self.embed_channels, self.width, self.depth = embed_channels, width, depth
        self.num_downsamples = num_downsamples
        self._kernel_size = kernel_size

        # (in, out, stride, expand) of each encoder block; the decoder walks this list backwards.
        specs = [(width, width, 1, 1.0)]
        level = 0
        for stride in down_strides(depth - 1, num_downsamples):
            c_in = width * 2 ** level
            level += stride == 2
            specs.append((c_in, width * 2 ** level, stride, expand_ratio))
        self._specs = specs
        self._top, self._in, self._out = width * 2 ** level, in_channels, out_channels

        enc: OrderedDict[str, nn.Module] = OrderedDict()
        enc["stem"] = Conv2dNormActivation(in_channels, width, kernel_size=3, stride=stem_stride,
                                           norm_layer=norm_layer, activation_layer=nn.SiLU)
        for i, (c_in, c_out, stride, exp) in enumerate(specs, 1):
            enc[f"block{i:02d}"] = mbconv(c_in, c_out, stride=stride, expand_ratio=exp,
                                          kernel_size=kernel_size)
        enc["embed"] = nn.Conv2d(self._top, embed_channels, kernel_size=1)  # linear embedding, no norm
        self.encoder = nn.Sequential(enc)
        self.decoder = self._build_decoder()

        init_weights(self)
        disable_inplace(self)

    def _build_decoder(self) -> nn.Sequential:
        dec: OrderedDict[str, nn.Module] = OrderedDict()
        dec["expand"] = Conv2dNormActivation(self.embed_channels, self._top, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=nn.SiLU)
        for i, (c_in, c_out, stride, exp) in enumerate(reversed(self._specs), 1):
            dec[f"block{i:02d}"] = (
                UpBlock(c_out, c_in, expand_ratio=exp, kernel_size=self._kernel_size) if stride == 2
                else mbconv(c_out, c_in, expand_ratio=exp, kernel_size=self._kernel_size))
        if self.stem_stride != 1:  # mirror of the strided stem
            dec["up"] = nn.Upsample(scale_factor=self.stem_stride, mode="bilinear", align_corners=False)
        dec["out"] = nn.Conv2d(self.width, self._out, kernel_size=3, padding=1)
        return nn.Sequential(dec)

    def embedding_shape(self, image_size: int = 64) -> tuple[int, int, int]:
        """C×h×w of ``encode``'s output for square images of side ``image_size``."""
        side = image_size // (self.stem_stride * 2 ** self.num_downsamples)
        return (self.embed_channels, side, side)

    def encode(self, x: Tensor) -> Tensor:
        """B×3×64×64 images in [0, 1] → B×C×8×8 embedding z."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """B×C×8×8 embedding → B×3×64×64 logits (RGB before the sigmoid, or mask logits downstream)."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̄ = sigmoid(decode(encode(x))), B×3×64×64 in [0, 1]."""
        return self.decode(self.encode(x)).sigmoid()

    def reset_decoder(self, seed: int | None = None) -> None:
        """Re-initialise every decoder weight and BN statistic in place (encoder untouched).

        Used by the downstream evaluation, which freezes the encoder and retrains the decoder to
        output mask logits. With a ``seed`` the new weights are reproducible and the global RNG is
        left alone; the decoder keeps its parameter objects, so existing optimizers stay valid.
        """
        seeded_init(self.decoder, seed)

    def set_out_channels(self, channels: int, seed: int | None = None) -> None:
        """Make ``decode`` produce ``channels`` maps: a task with other than 3 classes (a ``tasks:``
        table) gets a new, seeded output conv; the rest of the decoder is kept. No-op when equal."""
        check_int("autoencoder", "out_channels", channels, 1)
        if channels == self.decoder.out.out_channels:
            return
        out = nn.Conv2d(self.width, channels, kernel_size=3, padding=1).to(self.decoder.out.weight.device)
        seeded_init(out, seed)
        self.decoder.out = out
        self._out = channels


def paper_autoencoder(embed_channels: int = 2) -> AutoEncoder:
    """The paper-sized student: 3×3 conv + 8 MBConv + 1×1 conv to C×8×8 (C=2: 128 numbers), mirrored."""
    return AutoEncoder(embed_channels=embed_channels, width=16, depth=8, num_downsamples=3)
