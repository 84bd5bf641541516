"""Data stage: COCO (or the generated default) → 11 three-class tasks → 64×64 crops in Parquet.

Public API (see docs/contracts.md):

- :mod:`~mike_ray.data.tasks`: ``TASKS``, ``TASK_CODES``, ``task_id``, ``resolve_task_categories``
- :mod:`~mike_ray.data.synth`: ``generate_coco`` — the embedded default dataset
- :mod:`~mike_ray.data.coco`: ``PrepareConfig``, ``load_coco``, ``read_image``, ``check_coco_root``,
  ``iter_crops`` — the pycocotools reader
- :mod:`~mike_ray.data.shards`: ``prepare_dataset``, ``read_manifest``, ``validate_dataset``, ``check_dataset``,
  ``read_shard``
- :mod:`~mike_ray.data.loaders`: ``ShardDataset``, ``make_loader``, ``ray_dataset`` (imports torch;
  loaded lazily so the CLI and the preparation path start fast)

CLI: ``python -m mike_ray.data {generate,prepare,inspect}``.
"""
from __future__ import annotations

from typing import Any

from mike_ray.data.coco import PrepareConfig, check_coco_root, load_coco, read_image
from mike_ray.data.shards import (Manifest, check_dataset, prepare_dataset, read_manifest, read_shard,
                                  validate_dataset)
from mike_ray.data.synth import generate_coco
from mike_ray.data.tasks import TASK_CODES, TASKS, resolve_task_categories, task_id

_LAZY = {"ShardDataset", "make_loader", "ray_dataset", "identity_collate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mike_ray.data import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'mike_ray.data' has no attribute {name!r}")


__all__ = ["TASKS", "TASK_CODES", "task_id", "resolve_task_categories", "generate_coco", "PrepareConfig",
           "load_coco", "read_image", "check_coco_root", "Manifest", "prepare_dataset", "read_manifest", "read_shard",
           "validate_dataset", "check_dataset",
           "ShardDataset", "make_loader", "ray_dataset", "identity_collate"]
