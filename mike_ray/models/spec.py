"""What a model spec may say, as a pydantic model — torch-free, so a sweep file validates without torch.

The builders are :mod:`mike_ray.models.registry` (``build_model``); this module holds only the
fields a spec may carry, the default MHGD pair and :func:`import_archs` — what configs need before
any model is built.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from mike_ray.config_base import StrictModel

__all__ = ["DEFAULT_STUDENT", "DEFAULT_TEACHER", "ModelSpec", "import_archs"]

DEFAULT_TEACHER: dict[str, Any] = {"arch": "wrn", "depth": 16, "width": 4}
"""WRN-16-4: sensing points ``stage1..3`` with 64, 128, 256 channels."""
DEFAULT_STUDENT: dict[str, Any] = {"arch": "wrn", "depth": 10, "width": 4}
"""WRN-10-4: same widths as :data:`DEFAULT_TEACHER`, one block per stage instead of two."""


class ModelSpec(StrictModel):
    """How to build one model. Unset fields take the architecture's defaults.

    ``arch`` is ``"segmenter"``, ``"autoencoder"``, a torchvision classification model name
    (``"resnet18"``, ``"mobilenet_v3_small"``, ``"efficientnet_b0"``, ...; see
    :func:`available_archs`) or ``"package.module:callable"`` returning an ``nn.Module``.
    """

    arch: str = Field(min_length=1)
    num_classes: int | None = Field(None, ge=1, description="output channels/classes")
    width: int | None = Field(None, ge=1, description="segmenter/autoencoder: full-resolution channels")
    depth: int | None = Field(None, ge=1, description="segmenter: MBConv blocks; autoencoder: per side")
    num_downsamples: int | None = Field(None, ge=0, description="segmenter/autoencoder: stride-2 levels")
    expand_ratio: float | None = Field(None, gt=0, description="segmenter/autoencoder: MBConv expansion")
    embed_channels: int | None = Field(None, ge=1, description="autoencoder: embedding channels C")
    stem_stride: Literal[1, 2] | None = Field(None, description="segmenter/autoencoder: 2 runs the blocks at "
                                              "half resolution (≈4× cheaper; CPU profiles)")
    seed: int | None = Field(None, description="initialise from this seed (global RNG left untouched)")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="extra builder arguments (e.g. kernel_size, dropout)")


def import_archs(tree: Any) -> frozenset[str]:
    """Every ``arch`` value of the form ``package.module:callable`` anywhere in ``tree`` (a resolved
    sweep config as plain dicts/lists): the code the running sweep file itself asks to import."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            arch = node.get("arch")
            if isinstance(arch, str) and ":" in arch:
                found.add(arch)
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(tree)
    return frozenset(found)
