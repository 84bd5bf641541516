"""Segmentation metrics shared by the teacher zoo and the downstream evaluation."""
from __future__ import annotations

import math

import torch


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
