"""One transfer run: create the teacher shards, build the TorchTrainer, fit it.

This is the body of a Tune trial (the Ray Train V2 pattern: a trial function builds and fits the
TorchTrainer) and also runs on its own, without Tune, for the `mike_ray.transfer` command.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import Field

from mike_ray.config_base import StrictModel
from mike_ray.data.tasks import TASK_CODES
from mike_ray.errors import ConfigError, MikeRayError, TrainingError, one_line
from mike_ray.mike.train import CKPT_FILE, TransferConfig, train_fn_per_worker
from mike_ray.teachers.shard import PlacementConfig, ShardGroup, TeacherRef


class WorkersConfig(StrictModel):
    """Trainer workers (DDP): how many, and what each takes."""

    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_failures: int = Field(1, ge=0)  # worker-group restarts from the last checkpoint


@dataclass
class TransferResult:
    """What a fitted transfer leaves: the final student weights, the per-epoch history, the
    checkpoint location, and how many shard calls had to be re-sent."""

    state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    checkpoint_path: str
    retries: int = 0
    taps: dict[str, list[str]] = field(default_factory=dict)


def teacher_refs(zoo_dir: Path, names: Sequence[str], imports: Sequence[str] = ()) -> list[TeacherRef]:
    """Zoo entries → shard references; each teacher masks to its own task. ``imports``: the
    import-path archs the running sweep file names (``import_archs``), the only ones a stored record
    may use."""
    from mike_ray.teachers.zoo import read_teacher

    refs = []
    for n in names:
        rec = read_teacher(Path(zoo_dir) / n)
        refs.append(TeacherRef(name=n, path=str(Path(zoo_dir) / n), task_id=TASK_CODES.index(rec.task),
                               imports=tuple(sorted(imports))))
    return refs


def query_shares(data_root: str | Path, tasks: Sequence[str]) -> dict[int, float]:
    """Task id → its fraction of the query rows (train split of ``tasks``, from the manifest): the
    expected share of each task in a mixed batch, which weighs a teacher's work per step."""
    from mike_ray.data.shards import read_manifest

    man = read_manifest(data_root)  # counts only: the workers check the shards themselves
    rows = {t: man.rows("train", t) for t in dict.fromkeys(tasks)}
    total = sum(rows.values()) or 1
    return {TASK_CODES.index(t): n / total for t, n in rows.items()}


def run_transfer(cfg: TransferConfig, teachers: Sequence[TeacherRef], data_root: str | Path,
                 query_tasks: Sequence[str], placement: PlacementConfig, workers: WorkersConfig,
                 storage_path: str | Path, name: str, callbacks: Sequence[Any] = (),
                 shards: ShardGroup | None = None) -> TransferResult:
    """Fit one MIKE (or pixel) autoencoder; resumes by itself from ``storage_path/name``.

    Args:
        cfg: the student's training config. teachers: the shards' teachers (unused for "pixel").
        data_root: a prepared dataset. query_tasks: tasks whose train split is the query data (and
            whose val split is validated every epoch); each trainer worker reads them itself.
        placement/workers: where teachers and trainer workers run.
        storage_path/name: Ray Train's run directory (checkpoints; a rerun with the same name resumes).
        callbacks: Ray Train callbacks (a Tune trial passes TuneReportCallback).
        shards: an existing ShardGroup (a trial places it in its placement group; tests kill one).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from mike_ray.data.loaders import count_rows

    for split in ("train", "val"):  # an empty query split is a one-line error before any worker starts
        if count_rows(data_root, split, query_tasks) < workers.num_workers:
            raise ConfigError(f"query data: {data_root}: {count_rows(data_root, split, query_tasks)} {split} "
                              f"rows for tasks {', '.join(query_tasks)} ({workers.num_workers} trainer worker(s))")
    own_shards = shards is None and cfg.method == "mike"
    if own_shards:
        shares = query_shares(data_root, query_tasks) if placement.teachers_per_shard == "auto" else None
        shards = ShardGroup(teachers, placement, shares=shares, concurrency=workers.num_workers)
    try:
        taps = shards.taps() if shards is not None else {}
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config={"transfer": cfg.model_dump(), "shards": shards, "taps": taps,
                               "data_root": str(data_root), "query_tasks": list(query_tasks)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers.num_workers, use_gpu=workers.gpus_per_worker > 0,
                resources_per_worker={"CPU": workers.cpus_per_worker,
                                      **({"GPU": workers.gpus_per_worker} if workers.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(Path(storage_path).resolve()),
                failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=list(callbacks)),
        )
        try:
            result = trainer.fit()
        except Exception as err:  # surface our own typed errors (NaN loss, dead shard) as one line
            cause = _find_cause(err)
            if cause is not None:
                raise cause from None
            raise TrainingError(f"transfer '{name}' failed: {one_line(str(err))[:300]}") from None
        if result.checkpoint is None:
            raise TrainingError(f"transfer '{name}': finished without a checkpoint")
        from mike_ray.mike.train import load_checkpoint

        with result.checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CKPT_FILE)
        return TransferResult(state=state.model, history=list(state.history),
                              checkpoint_path=result.checkpoint.path,
                              retries=int(sum(h.get("shard/retries", 0) for h in state.history)), taps=taps)
    finally:
        if own_shards and shards is not None:
            shards.shutdown()


def _find_cause(err: BaseException) -> MikeRayError | None:
    """Walk an exception chain (Ray wraps worker errors) for one of our typed errors; return it as a
    plain instance of its mike_ray class with a one-line message (Ray's wrappers add tracebacks)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MikeRayError):
            cls = next(c for c in type(e).__mro__ if c.__module__ == "mike_ray.errors")
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            msg = lines[-1] if lines else cls.__name__
            for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
                msg = msg.removeprefix(prefix)
            return cls(one_line(msg))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None
