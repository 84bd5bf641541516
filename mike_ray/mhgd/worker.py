"""The MHGD student's Ray Train V2 loop: one TorchTrainer worker runs :func:`run_method`.

The training itself is :func:`mike_ray.mhgd.train.run_method` (phase 1, then the student, readable top
to bottom there); this wrapper only feeds it data and teachers inside a Train worker and reports:

* every epoch's metrics with ``ray.train.report`` (``epoch`` + ``acc/val``, ``loss/…``: path names),
  each with a checkpoint holding ``state.pt``: the run's whole state after that epoch (phase-1 heads,
  student, optimiser, lr schedule, RNG, history). A worker restarted by ``FailureConfig`` resumes from
  it and finishes exactly like an uninterrupted run: a killed worker costs the epoch in flight;
* at the end, a checkpoint holding ``student.pt`` (state dict) and ``result.json`` (best/last accuracy,
  history). A restart or a re-run of the same Train run that finds it reports it again instead of
  training twice.

One worker: the attention graphs relate the samples of one batch, so data-parallel workers would
each see a different graph; a bigger ``batch_size`` on one device is the paper's way to scale N.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULT_FILE = "result.json"
STUDENT_FILE = "student.pt"
STATE_FILE = "mhgd_state.pt"  # not MIKE's state.pt: a different layout


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train V2 entry point. ``config``: ``mhgd`` (MHGDConfig dict), ``data`` (ClassificationData dict),
    ``teachers`` (MHGDShardPool or None), ``refs`` (ClassifierRef list, for in-worker teachers)."""
    import ray.train

    from mike_ray.data.classification import ClassificationData, load_splits
    from mike_ray.mhgd.config import MHGDConfig
    from mike_ray.mhgd.train import run_method

    from mike_ray.models.registry import load_torch_file
    from mike_ray.utils import quiet_train_reports

    quiet_train_reports()
    # --- a finished run (restart or re-run): report its result again; an unfinished one: resume ------
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / RESULT_FILE).is_file():
                res = json.loads((Path(d) / RESULT_FILE).read_text())
                ray.train.report(_final(res), checkpoint=ckpt)
                return
            resume = load_torch_file(Path(d) / STATE_FILE, "MHGD run state")  # weights_only=True

    cfg = MHGDConfig.model_validate(config["mhgd"])
    data = ClassificationData.model_validate(config["data"])
    train_ds, val_ds = load_splits(data)

    # --- teachers: shards created by the trial, or loaded here (placement "local") -------------------
    teachers = config.get("teachers")
    if teachers is None and cfg.method != "student":
        from mike_ray.mhgd.teachers import LocalTeachers, frozen_teacher
        from mike_ray.mhgd.zoo import load_classifier
        from mike_ray.utils import resolve_device

        device = resolve_device(cfg.device)
        teachers = LocalTeachers([frozen_teacher(cfg, load_classifier(Path(r.path), device, r.imports)[0]) for r in config["refs"]],
                                 [r.name for r in config["refs"]])

    # --- train, reporting each epoch with the run's state as a checkpoint ----------------------------
    def on_checkpoint(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report({"epoch": float(epoch), **metrics}, checkpoint=ray.train.Checkpoint.from_directory(d))

    res = run_method(cfg, teachers, train_ds, val_ds, return_model=True, on_checkpoint=on_checkpoint,
                     resume=resume)
    student = res.pop("student")
    res["retries"] = int(getattr(teachers, "retries", 0))

    # --- the final checkpoint: weights + result, reported together -----------------------------------
    with tempfile.TemporaryDirectory() as d:
        torch.save(student.state_dict(), Path(d) / STUDENT_FILE)
        (Path(d) / RESULT_FILE).write_text(json.dumps(res))
        ray.train.report(_final(res), checkpoint=ray.train.Checkpoint.from_directory(d))


def _final(res: dict[str, Any]) -> dict[str, float]:
    last = res["history"][-1]["epoch"] if res["history"] else 0.0
    return {"epoch": float(last), "acc/best": float(res["best_acc"]), "acc/last": float(res["last_acc"])}
