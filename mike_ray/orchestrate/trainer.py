"""The TorchTrainer builder both methods' runs use: scaling from :class:`WorkersConfig`, Ray Train's
restarts and checkpoints, and our typed errors surfaced as one line through Ray's wrappers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mike_ray.errors import TrainingError, find_cause, one_line
from mike_ray.resources import WorkersConfig


def fit_trainer(train_fn: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], workers: WorkersConfig,
                storage_path: str | Path, name: str, what: str, keep: int = 2, report_epochs: bool = False) -> Any:
    """Build and fit a TorchTrainer of ``workers.num_workers`` workers; return its ``Result``.

    A rerun with the same ``storage_path/name`` resumes from the last checkpoint Train registered;
    a worker that dies restarts the group ``workers.max_failures`` times. Raises the first
    mike_ray error found in Ray's exception chain (a NaN loss, a dead shard), else a one-line
    :class:`TrainingError` naming ``what``; also when the run finished without a checkpoint.
    ``report_epochs``: forward each of the workers' per-epoch reports to the Tune trial this runs in
    (``study.scheduler``: a scheduler stops a trial that is clearly behind on them).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from mike_ray.utils import verbose

    if report_epochs:
        from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers.num_workers, use_gpu=workers.gpus_per_worker > 0,
            resources_per_worker=workers.bundle),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            # every report's metric dict, each checkpoint and worker start at INFO: on the console
            # only with --verbose (Ray Train's log files under the session keep them all)
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            callbacks=[TuneReportCallback()] if report_epochs else None),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # surface our own typed errors as one line
        cause = find_cause(err)
        if cause is not None:
            raise cause from None
        raise TrainingError(f"{what} '{name}' failed: {one_line(str(err))[:300]}") from None
    if result.checkpoint is None:
        raise TrainingError(f"{what} '{name}': finished without a checkpoint")
    return result
