"""The MHGD student's Ray Train V2 loop: one TorchTrainer worker runs :func:`run_method`.

The training itself is :func:`mike_ray.mhgd.train.run_method` (phase 1, then the student, readable top
to bottom there); this wrapper only feeds it data and teachers inside a Train worker and reports:

* every epoch's metrics with ``ray.train.report`` (``epoch`` + ``acc/val``, ``loss/…``: path names);
* at the end, a checkpoint holding ``student.pt`` (state dict) and ``result.json`` (best/last accuracy,
  history). A restarted worker (FailureConfig) or a re-run of the same Train run that finds that
  checkpoint reports it again instead of training twice. There is no mid-run checkpoint: a worker
  killed during training restarts the run from its beginning (see docs/reliability.md).

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


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train V2 entry point. ``config``: ``mhgd`` (MHGDConfig dict), ``data`` (ClassificationData dict),
    ``teachers`` (ShardTeachers or None), ``refs`` (ClassifierRef list, for in-worker teachers)."""
    import ray.train

    from mike_ray.data.classification import ClassificationData, load_splits
    from mike_ray.mhgd.train import MHGDConfig, run_method

    # --- a finished run (restart or re-run): report its result again ----------------------------------
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / RESULT_FILE).is_file():
                res = json.loads((Path(d) / RESULT_FILE).read_text())
                ray.train.report(_final(res), checkpoint=ckpt)
                return

    cfg = MHGDConfig.model_validate(config["mhgd"])
    data = ClassificationData.model_validate(config["data"])
    train_ds, val_ds = load_splits(data)

    # --- teachers: shards created by the trial, or loaded here (placement "local") -------------------
    teachers = config.get("teachers")
    if teachers is None and cfg.method != "student":
        from mike_ray.mhgd.train import LocalTeachers, frozen_teacher
        from mike_ray.mhgd.zoo import load_classifier
        from mike_ray.utils import resolve_device

        device = resolve_device(cfg.device)
        teachers = LocalTeachers([frozen_teacher(cfg, load_classifier(Path(r.path), device)[0]) for r in config["refs"]],
                                 [r.name for r in config["refs"]])

    # --- train, reporting each epoch -----------------------------------------------------------------
    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        ray.train.report({"epoch": float(epoch), **metrics})

    res = run_method(cfg, teachers, train_ds, val_ds, on_epoch, return_model=True)
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
