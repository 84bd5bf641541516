"""The sweep file: YAML → validated pydantic models, before anything starts.

A sweep file declares the data source, the teacher zoo, the method, fixed settings, the search
space, the Optuna study, resources and the MLflow destination (DESIGN.md "Sweeps"). Unknown keys
and wrong types are :class:`~mike_ray.errors.ConfigError` naming the field path; every section has
full defaults, so a sweep file is a small diff on top of them (DINOv2-style).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mike_ray.config_base import StrictModel, load_yaml, validate
from mike_ray.data.coco import PrepareConfig
from mike_ray.data.tasks import TASK_CODES, TASKS
from mike_ray.errors import ConfigError
from mike_ray.mike.downstream import DownstreamConfig
from mike_ray.mike.train import TransferConfig
from mike_ray.orchestrate.transfer import WorkersConfig
from mike_ray.teachers.shard import PlacementConfig
from mike_ray.teachers.zoo import ZooConfig


class GenerateConfig(StrictModel):
    """The embedded default: a COCO-format dataset mike_ray draws itself."""

    images: int = Field(1000, ge=10)
    seed: int = Field(0, ge=0)


class DataConfig(StrictModel):
    """Where the COCO-format source is, and how it is cut into task crops."""

    source: Literal["generated", "coco"] = "generated"
    coco_root: str | None = None  # required for source "coco": annotations/instances_<split>.json + images
    splits: list[str] | None = None
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)

    @model_validator(mode="after")
    def _coco_root(self) -> "DataConfig":
        if self.source == "coco":
            if not self.coco_root:
                raise ValueError("data.coco_root is required when data.source is 'coco'")
            ann = Path(self.coco_root) / "annotations"
            if not ann.is_dir():
                raise ValueError(f"data.coco_root: {ann} not found (expected annotations/instances_<split>.json)")
        return self


class Range(StrictModel):
    """A numeric search range (Optuna suggest_float/suggest_int)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    int: bool = False

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self


Choice = list[Any]


class SearchConfig(StrictModel):
    """Search dimensions. A list is a categorical choice, a mapping a numeric range; unset → fixed."""

    teacher_subset: list[str] | None = None  # names from ``teacher_subsets``
    embed_channels: list[int] | Range | None = None
    schedule: list[Literal["uniform", "last_layer", "layerwise_progressive", "adaptive"]] | None = None
    pretrain_fraction: list[float] | Range | None = None
    num_phases: list[int] | None = None  # layerwise_progressive only (define-by-run)
    lr: list[float] | Range | None = None

    @field_validator("embed_channels")
    @classmethod
    def _embed(cls, v):
        vals = v if isinstance(v, list) else ([v.low, v.high] if v is not None else [])
        for c in vals:
            if not (1 <= c <= 64) or int(c) != c:
                raise ValueError(f"embedding channels must be integers in 1..64, got {c}")
        if isinstance(v, list) and not v:
            raise ValueError("empty choice list")
        return v

    @field_validator("teacher_subset", "schedule", "pretrain_fraction", "num_phases", "lr")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty choice list")
        return v


class StudyConfig(StrictModel):
    """The Optuna study run by Tune."""

    objective: str = "score/mean_norm_iou"
    direction: Literal["max", "min"] = "max"
    trials: int = Field(4, ge=1)
    concurrency: int = Field(1, ge=1)
    seed: int = 0
    repeats: int = Field(1, ge=1)  # seeds per configuration; summaries give mean ± std
    baselines: bool = True  # one pixel-MSE autoencoder per teacher subset, same query data


class ResourcesConfig(StrictModel):
    """Where work runs: teacher shards, trainer workers, the trial driver, downstream tasks."""

    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    trial_cpus: float = Field(0.0, ge=0)  # the trial driver only waits on others
    ray_address: str | None = None  # None: $RAY_ADDRESS or a new local instance
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a new local instance


class MlflowConfig(StrictModel):
    """MLflow destination (default: a sqlite store under ``output``)."""

    tracking_uri: str | None = None
    experiment: str = "mike_ray"


class SweepConfig(StrictModel):
    """A whole sweep file."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    output: str = "outputs"
    data: DataConfig = Field(default_factory=DataConfig)
    zoo: ZooConfig = Field(default_factory=ZooConfig)
    method: Literal["mike", "pixel"] = "mike"
    teacher_subsets: dict[str, list[str] | Literal["all"]] = Field(default_factory=lambda: {"all": "all"})
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("teacher_subsets")
    @classmethod
    def _subsets(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("at least one teacher subset is required")
        for name, teachers in v.items():
            if teachers == "all":
                continue
            if not teachers:
                raise ValueError(f"subset '{name}' is empty")
            bad = [t for t in teachers if t not in TASKS]
            if bad:
                raise ValueError(f"subset '{name}': unknown teacher '{bad[0]}' (known: {', '.join(TASK_CODES)})")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "SweepConfig":
        zoo = set(self.zoo.tasks)
        for name, teachers in self.teacher_subsets.items():
            missing = [t for t in self.subset(name) if t not in zoo]
            if missing:
                raise ValueError(f"teacher_subsets.{name}: teacher '{missing[0]}' is not in zoo.tasks")
            prepared = set(self.data.prepare.tasks)
            if any(t not in prepared for t in self.subset(name)):
                raise ValueError(f"teacher_subsets.{name}: its tasks must be in data.prepare.tasks")
        for name in self.search.teacher_subset or []:
            if name not in self.teacher_subsets:
                raise ValueError(f"search.teacher_subset: '{name}' is not a key of teacher_subsets")
        missing = [t for t in self.downstream.tasks if t not in self.data.prepare.tasks]
        if missing:
            raise ValueError(f"downstream.tasks: '{missing[0]}' is not in data.prepare.tasks")
        return self

    def subset(self, name: str) -> list[str]:
        """Teacher names of a subset ("all" → every zoo teacher)."""
        t = self.teacher_subsets[name]
        return list(self.zoo.tasks) if t == "all" else list(t)

    def output_dir(self) -> Path:
        return Path(self.output).resolve()


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load and validate a sweep file; ``overrides`` are ``dotted.key=yaml_value`` strings."""
    import yaml

    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a mapping")
        node[parts[-1]] = yaml.safe_load(value)
    return validate(SweepConfig, raw, source=str(path))
