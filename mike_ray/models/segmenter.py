"""The paper's teacher segmenter (MIKE §4): 18 conv layers of EfficientNet blocks with one long skip.

Topology with the defaults (``width=16, depth=16, num_downsamples=3``), input B×3×64×64 in [0, 1]::

    layer  module   op                              out (C×H×W)
      1    stem     3×3 conv + BN + SiLU            16×64×64
      2    block01  MBConv (expand 1)               16×64×64   ──────────┐ skip
      3    block02  MBConv stride 2                 32×32×32             │
      4    block03  MBConv                          32×32×32             │
      5    block04  MBConv stride 2                 64×16×16             │
      6    block05  MBConv                          64×16×16             │
      7    block06  MBConv stride 2                128×8×8               │
      8-9  block07-08 MBConv                       128×8×8               │
     10    block09  ×2 upsample + MBConv            64×16×16             │
     11    block10  MBConv                          64×16×16             │
     12    block11  ×2 upsample + MBConv            32×32×32             │
     13    block12  MBConv                          32×32×32             │
     14    block13  ×2 upsample + MBConv            16×64×64             │
     15    block14  MBConv                          16×64×64  ─ concat ◄─┘ → 32×64×64
     16    block15  MBConv (merges the skip)        16×64×64
     17    block16  MBConv                          16×64×64
     18    head     1×1 conv                         num_classes×64×64  (mask logits)

The paper states only "18 conv layers including 16 EfficientNet blocks, a skip from the second layer
concatenated with the output of the 15th"; the resolutions, widths and expansion ratio (6, 1 in the
first block as in EfficientNet-B0) are our choices. With another ``depth`` the skip still runs from
``block01`` to the input of the second-to-last block.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
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
    spread,
)

__all__ = ["Segmenter", "paper_segmenter"]


class Segmenter(nn.Module):
    """MBConv encoder–decoder with a long concatenation skip; B×in×H×W images → B×classes×H×W logits.

    Every layer is a top-level child with a stable name (``stem``, ``block01`` … ``blockNN``,
    ``head``), so ``taps.tap_names(model, "blocks")`` lists all 18 layers in execution order.

    Args:
        num_classes: output channels, one mask-logit map per class of the teacher's task.
        width: channels at full resolution; each stride-2 level doubles it.
        depth: number of MBConv blocks (16 in the paper); at least ``2 * num_downsamples + 3``.
        num_downsamples: stride-2 blocks on the way down (and ×2 upsamplings on the way up);
            H and W must be divisible by ``2 ** num_downsamples``. 3 takes 64×64 to 8×8.
        expand_ratio: MBConv expansion of every block but the first (which uses 1).
        kernel_size: depthwise kernel of every MBConv.
        in_channels: image channels.
        stem_stride: 2 makes the stem a stride-2 conv and bilinearly upsamples the logits, so every
            block runs at half resolution (about 4× less compute: the small CPU profiles use it).
    """

    def __init__(self, num_classes: int = 3, width: int = 16, depth: int = 16, num_downsamples: int = 3,
                 expand_ratio: float = 6.0, kernel_size: int = 3, in_channels: int = 3,
                 stem_stride: int = 1) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ModelError(f"model 'segmenter': stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem_stride = stem_stride
        for field, value, minimum in (("num_classes", num_classes, 1), ("width", width, 1),
                                      ("num_downsamples", num_downsamples, 0),
                                      ("in_channels", in_channels, 1)):
            check_int("segmenter", field, value, minimum)
        check_int("segmenter", "depth", depth, 2 * num_downsamples + 3)
        if not expand_ratio > 0:
            raise ModelError(f"model 'segmenter': expand_ratio must be > 0, got {expand_ratio!r}")
        self.num_classes, self.width, self.depth = num_classes, width, depth
        self.num_downsamples = num_downsamples

        kw = dict(expand_ratio=expand_ratio, kernel_size=kernel_size)
        self.stem = Conv2dNormActivation(in_channels, width, kernel_size=3, stride=stem_stride,
                                         norm_layer=norm_layer, activation_layer=nn.SiLU)
        blocks: list[nn.Module] = [mbconv(width, width, expand_ratio=1.0, kernel_size=kernel_size)]

        # Middle blocks (between the skip source and the merge): down path, then the mirrored up path.
        n_middle = depth - 3
        n_down_path, n_up_path = (n_middle + 1) // 2, n_middle // 2
        level = 0
        for stride in down_strides(n_down_path, num_downsamples):
            c_in = width * 2 ** level
            level += stride == 2
            blocks.append(mbconv(c_in, width * 2 ** level, stride=stride, **kw))
        if num_downsamples == 0:
            blocks += [mbconv(width, width, **kw) for _ in range(n_up_path)]
        for plain in spread(n_up_path - num_downsamples, num_downsamples) if num_downsamples else []:
            c_in = width * 2 ** level
            level -= 1
            blocks.append(UpBlock(c_in, width * 2 ** level, **kw))
            blocks += [mbconv(width * 2 ** level, width * 2 ** level, **kw) for _ in range(plain)]
        assert level == 0 and len(blocks) == depth - 2

        blocks.append(mbconv(2 * width, width, **kw))  # merges concat(block_{depth-2}, block01)
        blocks.append(mbconv(width, width, **kw))
        self._block_names = [f"block{i:02d}" for i in range(1, depth + 1)]
        for name, block in zip(self._block_names, blocks):
            self.add_module(name, block)
        self.head = nn.Conv2d(width, num_classes, kernel_size=1)

        init_weights(self)
        disable_inplace(self)

    def forward(self, x: Tensor) -> Tensor:
        """B×in×H×W images in [0, 1] → B×num_classes×H×W mask logits."""
        size = x.shape[-2:]
        x = self.stem(x)
        skip = x = getattr(self, self._block_names[0])(x)
        for name in self._block_names[1:-2]:
            x = getattr(self, name)(x)
        x = torch.cat([x, skip], dim=1)  # paper: layer 2's output concatenated to layer 15's
        x = getattr(self, self._block_names[-2])(x)
        x = getattr(self, self._block_names[-1])(x)
        logits = self.head(x)
        if self.stem_stride != 1:  # blocks ran at reduced resolution: logits back to the input size
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def paper_segmenter(num_classes: int = 3) -> Segmenter:
    """The paper-sized teacher: 18 conv layers (stem, 16 MBConv blocks, head), width 16, 64→8→64."""
    return Segmenter(num_classes=num_classes, width=16, depth=16, num_downsamples=3)
