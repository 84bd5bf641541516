"""One MHGD (or baseline) run: teacher shards, then a one-worker TorchTrainer around ``run_method``.

The body of an MHGD Tune trial (Train V2 pattern: the trial function builds and fits the trainer),
usable on its own too. Mirrors :mod:`mike_ray.orchestrate.transfer` for MIKE.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from mike_ray.data.classification import ClassificationData
from mike_ray.errors import ConfigError, TrainingError, one_line
from mike_ray.mhgd.shard import ClassifierRef, ShardTeachers
from mike_ray.mhgd.train import MHGDConfig
from mike_ray.mhgd.worker import RESULT_FILE, STUDENT_FILE, train_fn_per_worker
from mike_ray.orchestrate.transfer import WorkersConfig, _find_cause
from mike_ray.teachers.shard import PlacementConfig


@dataclass
class MHGDResult:
    """A fitted MHGD student: best/last val accuracy, per-epoch history, its checkpoint."""

    best_acc: float
    last_acc: float
    history: list[dict[str, float]]
    checkpoint_path: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    retries: int = 0


def classifier_refs(zoo_dir: Path, names: Sequence[str], imports: Sequence[str] = ()) -> list[ClassifierRef]:
    """Classifier-zoo entries → shard references (``imports`` as in :func:`teacher_refs`)."""
    from mike_ray.mhgd.zoo import read_classifier

    return [ClassifierRef(n, str(Path(zoo_dir) / read_classifier(Path(zoo_dir) / n)["name"]), tuple(sorted(imports)))
            for n in names]


def run_mhgd(cfg: MHGDConfig, data: ClassificationData, teachers: Sequence[ClassifierRef],
             placement: PlacementConfig, workers: WorkersConfig, storage_path: str | Path, name: str,
             shards: ShardTeachers | None = None) -> MHGDResult:
    """Fit one student with ``cfg.method`` from ``teachers``; a re-run of a finished ``name`` re-reports it.

    Args:
        cfg: the run. data: the classification data (``root`` resolved).
        teachers: the teachers (ignored for ``method="student"``); on Ray shards for placement
            ``mode="ray"``, in the trainer worker for ``"local"``.
        placement, workers: where teachers and the (single) trainer worker run.
        storage_path/name: Ray Train's run directory.
        shards: existing shards (a trial places them in its placement group).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    if workers.num_workers != 1:
        raise ConfigError(f"resources.workers.num_workers: MHGD trains on one worker (the graph relates the "
                          f"samples of one batch), got {workers.num_workers}")
    needs_teacher = cfg.method != "student"
    own = shards is None and needs_teacher and placement.mode == "ray"
    if own:
        shards = ShardTeachers(teachers, cfg, placement)
    try:
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config={"mhgd": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
                               "teachers": shards if needs_teacher else None, "refs": list(teachers)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, use_gpu=workers.gpus_per_worker > 0,
                resources_per_worker={"CPU": workers.cpus_per_worker,
                                      **({"GPU": workers.gpus_per_worker} if workers.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(Path(storage_path).resolve()),
                failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        )
        try:
            result = trainer.fit()
        except Exception as err:  # our typed errors (NaN loss, bad teacher) as one line
            cause = _find_cause(err)
            if cause is not None:
                raise cause from None
            raise TrainingError(f"mhgd run '{name}' failed: {one_line(str(err))[:300]}") from None
        if result.checkpoint is None:
            raise TrainingError(f"mhgd run '{name}': finished without a checkpoint")
        from mike_ray.models.registry import load_torch_file

        with result.checkpoint.as_directory() as d:
            try:
                res: dict[str, Any] = json.loads((Path(d) / RESULT_FILE).read_text())
                float(res["best_acc"]), float(res["last_acc"]), list(res["history"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise TrainingError(f"{Path(result.checkpoint.path) / RESULT_FILE}: unreadable run result: "
                                    f"{one_line(str(err))[:200]}") from None
            state = load_torch_file(Path(d) / STUDENT_FILE, "student weights")
        return MHGDResult(best_acc=float(res["best_acc"]), last_acc=float(res["last_acc"]),
                          history=list(res["history"]), checkpoint_path=result.checkpoint.path, state=state,
                          retries=int(res.get("retries", 0)))
    finally:
        if own and shards is not None:
            shards.shutdown()
