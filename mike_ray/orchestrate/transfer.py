"""One transfer run: create the teacher shards, build the TorchTrainer, fit it.

This is the body of a MIKE Tune trial (the Ray Train V2 pattern: a trial function builds and fits the
TorchTrainer, :mod:`mike_ray.orchestrate.mike_trial`); it also runs on its own, without Tune (tests,
benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from mike_ray.data.tasks import TASKS
from mike_ray.errors import ConfigError
from mike_ray.mike.config import TeacherEntry
from mike_ray.mike.train import CKPT_FILE, TransferConfig, train_fn_per_worker
from mike_ray.orchestrate.trainer import fit_trainer
from mike_ray.resources import PlacementConfig, WorkersConfig
from mike_ray.mike.shard import MikeShardPool, TeacherRef


@dataclass
class TransferResult:
    """What a fitted transfer leaves: the final student weights, the per-epoch history, the
    checkpoint location, and how many shard calls had to be re-sent."""

    state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    checkpoint_path: str
    retries: int = 0


def teacher_refs(zoo_dir: Path, names: Sequence[str], imports: Sequence[str] = (),
                 entries: Mapping[str, TeacherEntry] | None = None,
                 table: Mapping[str, Sequence[str]] = TASKS) -> list[TeacherRef]:
    """Teacher names → shard references: a ``teachers:`` entry of the sweep (``entries``) by its own
    name, else the zoo teacher of that name; each masks to its task (an entry without one scores
    every row), by the task's id in ``table`` (the query data's task table, :attr:`Manifest.table`).
    ``imports``: the import-path archs the running sweep file names (``import_archs``), the only
    ones a stored record may use."""
    from mike_ray.mike.zoo import read_teacher

    entries = entries or {}
    codes = list(table)
    refs = []
    for n in names:
        if n in entries:
            e = entries[n]
            refs.append(TeacherRef(name=n, path=e.weights, task_id=None if e.task is None else codes.index(e.task),
                                   imports=tuple(sorted(imports)), entry=e.model_dump(mode="json")))
            continue
        rec = read_teacher(Path(zoo_dir) / n)
        refs.append(TeacherRef(name=n, path=str(Path(zoo_dir) / n), task_id=codes.index(rec.task),
                               imports=tuple(sorted(imports))))
    return refs


def query_shares(data_root: str | Path, tasks: Sequence[str]) -> dict[int, float]:
    """Task id → its fraction of the query rows (train split of ``tasks``, from the manifest): the
    expected share of each task in a mixed batch, which weighs a teacher's work per step."""
    from mike_ray.data.shards import read_manifest

    man = read_manifest(data_root)  # counts only: the workers check the shards themselves
    rows = {t: man.rows("train", t) for t in dict.fromkeys(tasks)}
    total = sum(rows.values()) or 1
    return {man.task_id(t): n / total for t, n in rows.items()}


def run_transfer(cfg: TransferConfig, teachers: Sequence[TeacherRef], data_root: str | Path,
                 query_tasks: Sequence[str], placement: PlacementConfig, workers: WorkersConfig,
                 storage_path: str | Path, name: str, shards: MikeShardPool | None = None,
                 report_epochs: bool = False) -> TransferResult:
    """Fit one MIKE (or pixel) autoencoder; resumes by itself from ``storage_path/name``.

    Args:
        cfg: the student's training config. teachers: the shards' teachers (unused for "pixel").
        data_root: a prepared dataset, or a prepared folder/COCO query set (:mod:`mike_ray.data.query`).
            query_tasks: tasks whose train split is the query data (and whose val split is validated
            every epoch), none for a query set; each trainer worker reads them itself.
        placement/workers: where teachers and trainer workers run.
        storage_path/name: Ray Train's run directory (checkpoints; a rerun with the same name resumes).
        shards: an existing MikeShardPool (a trial places it in its placement group; tests kill one).
        report_epochs: forward every epoch's metrics to the enclosing Tune trial (``study.scheduler``).
    """
    from mike_ray.data.query import count_query_rows

    for split in ("train", "val"):  # an empty query split is a one-line error before any worker starts
        n = count_query_rows(data_root, split, list(query_tasks))
        if n < workers.num_workers:
            raise ConfigError(f"query data: {data_root}: {n} {split} rows" +
                              (f" for tasks {', '.join(query_tasks)}" if query_tasks else "") +
                              f" ({workers.num_workers} trainer worker(s))")
    own_shards = shards is None and cfg.method == "mike"
    if own_shards:
        shares = query_shares(data_root, query_tasks) if placement.teachers_per_shard == "auto" and query_tasks \
            else None
        shards = MikeShardPool(teachers, placement, shares=shares, concurrency=workers.num_workers)
    try:
        # the workers ask the shards for their taps: the shard actors load their teachers while
        # Train starts its controller and workers
        result = fit_trainer(train_fn_per_worker, {"transfer": cfg.model_dump(), "shards": shards,
                                                   "data_root": str(data_root), "query_tasks": list(query_tasks)},
                             workers, storage_path, name, "transfer", report_epochs=report_epochs)
        from mike_ray.mike.train import load_checkpoint

        with result.checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CKPT_FILE)
        return TransferResult(state=state.model, history=list(state.history),
                              checkpoint_path=result.checkpoint.path,
                              retries=int(sum(h.get("shard/retries", 0) for h in state.history)))
    finally:
        if own_shards and shards is not None:
            shards.shutdown()


