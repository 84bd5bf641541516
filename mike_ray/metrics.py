"""Segmentation metrics shared by the teacher zoo and the downstream evaluation."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

SegLoss = Literal["bce", "bce_dice"]


class IoUMeter:
    """Dataset-level IoU per mask channel: Σ|P∧G| / Σ|P∨G| accumulated over batches.

    P = sigmoid(logits) > 0.5 (equivalently logits > 0), G = mask > 0.5. A channel with no
    ground-truth and no predicted pixels in the whole set has no IoU (NaN) and is left out of the mean.
    """

    def __init__(self, channels: int = 3) -> None:
        self.inter = torch.zeros(channels, dtype=torch.float64)
        self.union = torch.zeros(channels, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """logits, mask: B×K×H×W (mask in {0,1})."""
        pred = logits > 0
        gt = mask > 0.5
        dims = (0, 2, 3)
        self.inter += (pred & gt).sum(dims).double().cpu()
        self.union += (pred | gt).sum(dims).double().cpu()

    def per_class(self) -> list[float]:
        return [float(i / u) if u > 0 else math.nan for i, u in zip(self.inter, self.union)]

    def mean(self) -> float:
        vals = [v for v in self.per_class() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan


def prevalence_iou(mask: torch.Tensor) -> list[float]:
    """IoU of the trivial 'every pixel is this class' predictor, per channel: the chance level.

    mask: N×K×H×W in {0,1}. For that predictor IoU = |G| / (N·H·W), the class's pixel share.
    """
    gt = mask > 0.5
    total = gt[:, 0].numel()
    return [float(gt[:, k].sum()) / total for k in range(mask.shape[1])]


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − mean over channels of (2·Σ p·g + s) / (Σ p + Σ g + s), sums over the batch and pixels.

    logits, mask: B×K×H×W; p = sigmoid(logits). Summing over the whole batch (not per image) keeps
    an image without the class from dominating; ``smooth`` keeps empty channels at loss 0.
    """
    p = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (p * mask).sum(dims)
    dice = (2 * inter + smooth) / (p.sum(dims) + mask.sum(dims) + smooth)
    return 1 - dice.mean()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, kind: SegLoss = "bce") -> torch.Tensor:
    """Mask loss for B×K×H×W logits against a {0,1} mask: per-pixel BCE, plus soft Dice for ``bce_dice``.

    Why Dice: foreground is a small share of the pixels, and with BCE alone a short run on a weak
    embedding settles on "all background" (IoU 0), which hides the difference between encoders.
    """
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    return bce if kind == "bce" else bce + soft_dice_loss(logits, mask)
