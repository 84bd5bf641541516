"""CIFAR-style classifiers for MHGD: VGG, WideResNet, ResNet and MobileNet(V2-style).

Every classifier maps B×3×H×W images (H = W = 32 or 64; any size that survives the downsampling works,
the head pools globally) to B×num_classes logits, and is laid out the same way::

    stem ─► stage1 ─► stage2 ─► … ─► stageN ─► pool ─► fc        (forward returns fc's output)

* ``stage<k>`` (top-level, k = 1..N) is a *sensing point* (DESIGN.md § MHGD): its output is
  **post-activation** (a ReLU is its last operation) and it halves the resolution except for stage 1.
  ``TappedModel(model, ["stage1", "stage2", "stage3"])`` gives MHGD's sensing points;
  add ``"fc"`` to the taps to get the logits from the same forward pass.
* ``stage<k>.body`` is the same point *before* its final ReLU (``stage<k> = act(body(x))``), for
  distillation methods that need pre-activations (AB).
* ``channels`` lists the channel count of every stage — MHGD, KD-SVD and FSP need teacher and student
  to have equal channel counts at the sensing points (:func:`check_same_channels`).

Architectures (``depth``/``width`` follow each family's usual notation):

=================  =======================  ===========================================  =====================
arch               depth                    width                                        default channels
=================  =======================  ===========================================  =====================
``wrn``            6n+4 (16, 28, 40, …)     widen factor k: stages 16k, 32k, 64k          WRN-16-4: 64,128,256
``resnet_cifar``   6n+2 (8, 14, 20, 56, …)  base channels w: stages w, 2w, 4w              w=16: 16, 32, 64
``vgg_cifar``      conv layers (>= stages)  base channels w: stages w, 2w, 4w, 8w          w=64: 64,…,512
``mobilenet_cifar`` IR blocks (>= stages)   base channels w: stages w, 2w, 4w              w=32: 32, 64, 128
=================  =======================  ===========================================  =====================

``widths=(c1, c2, …)`` overrides the stage channels (and the number of stages) of any of them, e.g.
a ResNet or MobileNet student with a WRN-16-4 teacher's (64, 128, 256).

**The default MHGD pair** (:data:`DEFAULT_TEACHER`, :data:`DEFAULT_STUDENT`): a WRN-16-4 teacher
(2 blocks per stage, 2.7 M parameters) and a WRN-10-4 student (1 block per stage, 1.2 M) — same widths
(64, 128, 256) at ``stage1..3``, half the depth. For a VGG pair use ``vgg_cifar`` with
``depth=13`` (teacher) and ``depth=4`` (student) at the same width.

Implementation notes:

* WRN is Zagoruyko & Komodakis' pre-activation network with its batch-norm + ReLU moved: the BN-ReLU
  that opens the first block of a stage (the one whose activated input also feeds the 1×1 shortcut)
  closes the previous stage instead, and the network's final BN-ReLU closes the last stage. The function
  is unchanged (exactly the reference WRN whenever a stage's first block changes width, i.e. k > 1)
  and each stage ends post-activation.
* ResNet is He et al.'s CIFAR ResNet (post-activation basic blocks, 1×1-conv projection shortcuts).
* VGG stages are 3×3 conv-BN-ReLU stacks, a 2×2 max-pool opening every stage but the first.
* MobileNet stages are MobileNetV2 inverted-residual blocks (expand 1×1, depthwise 3×3, linear 1×1
  projection, residual when shapes allow). A ReLU after the last block of each stage makes the sensing
  point post-activation; inside a stage the bottlenecks stay linear.
* Activations are not in-place, so a tapped tensor is never overwritten later in the forward.
* Weights: Kaiming-normal (fan-out) convolutions, unit BN, zero biases (``build_model``'s ``seed``
  makes them reproducible).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mike_ray.errors import ModelError
from mike_ray.models.spec import DEFAULT_STUDENT, DEFAULT_TEACHER  # torch-free: configs name them

__all__ = [
    "CifarClassifier",
    "DEFAULT_STUDENT",
    "DEFAULT_TEACHER",
    "check_same_channels",
    "mobilenet_cifar",
    "resnet_cifar",
    "stage_names",
    "vgg_cifar",
    "wrn",
]



def stage_names(n: int) -> list[str]:
    """``["stage1", …, "stage<n>"]``: the sensing-point paths of a classifier with ``n`` stages."""
    return [f"stage{k}" for k in range(1, n + 1)]


# --------------------------------------------------------------------------------------------
# Shared pieces


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU())


class Stage(nn.Module):
    """One sensing point: ``act(body(x))``; ``body`` ends pre-activation, ``act`` is a ReLU."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x))


