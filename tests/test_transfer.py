"""The Train V2 transfer loop: DDP over two workers, resume from the latest checkpoint, NaN stops."""
from __future__ import annotations

import pytest

from conftest import TINY_AE
from mike_ray.errors import TrainingError
from mike_ray.mike.train import TransferConfig
from mike_ray.orchestrate.transfer import WorkersConfig, run_transfer
from mike_ray.teachers.shard import PlacementConfig

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
    import json
    import os
    import shutil
    import signal
    import threading
    import time
    from pathlib import Path


    from mike_ray.mike.train import CKPT_FILE, load_checkpoint

    cfg = TransferConfig(method="pixel", model=TINY_AE, epochs=8, batch_size=8, val_batches=1, device="cpu")
    workers = WorkersConfig(num_workers=1, cpus_per_worker=0.5, max_failures=1)
    seen: dict[str, object] = {}

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            # a checkpoint counts once Train has registered it (its snapshot lists it), not when written
            snap = tmp_path / "kill" / "checkpoint_manager_snapshot.json"
            try:
                listed = [c["checkpoint_dir_name"] for c in json.loads(snap.read_text())["checkpoint_results"]]
            except (OSError, ValueError, KeyError):
                listed = []
            if listed:
                keep = tmp_path / "before-kill.pt"
                shutil.copy(tmp_path / "kill" / listed[-1] / CKPT_FILE, keep)  # Train may rotate it away later
                seen["checkpoint"] = keep
                # Ray titles an actor's process "ray::<Class>…" (no dashboard here for the state API);
                # only this session's Ray (started by this process) is touched, never another one
                for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                    try:
                        title = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    pid = int(cmdline.parent.name)
                    if title.startswith("ray::RayTrainWorker") and _descends_from(pid, os.getpid()):
                        os.kill(pid, signal.SIGKILL)
                        seen.setdefault("killed", []).append(pid)
                if seen.get("killed"):
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
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


def _descends_from(pid: int, root: int) -> bool:
    """Whether process ``pid`` is a descendant of ``root`` (Linux /proc)."""
    from pathlib import Path

    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised name
        if pid == root:
            return True
    return False
