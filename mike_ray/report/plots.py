"""Radar charts (paper figs. 3–4), layerwise loss curves (figs. 5–6), reconstruction grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def radar_chart(series: Mapping[str, Mapping[str, float]], path: str | Path, title: str = "",
                spokes: Sequence[str] | None = None) -> Path:
    """One spoke per task, one polygon per encoder (e.g. MIKE vs the pixel baseline).

    series: label → task → value (normalised IoU). Missing/NaN values are drawn at 0. The legend
    shows each series' mean over its finite values.
    """
    spokes = list(spokes or next(iter(series.values())).keys())
    angles = np.linspace(0, 2 * np.pi, len(spokes), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(5.5, 5.5), subplot_kw={"polar": True})
    for label, vals in series.items():
        v = [vals.get(s, math.nan) for s in spokes]
        finite = [a for a in v if not math.isnan(a)]
        mean = sum(finite) / len(finite) if finite else math.nan
        closed = [0.0 if math.isnan(a) else a for a in v]
        ax.plot(angles + angles[:1], closed + closed[:1], label=f"{label} (mean {mean:.3f})")
        ax.fill(angles + angles[:1], closed + closed[:1], alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels(spokes)
    ax.set_title(title)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=8)
    return _save(fig, path)


def layerwise_loss(history: Sequence[Mapping[str, float]], prefix: str, path: str | Path,
                   title: str = "") -> Path:
    """Per-tap loss over epochs: every metric named ``<prefix>/<teacher>/<tap>`` is one curve."""
    keys = sorted({k for h in history for k in h if k.startswith(prefix + "/") and k.count("/") > prefix.count("/") + 1})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        xs = [h.get("epoch", i) for i, h in enumerate(history) if k in h]
        ax.plot(xs, [h[k] for h in history if k in h], label=k[len(prefix) + 1:])
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (unweighted tap term)")
    ax.set_title(title)
    if keys:
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def recon_grid(x: np.ndarray, xbar: np.ndarray, path: str | Path, n: int = 8) -> Path:
    """Originals (top row) above reconstructions (bottom row). x, xbar: N×3×H×W in [0,1]."""
    n = min(n, len(x))
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 2.8))
    axes = np.asarray(axes).reshape(2, n)
    for i in range(n):
        for row, img in enumerate((x[i], xbar[i])):
            axes[row, i].imshow(np.clip(np.transpose(img, (1, 2, 0)), 0, 1))
            axes[row, i].axis("off")
    axes[0, 0].set_title("x", fontsize=8, loc="left")
    axes[1, 0].set_title("x̄", fontsize=8, loc="left")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_curve(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Train and val accuracy per epoch (MHGD student; phase-1 epochs, which have none, are skipped)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, label in (("acc/val", "val"), ("acc/train", "train")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("epoch (phase 1 / initialisation epochs first)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
