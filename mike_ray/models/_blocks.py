"""Building blocks shared by the segmenter and the autoencoder (torchvision MBConv underneath).

Both models are plain stacks of torchvision's ``MBConv`` (EfficientNet's inverted-residual block with
squeeze-excitation) at a few resolutions. This module holds what they share: an MBConv with exact
channel counts, an upsampling block, the stride layout of a down path, weight init, and the switch
that turns in-place activations off (so a tapped tensor is never overwritten later in the forward).
"""
from __future__ import annotations

import copy
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.efficientnet import MBConv, MBConvConfig

from mike_ray.errors import ModelError

# torchvision's EfficientNet uses BatchNorm with eps=1e-3; keep the same numerics.
norm_layer = partial(nn.BatchNorm2d, eps=1e-3)


def mbconv(in_channels: int, out_channels: int, *, stride: int = 1, expand_ratio: float = 6.0,
           kernel_size: int = 3) -> MBConv:
    """One torchvision ``MBConv``: B×in×H×W → B×out×(H/stride)×(W/stride).

    ``MBConvConfig`` rounds channel counts to multiples of 8; we overwrite them afterwards so tiny
    test widths (e.g. 4) stay tiny. (The internal expanded width is still rounded by torchvision.)
    Stochastic depth is 0: teachers must be deterministic and the paper does not use it.
    """
    cnf = MBConvConfig(expand_ratio, kernel_size, stride, in_channels, out_channels, num_layers=1)
    cnf.input_channels, cnf.out_channels = in_channels, out_channels
    return MBConv(cnf, stochastic_depth_prob=0.0, norm_layer=norm_layer)


class UpBlock(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by an MBConv: B×in×H×W → B×out×2H×2W.

    One module, so that a tap on it (e.g. ``block10``) yields the upsampled, refined map.
    """

    def __init__(self, in_channels: int, out_channels: int, *, expand_ratio: float = 6.0,
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = mbconv(in_channels, out_channels, expand_ratio=expand_ratio, kernel_size=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


def spread(n_items: int, n_slots: int) -> list[int]:
    """Split ``n_items`` over ``n_slots`` as evenly as possible, extras to the last slots."""
    q, r = divmod(n_items, n_slots)
    return [q + (1 if i >= n_slots - r else 0) for i in range(n_slots)]


def down_strides(n_blocks: int, n_down: int) -> list[int]:
    """Strides of a down path of ``n_blocks`` MBConvs containing ``n_down`` stride-2 blocks.

    Each stride-2 block is followed by its share of stride-1 blocks (extras go to the deepest
    resolution), e.g. ``down_strides(7, 3) == [2, 1, 2, 1, 2, 1, 1]``.
    """
    if n_down == 0:
        return [1] * n_blocks
    strides: list[int] = []
    for plain in spread(n_blocks - n_down, n_down):
        strides += [2] + [1] * plain
    return strides


def init_weights(module: nn.Module) -> None:
    """torchvision EfficientNet's init (kaiming-normal fan-out convs, unit BN, small uniform linears)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            bound = 1.0 / m.out_features ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def disable_inplace(module: nn.Module) -> None:
    """Turn every ``inplace=True`` activation (torchvision's default) off.

    An in-place activation overwrites its input; if that input is a tapped tensor (a BatchNorm output
    inside an MBConv, say), the tap would silently show post-activation values. Same numbers, a few
    more bytes.
    """
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False


def check_int(model: str, field: str, value: int, minimum: int) -> None:
    """Reject a too-small integer hyper-parameter with a one-line :class:`ModelError`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelError(f"model '{model}': {field} must be an integer >= {minimum}, got {value!r}")


def seeded_init(module: nn.Module, seed: int | None) -> None:
    """Re-initialise ``module`` in place; with a seed, from a private CPU RNG (global RNG untouched).

    Values are drawn on a CPU copy and loaded back, so they are the same on any device, and the
    module keeps its identity (an optimizer holding its parameters stays valid).
    """
    twin = copy.deepcopy(module).to("cpu")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        init_weights(twin)
    module.load_state_dict(twin.state_dict())
