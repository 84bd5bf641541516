"""Which data a run reads, as pydantic models — torch-free, so a sweep file validates without torch.

:class:`ClassificationData` is the classification section of an MHGD sweep; the readers are
:mod:`mike_ray.data.classification` (``load_splits``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mike_ray.config_base import StrictModel

__all__ = ["ClassificationData"]


class ClassificationData(StrictModel):
    """Which classification data an MHGD run uses (a section of a sweep file)."""

    source: Literal["crops", "cifar100", "tiny_imagenet"] = "crops"
    root: str = Field(min_length=1, description="prepared crops dir / folder holding cifar-100-python / "
                                                "folder holding tiny-imagenet-200")
    image_size: int | None = Field(None, ge=8, description="resize to this side (None: native 64 / 32 / 64)")
    tasks: list[str] | None = Field(None, description="crops only: task codes to read (default: all prepared)")
    limit_train: int | None = Field(None, ge=1, description="seeded subset of the training split")
    limit_val: int | None = Field(None, ge=1, description="seeded subset of the validation split")
    augment: bool = Field(True, description="random crop (padding S/8) + horizontal flip on the training split")
    seed: int = 0

    @model_validator(mode="after")
    def _tasks_only_for_crops(self) -> "ClassificationData":
        if self.tasks is not None and self.source != "crops":
            raise ValueError(f"only the 'crops' source has tasks, not {self.source!r}")
        return self
