"""The Train V2 transfer loop: DDP over two workers, resume from the latest checkpoint, NaN stops."""
from __future__ import annotations

import pytest

from conftest import TINY_AE, kill_train_worker_after_first_checkpoint
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


def test_a_killed_trainer_worker_resumes_from_the_last_checkpoint(tiny_prepared, ray_local, tmp_path) -> None:
    """SIGKILL the Train worker after its first checkpoint: FailureConfig restarts the worker group,
    which resumes after the last checkpointed epoch — the epochs before it are not trained again."""
    import threading


    from mike_ray.mike.train import CKPT_FILE, load_checkpoint

    cfg = TransferConfig(method="pixel", model=TINY_AE, epochs=8, batch_size=8, val_batches=1, device="cpu")
    workers = WorkersConfig(num_workers=1, cpus_per_worker=0.5, max_failures=1)
    seen: dict[str, object] = {}
    killer = threading.Thread(target=kill_train_worker_after_first_checkpoint,
                              args=(tmp_path / "kill", CKPT_FILE, tmp_path / "before-kill.pt", seen), daemon=True)
    killer.start()
    res = run_transfer(cfg, [], tiny_prepared, ["DCH", "CTB"], PlacementConfig(), workers, tmp_path, "kill")
    killer.join(5)
    assert seen.get("killed"), "the worker was not killed"
    saved = load_checkpoint(seen["checkpoint"])
    done_before = [h["epoch"] for h in saved.history]
    assert done_before and done_before[-1] < cfg.epochs - 1, "the run had finished before the kill"
    # every epoch once; those checkpointed before the kill are the stored ones (not re-run), so at
    # most the epoch in flight when the worker died was lost
    assert [h["epoch"] for h in res.history] == list(range(cfg.epochs))
    assert res.history[:len(saved.history)] == saved.history

