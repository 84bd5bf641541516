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


def test_a_mike_transfer_with_one_hundred_teachers_runs_to_completion(tiny_prepared, ray_local, tmp_path) -> None:
    """100 tiny teachers (untrained, 34 + 33 + 33 over the three query tasks, each masked to its task)
    on two shard actors, one TorchTrainer worker: the transfer finishes, and every teacher is
    trained against and validated (its own loss terms in the history, none a constant 0.0)."""
    from conftest import TINY_SEGMENTER, TINY_TASKS
    from mike_ray.data.tasks import TASK_CODES
    from mike_ray.mike.shard import TeacherRef
    from mike_ray.mike.zoo import write_untrained_teachers

    named = [(f"T{i:03d}", TINY_TASKS[i % 3]) for i in range(100)]
    dirs = write_untrained_teachers(tmp_path / "teachers", named, TINY_SEGMENTER)
    refs = [TeacherRef(name=n, path=str(d), task_id=TASK_CODES.index(t)) for (n, t), d in zip(named, dirs)]
    placement = PlacementConfig(mode="ray", teachers_per_shard="auto", num_shards=2, cpus_per_shard=0.5, device="cpu")
    cfg = TransferConfig(model=TINY_AE, epochs=1, batch_size=32, val_batches=1, device="cpu")
    res = run_transfer(cfg, refs, tiny_prepared, TINY_TASKS, placement,
                       WorkersConfig(num_workers=1, cpus_per_worker=0.5), tmp_path / "runs", "hundred")
    (epoch,) = res.history
    assert epoch["epoch"] == 0
    for name, _ in named:
        train = [v for k, v in epoch.items() if k.startswith(f"loss/teacher/{name}/")]
        val = [v for k, v in epoch.items() if k.startswith(f"loss/val/teacher/{name}/")]
        assert train and val, f"teacher {name} was never trained against or validated"
        assert all(v > 0.0 for v in train + val), name
