"""The Train V2 transfer loop: DDP over two workers, resume from the latest checkpoint, NaN stops."""
from __future__ import annotations

import pytest

from conftest import TINY_AE
from mike_ray.errors import TrainingError
from mike_ray.mike.train import TransferConfig
from mike_ray.resources import PlacementConfig, WorkersConfig
from mike_ray.orchestrate.transfer import run_transfer

pytestmark = pytest.mark.slow


def test_ddp_over_two_workers_then_resume_from_the_checkpoint(tiny_prepared, ray_local, tmp_path) -> None:
    workers = WorkersConfig(num_workers=2, cpus_per_worker=0.5)
    cfg = TransferConfig(method="pixel", model=TINY_AE, epochs=1, batch_size=16, val_batches=1, device="cpu")
    first = run_transfer(cfg, [], tiny_prepared, ["DCH", "CTB"], PlacementConfig(), workers, tmp_path, "ddp")
    assert [h["epoch"] for h in first.history] == [0]
    # the same run name with more epochs resumes after epoch 0 instead of starting over
    more = cfg.model_copy(update={"epochs": 2})
    second = run_transfer(more, [], tiny_prepared, ["DCH", "CTB"], PlacementConfig(), workers, tmp_path, "ddp")
    assert [h["epoch"] for h in second.history] == [0, 1]
    assert second.history[0] == first.history[0]  # epoch 0 came from the checkpoint, not re-run


def test_a_diverging_run_stops_with_a_one_line_training_error(tiny_prepared, ray_local, tmp_path) -> None:
    cfg = TransferConfig(method="pixel", model=TINY_AE, epochs=2, batch_size=16, lr=1e30, device="cpu")
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch \d+ step \d+") as err:
        run_transfer(cfg, [], tiny_prepared, ["DCH"], PlacementConfig(),
                     WorkersConfig(num_workers=1, cpus_per_worker=0.5, max_failures=0), tmp_path, "nan")
    assert "\n" not in str(err.value)
