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

from mike_ray.data.sources import ClassificationData
from mike_ray.errors import ConfigError, TrainingError, one_line
from mike_ray.mhgd.shard import ClassifierRef, MHGDShardPool
from mike_ray.mhgd.config import MHGDConfig
from mike_ray.mhgd.worker import RESULT_FILE, STUDENT_FILE, train_fn_per_worker
from mike_ray.orchestrate.trainer import fit_trainer
from mike_ray.resources import PlacementConfig, WorkersConfig


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
             shards: MHGDShardPool | None = None, report_epochs: bool = False) -> MHGDResult:
    """Fit one student with ``cfg.method`` from ``teachers``; a re-run of a finished ``name`` re-reports it.

    Args:
        cfg: the run. data: the classification data (``root`` resolved).
        teachers: the teachers (ignored for ``method="student"``); on Ray shards for placement
            ``mode="ray"``, in the trainer worker for ``"local"``.
        placement, workers: where teachers and the (single) trainer worker run.
        storage_path/name: Ray Train's run directory.
        shards: existing shards (a trial places them in its placement group).
    """
    if workers.num_workers != 1:
        raise ConfigError(f"resources.workers.num_workers: MHGD trains on one worker (the graph relates the "
                          f"samples of one batch), got {workers.num_workers}")
    needs_teacher = cfg.method != "student"
    own = shards is None and needs_teacher and placement.mode == "ray"
    if own:
        shards = MHGDShardPool(teachers, cfg, placement)
    try:
        result = fit_trainer(train_fn_per_worker, {"mhgd": cfg.model_dump(mode="json"),
                                                   "data": data.model_dump(mode="json"),
                                                   "teachers": shards if needs_teacher else None,
                                                   "refs": list(teachers)},
                             workers, storage_path, name, "mhgd run", keep=1, report_epochs=report_epochs)
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
