"""Where work runs: teacher shards (:class:`PlacementConfig`) and trainer workers (:class:`WorkersConfig`).

Plain config models, below every method and orchestration module: the sweep config, both methods'
shards and both trial drivers read them.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from mike_ray.config_base import StrictModel


# Ray's own resource names: a custom resource must not shadow them
_BUILTIN = {"CPU": "cpus_per_", "GPU": "gpus_per_", "memory": None, "object_store_memory": None}


def _check_custom(v: dict[str, float], unit: str) -> dict[str, float]:
    """Custom resources: names Ray does not define itself, amounts ≥ 0 (CPU/GPU have their own fields)."""
    for name, amount in v.items():
        if name in _BUILTIN:
            field = f"{_BUILTIN[name]}{unit}" if _BUILTIN[name] else None
            raise ValueError(f"'{name}' is not a custom resource" + (f": use {field}" if field else ""))
        if not amount >= 0:
            raise ValueError(f"'{name}': {amount}, an amount must be ≥ 0")
    return v


def _bundle(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom}


class PlacementConfig(StrictModel):
    """Where teachers run.

    ``teachers_per_shard``: k (consecutive teachers, k per shard), "all" (one shard), or "auto":
    ``num_shards`` shards, teachers assigned so that every shard has about the same expected work
    per step (:func:`partition`; under masking a teacher's work is its task's share of the query
    rows × its forward cost, so a teacher of a rare task is cheap). ``num_shards`` applies to "auto"
    only.
    """

    mode: Literal["ray", "local"] = "ray"
    teachers_per_shard: Annotated[int, Field(ge=1)] | Literal["all", "auto"] = 1
    num_shards: int = Field(2, ge=1)
    cpus_per_shard: float = Field(1.0, ge=0)
    gpus_per_shard: float = Field(0.0, ge=0)
    # custom Ray resources each shard also takes, e.g. {teacher_shard: 1}: only nodes that offer it
    # (cluster/aws.yaml's teacher_gpu) can hold a shard, and the autoscaler launches such a node for it
    resources: dict[str, float] = Field(default_factory=dict)
    threads: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False  # bf16 autocast for teacher forwards; the loss and its gradient stay float32
    # a shard's teachers of one architecture with at most this many rows in a batch run as one grouped
    # forward (0: never). Few rows per teacher is where per-launch overhead dominates: measured on 2 CPU
    # cores, grouping paid from ~2 rows each (1.5× at 1 row) and cost up to 1.2× at 6–21 rows
    # (docs/benchmarks.md); on a GPU, where launches cost more, a larger value pays.
    group_rows: int = Field(4, ge=0)
    max_restarts: int = Field(3, ge=0)  # Ray restarts a dead shard this many times
    step_retries: int = Field(3, ge=0)  # a step whose shard died is sent again this many times
    # how long a step waits for a dead shard to come back (Ray restarts it; its constructor reloads the
    # teachers, which on a cold node means imports and weights: many seconds)
    restart_timeout_s: float = Field(300.0, gt=0)

    @field_validator("resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom(v, "shard")

    @property
    def bundle(self) -> dict[str, float]:
        """What one shard takes, as a Ray resource bundle (GPU only when asked for, custom ones added)."""
        return _bundle(self.cpus_per_shard, self.gpus_per_shard, self.resources)


class WorkersConfig(StrictModel):
    """Trainer workers (DDP): how many, and what each takes."""

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    # custom Ray resources each trainer worker also takes, e.g. {trainer: 1} (cluster/aws.yaml's trainer_gpu)
    resources: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the last checkpoint

    @field_validator("resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom(v, "worker")

    @property
    def bundle(self) -> dict[str, float]:
        """What one trainer worker takes, as a Ray resource bundle (Train's ``resources_per_worker``)."""
        return _bundle(self.cpus_per_worker, self.gpus_per_worker, self.resources)