class CifarClassifier(nn.Module):
    """``stem → stage1 … stageN → global average pool → fc`` (see the module docstring).

    Attributes:
        channels: output channels of each stage, in order.
        num_classes: logits per sample.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], channels: Sequence[int],
                 num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = stem
        for k, stage in enumerate(stages, start=1):
            self.add_module(f"stage{k}", stage)
        self.num_stages = len(stages)
        self.channels = tuple(int(c) for c in channels)
        self.num_classes = int(num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.channels[-1], self.num_classes)
        _init(self)

    @property
    def sensing_points(self) -> list[str]:
        """``["stage1", …]``: the stage paths (post-activation outputs)."""
        return stage_names(self.num_stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{k}")(x)
        return self.fc(self.dropout(self.flatten(self.pool(x))))


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)  # PyTorch's default, made explicit
            nn.init.zeros_(m.bias)


def _check(arch: str, field: str, value: Any, minimum: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ModelError(f"model '{arch}': {field} must be >= {minimum}, got {value!r}")


def _widths(arch: str, widths: Sequence[int] | None, default: Sequence[int]) -> list[int]:
    out = list(default if widths is None else widths)
    if not out or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in out):
        raise ModelError(f"model '{arch}': widths must be a non-empty list of positive integers, got {widths!r}")
    return out


def _spread(total: int, slots: int) -> list[int]:
    """``total`` items over ``slots`` as evenly as possible, extras to the deeper slots."""
    q, r = divmod(total, slots)
    return [q + (1 if i >= slots - r else 0) for i in range(slots)]


# --------------------------------------------------------------------------------------------
# WideResNet


class WRNBlock(nn.Module):
    """Pre-activation WRN basic block. ``preact=False`` for a stage's first block (input already activated)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float, preact: bool) -> None:
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU()) if preact else nn.Identity()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = _conv1x1(cin, cout, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: Tensor) -> Tensor:
        o = self.preact(x)
        y = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wrn(depth: int = 16, width: int = 4, num_classes: int = 100, *, widths: Sequence[int] | None = None,
        dropout: float = 0.0) -> CifarClassifier:
    """WRN-``depth``-``width`` (Zagoruyko & Komodakis 2016), CIFAR layout: (depth − 4)/6 blocks per stage.

    Args:
        depth: 6n + 4 (10, 16, 22, 28, 40, …).
        width: widen factor k; stages have 16k, 32k, 64k channels.
        num_classes: logits.
        widths: explicit stage channels (overrides ``width``; its length sets the number of stages).
        dropout: dropout between the two convolutions of each block (WRN's), and before ``fc``: no.
    """
    _check("wrn", "width", width, 1)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ModelError(f"model 'wrn': depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
    chans = _widths("wrn", widths, [16 * width, 32 * width, 64 * width])
    n = (depth - 4) // 6
    stem = nn.Sequential(_conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU())  # the BN-ReLU of block 1
    stages, cin = [], 16
    for k, cout in enumerate(chans):
        blocks: list[tuple[str, nn.Module]] = []
        for b in range(n):
            stride = 2 if (k > 0 and b == 0) else 1
            blocks.append((f"block{b + 1}", WRNBlock(cin if b == 0 else cout, cout, stride, dropout, preact=b > 0)))
        blocks.append(("bn", nn.BatchNorm2d(cout)))  # the next stage's first BN (or the final one)
        stages.append(Stage(nn.Sequential(OrderedDict(blocks))))
        cin = cout
    return CifarClassifier(stem, stages, chans, num_classes)


# --------------------------------------------------------------------------------------------
# ResNet (CIFAR)


class BasicBlock(nn.Module):
    """Post-activation basic block; ``final_act=False`` returns the residual sum before its ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, final_act: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                         if (stride != 1 or cin != cout) else nn.Identity())
        self.act = nn.ReLU() if final_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.act(y + self.shortcut(x))


def resnet_cifar(depth: int = 20, width: int = 16, num_classes: int = 100, *,
                 widths: Sequence[int] | None = None) -> CifarClassifier:
    """CIFAR ResNet-``depth`` (He et al. 2016): (depth − 2)/6 basic blocks per stage.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 56, …).
        width: channels of the first stage; the others double (w, 2w, 4w).
        num_classes: logits.
        widths: explicit stage channels (overrides ``width``).
    """
    _check("resnet_cifar", "width", width, 1)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ModelError(f"model 'resnet_cifar': depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}")
    chans = _widths("resnet_cifar", widths, [width, 2 * width, 4 * width])
    n = (depth - 2) // 6
    stem = nn.Sequential(_conv3x3(3, chans[0]), nn.BatchNorm2d(chans[0]), nn.ReLU())
    stages, cin = [], chans[0]
    for k, cout in enumerate(chans):
        blocks = [(f"block{b + 1}", BasicBlock(cin if b == 0 else cout, cout, 2 if (k > 0 and b == 0) else 1,
                                               final_act=b < n - 1)) for b in range(n)]
        stages.append(Stage(nn.Sequential(OrderedDict(blocks))))
        cin = cout
    return CifarClassifier(stem, stages, chans, num_classes)


# --------------------------------------------------------------------------------------------
# VGG (CIFAR)


def vgg_cifar(depth: int = 13, width: int = 64, num_classes: int = 100, *,
              widths: Sequence[int] | None = None, dropout: float = 0.0) -> CifarClassifier:
    """VGG with batch norm for CIFAR: ``depth`` 3×3 conv layers over 4 stages (w, 2w, 4w, 8w).

    Args:
        depth: number of conv layers, spread over the stages as evenly as possible (extras deeper):
            13 → 3,3,3,4; 8 → 2,2,2,2; 4 → 1,1,1,1. Must be >= the number of stages.
        width: channels of the first stage; doubling per stage.
        num_classes: logits (one linear layer after global average pooling).
        widths: explicit stage channels (overrides ``width`` and the number of stages).
        dropout: before ``fc``.
    """
    _check("vgg_cifar", "width", width, 1)
    chans = _widths("vgg_cifar", widths, [width, 2 * width, 4 * width, 8 * width])
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < len(chans):
        raise ModelError(f"model 'vgg_cifar': depth (conv layers) must be an integer >= {len(chans)} "
                         f"(one per stage), got {depth!r}")
    stages, cin = [], 3
    for k, (cout, n) in enumerate(zip(chans, _spread(depth, len(chans)))):
        layers: list[tuple[str, nn.Module]] = []
        if k > 0:
            layers.append(("pool", nn.MaxPool2d(2)))
        for i in range(n):
            last = i == n - 1
            conv = nn.Sequential(_conv3x3(cin, cout), nn.BatchNorm2d(cout)) if last else _conv_bn_relu(cin, cout)
            layers.append((f"conv{i + 1}", conv))
            cin = cout
        stages.append(Stage(nn.Sequential(OrderedDict(layers))))
    return CifarClassifier(nn.Identity(), stages, chans, num_classes, dropout=dropout)


# --------------------------------------------------------------------------------------------
# MobileNet (V2-style)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand + BN + ReLU6, 3×3 depthwise + BN + ReLU6, 1×1 linear projection + BN."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(round(cin * expand_ratio)))
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [_conv1x1(cin, hidden), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [_conv3x3(hidden, hidden, stride, groups=hidden), nn.BatchNorm2d(hidden), nn.ReLU6(),
                   _conv1x1(hidden, cout), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


def mobilenet_cifar(depth: int = 6, width: int = 32, num_classes: int = 100, *,
                    widths: Sequence[int] | None = None, expand_ratio: float = 6.0,
                    dropout: float = 0.0) -> CifarClassifier:
    """MobileNetV2-style CIFAR classifier: ``depth`` inverted-residual blocks over 3 stages (w, 2w, 4w).

    Args:
        depth: inverted-residual blocks, spread over the stages (extras deeper); >= the number of stages.
        width: channels of the first stage; doubling per stage. The stem is a 3×3 conv to ``width``
            channels (stride 1, CIFAR-style).
        num_classes: logits.
        widths: explicit stage channels (overrides ``width`` and the number of stages).
        expand_ratio: MobileNetV2's expansion t (6).
        dropout: before ``fc``.
    """
    _check("mobilenet_cifar", "width", width, 1)
    _check("mobilenet_cifar", "expand_ratio", expand_ratio, 1e-6)
    chans = _widths("mobilenet_cifar", widths, [width, 2 * width, 4 * width])
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < len(chans):
        raise ModelError(f"model 'mobilenet_cifar': depth (blocks) must be an integer >= {len(chans)}, got {depth!r}")
    stem_c = chans[0]
    stem = nn.Sequential(_conv3x3(3, stem_c), nn.BatchNorm2d(stem_c), nn.ReLU())
    stages, cin = [], stem_c
    for k, (cout, n) in enumerate(zip(chans, _spread(depth, len(chans)))):
        blocks = [(f"block{b + 1}", InvertedResidual(cin if b == 0 else cout, cout,
                                                     2 if (k > 0 and b == 0) else 1, expand_ratio))
                  for b in range(n)]
        stages.append(Stage(nn.Sequential(OrderedDict(blocks))))
        cin = cout
    return CifarClassifier(stem, stages, chans, num_classes, dropout=dropout)


# --------------------------------------------------------------------------------------------
# Channel check


@torch.no_grad()
def _point_channels(model: nn.Module, points: Sequence[str], image_size: int) -> list[int]:
    from mike_ray.models.taps import TappedModel

    shapes = TappedModel(model, list(points), method="hooks").shapes((3, image_size, image_size))
    return [int(s[0]) for s in shapes.values()]


def check_same_channels(teacher: nn.Module, student: nn.Module, teacher_points: Sequence[str],
                        student_points: Sequence[str] | None = None, image_size: int = 32,
                        *, what: str = "MHGD") -> list[int]:
    """Raise :class:`ModelError` unless teacher and student have equal channels at their sensing points.

    Runs one dummy forward of each (eval mode, flags restored). Returns the channel counts.
    """
    student_points = list(teacher_points if student_points is None else student_points)
    if len(student_points) != len(teacher_points):
        raise ModelError(f"{what}: {len(teacher_points)} teacher sensing points but {len(student_points)} "
                         f"student sensing points")
    ct = _point_channels(teacher, teacher_points, image_size)
    cs = _point_channels(student, student_points, image_size)
    for pt, ps, a, b in zip(teacher_points, student_points, ct, cs):
        if a != b:
            raise ModelError(f"{what}: teacher and student need equal channels at each sensing point: "
                             f"teacher '{pt}' has {a}, student '{ps}' has {b} (teacher {ct}, student {cs})")
    return ct
