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
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    # shut down only what this session started (never `ray stop`)
    ray.shutdown()
