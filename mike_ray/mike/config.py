"""MIKE's config sections as pydantic models — torch-free, so a sweep file validates without torch.

The transfer run (:class:`TransferConfig`, read by :mod:`mike_ray.mike.train`), the downstream decoders
(:class:`DownstreamConfig`, :mod:`mike_ray.mike.downstream`) and the teacher zoo (:class:`ZooConfig`,
:mod:`mike_ray.mike.zoo`); :mod:`mike_ray.mhgd.config` is MHGD's counterpart.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mike_ray.config_base import StrictModel
from mike_ray.data.query import QueryConfig
from mike_ray.data.tasks import TASK_CODES, table_of
from mike_ray.mike.schedules import ScheduleConfig
from mike_ray.zoo import TeacherPlacement

__all__ = ["DownstreamConfig", "IMAGENET_MEAN", "IMAGENET_STD", "InputConfig", "QueryConfig", "SegLoss",
           "TeacherEntry", "TeacherTrainConfig", "TransferConfig", "ZooConfig", "query_tasks"]

SegLoss = Literal["bce", "bce_dice"]
"""The downstream decoders' loss (``mike_ray.metrics.segmentation_loss``)."""


class TransferConfig(StrictModel):
    """What one transfer run trains and how (the worker's slice of a trial's config)."""

    method: Literal["mike", "pixel"] = "mike"
    model: dict[str, Any] = Field(default_factory=lambda: {"arch": "autoencoder", "width": 8, "embed_channels": 2})
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    masking: bool = True
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    threads: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    val_batches: int | None = Field(None, gt=0)  # cap on validation batches (None: all)
    # how a trainer worker holds the query set: "mmap" maps a decoded cache (the workers of a node
    # share it in the page cache; a COCO-sized query set is ~12 GB), "ram" loads it into the worker
    query_memory: Literal["mmap", "ram"] = "mmap"


class DownstreamConfig(StrictModel):
    """How the decoder is retrained on each downstream task."""

    tasks: list[str] = Field(default_factory=lambda: list(TASK_CODES))
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    reinit_decoder: bool = False
    # bce_dice: BCE + soft Dice (see metrics.segmentation_loss); bce: what the teachers train with
    loss: SegLoss = "bce_dice"
    max_train_samples: int | None = Field(None, gt=0)
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)
    threads: int = Field(1, gt=0)
    device: str = "auto"
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str], info: ValidationInfo) -> list[str]:
        table = table_of(info)
        bad = [t for t in v if t not in table]
        if bad or not v:
            raise ValueError(f"unknown task {bad[0]!r} (known: {', '.join(table)})" if bad
                             else "at least one task is required")
        return v


class TeacherTrainConfig(StrictModel):
    """How each teacher segmenter is trained (same for every task)."""

    epochs: int = Field(6, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    max_train_samples: int | None = Field(None, gt=0)


class ZooConfig(TeacherPlacement):
    """The teacher zoo: which tasks, which architecture, how it is trained and placed."""

    tasks: list[str] = Field(default_factory=lambda: list(TASK_CODES))
    model: dict[str, Any] = Field(default_factory=lambda: {"arch": "segmenter", "width": 8})
    taps: str | list[str] = "blocks"
    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if not v:
            raise ValueError("at least one task is required")
        table = table_of(info)
        unknown = [t for t in v if t not in table]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r} (known: {', '.join(table)})")
        if len(set(v)) != len(v):
            raise ValueError("tasks repeat")
        return v


# --- your own teachers (the ``teachers:`` section) and the query set (``query:``) ----------------------
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class InputConfig(StrictModel):
    """How the shared input space (B×3×H×W RGB in [0, 1], the query crops and the reconstructions)
    maps to what a teacher was trained on. The shard applies it inside autograd, so ∂loss/∂x̄ stays
    exact: first the resize (bilinear), then ``(x − mean) / std`` per channel.

    ``input: imagenet`` is short for ImageNet's mean/std (torchvision's pretrained models);
    ``input: none`` (the default) passes [0, 1] RGB unchanged.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: int | tuple[int, int] | None = None  # resize to size×size (or H×W) before the teacher

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        if v == "imagenet":
            return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        if v in ("none", None):
            return {}
        if isinstance(v, str):
            raise ValueError(f"unknown preset {v!r}: use 'imagenet', 'none' or a mapping of mean, std, size")
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not s > 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sizes = [v] if isinstance(v, int) else list(v or ())
        if any(s < 8 or s > 4096 for s in sizes):
            raise ValueError(f"sizes must be 8..4096 pixels, got {v}")
        return v


class TeacherEntry(StrictModel):
    """One network to distil that mike_ray did not train (a ``teachers:`` entry, by name).

    ``model``: an arch name (our own, any torchvision classification, segmentation or detection
    model) or a model spec mapping (``arch`` + options, see :class:`mike_ray.models.spec.ModelSpec`);
    an ``package.module:callable`` arch is allowed here, in the sweep file you run.
    ``weights``: a state-dict file (loaded with ``weights_only=True``); ``weights_key``: the key the
    state dict sits under inside the file (``state_dict``, ``model``); ``strip_prefix``: removed
    from every key that has it (``module.`` from DataParallel/DDP checkpoints).
    ``taps``: module paths of the model, glob patterns or a rule (``blocks``: every top-level child;
    ``backbone.*``; ``layer*``), plus ``output`` for the model's (selected) output.
    ``output``: which output to use when the model returns a dict or tuple (``out`` for
    torchvision segmentation); only matters when ``output`` is tapped, and is checked either way.
    ``task``: the task code whose query rows this teacher scores (query masking), or none: the
    teacher sees every row.
    """

    model: dict[str, Any]
    weights: str = Field(min_length=1)
    weights_key: str | None = None
    strip_prefix: str | None = None
    taps: str | list[str] = "blocks"
    input: InputConfig = Field(default_factory=InputConfig)
    output: str | int | None = None
    task: str | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _arch_only(cls, v: Any) -> Any:
        return {"arch": v} if isinstance(v, str) else v

    @field_validator("weights")
    @classmethod
    def _absolute(cls, v: str) -> str:
        # relative to where the sweep is launched (like data.coco_root); shards on other nodes read it
        # from the same path, so on a cluster it lies on shared storage
        from pathlib import Path

        return str(Path(v).expanduser().absolute())

    @field_validator("taps")
    @classmethod
    def _taps(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and (not v or not all(t.strip() for t in v))):
            raise ValueError("give at least one module path, pattern or rule")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None, info: ValidationInfo) -> str | None:
        table = table_of(info)
        if v is not None and v not in table:
            raise ValueError(f"unknown task {v!r} (known: {', '.join(table)}; or leave it out: the teacher "
                             f"sees every query row)")
        return v


def query_tasks(query: QueryConfig, entries: dict[str, TeacherEntry], teachers: list[str]) -> list[str]:
    """The query tasks of a trial with these teachers: ``query.tasks``, or the teachers' own tasks (a
    zoo teacher's is its name, an entry's its ``task``; entries without one add none); none for a
    folder or COCO query set (its rows carry no task)."""
    if query.source != "tasks":
        return []
    if query.tasks:
        return list(query.tasks)
    own = [entries[t].task if t in entries else t for t in teachers]
    return list(dict.fromkeys(t for t in own if t is not None))
