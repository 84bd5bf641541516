"""Shared fixtures: one thread, one local Ray instance per test session, tiny generated data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Determinism and fairness on a 2-core machine: one intra-op thread everywhere in the test process.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's usage-stats prompt and the metrics exporter are noise in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray instance (2 logical CPUs) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}})
    yield ray
    # shut down only what this session started (never `ray stop`)
    ray.shutdown()


TINY_TASKS = ["DCH", "CTB", "PHB"]
TINY_SEGMENTER = {"arch": "segmenter", "width": 4, "depth": 7, "expand_ratio": 2.0, "stem_stride": 2,
                  "num_downsamples": 2}
TINY_AE = {"arch": "autoencoder", "width": 4, "depth": 3, "expand_ratio": 2.0, "stem_stride": 2,
           "num_downsamples": 2, "embed_channels": 2}


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A real generated COCO-format dataset (60 images), prepared into Parquet shards for 3 tasks."""
    from mike_ray.data.coco import PrepareConfig
    from mike_ray.data.shards import prepare_dataset
    from mike_ray.data.synth import generate_coco

    coco = tmp_path_factory.mktemp("coco")
    generate_coco(coco, n_images=60, seed=0)
    cfg = PrepareConfig(tasks=TINY_TASKS, augment_copies=1)
    return prepare_dataset(cfg, coco, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def tiny_zoo(tiny_prepared, ray_local, tmp_path_factory) -> Path:
    """Three tiny teachers trained for one epoch as real Ray tasks (stored like any zoo)."""
    from mike_ray.teachers.zoo import ZooConfig, build_zoo

    cfg = ZooConfig(tasks=TINY_TASKS, model=TINY_SEGMENTER, cpus_per_teacher=0.5,
                    train={"epochs": 1, "max_train_samples": 64, "batch_size": 32})
    return build_zoo(cfg, tiny_prepared, tmp_path_factory.mktemp("out"), progress=False)
