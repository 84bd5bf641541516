"""The MIKE transfer loop: one Ray Train worker's view, readable top to bottom.

    x ─► autoencoder ─► x̄ ─► every teacher shard ─► (loss, ∂loss/∂x̄)
    x̄.backward(Σ shard gradients + pixel gradient) ; optimizer.step()

This module never imports Tune; it reports metrics through ``ray.train.report`` and the trial
driver decides where they go. The same function trains the pixel baseline (``method="pixel"``: no
shards, pixel MSE only).
"""
from __future__ import annotations

import math
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from mike_ray.config_base import format_validation_error
from mike_ray.errors import ModelError, TrainingError, one_line
from mike_ray.mike.config import TransferConfig
from mike_ray.mike.schedules import ScheduleConfig, make_schedule, progress_at
from mike_ray.utils import limit_threads, quiet_train_reports, seed_everything

CKPT_FILE = "state.pt"


class CheckpointState(BaseModel):
    """What ``state.pt`` of a transfer checkpoint holds (written at the end of every epoch)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: dict[str, torch.Tensor]          # the autoencoder's state_dict
    optimizer: dict[str, Any]               # torch.optim state_dict: {"state": ..., "param_groups": [...]}
    schedule: dict[str, Any]                # the teacher schedule's state ({} for the pixel method)
    epoch: StrictInt = Field(ge=0)          # the last finished epoch
    step: StrictInt = Field(ge=0)
    history: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("optimizer")
    @classmethod
    def _optimizer_state(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("state"), dict) or not isinstance(v.get("param_groups"), list):
            raise ValueError("optimizer: must be an optimizer state_dict with 'state' and 'param_groups'")
        return v


def load_checkpoint(path: str | Path) -> CheckpointState:
    """Read and validate a transfer checkpoint file (``weights_only=True``: tensors and containers only).

    Raises:
        ModelError: ``<path>: ...`` for a missing, damaged or foreign file, or ``<path>: <field>: ...``
            for a missing or ill-typed field.
    """
    from mike_ray.models.registry import load_torch_file

    raw = load_torch_file(path, "checkpoint file")
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: not a transfer checkpoint (a {type(raw).__name__}, expected a dict with "
                         f"{', '.join(CheckpointState.model_fields)})")
    try:
        return CheckpointState.model_validate(raw)
    except ValidationError as err:
        raise ModelError(format_validation_error(err, CheckpointState, str(path))) from None


def _resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, schedule: Any) -> CheckpointState:
    """Load checkpoint ``path`` into the model, optimizer and schedule; a misfit is a one-line ModelError."""
    from mike_ray.models.registry import check_state_dict

    state = load_checkpoint(path)
    check_state_dict(model, state.model, path, field="model")
    model.load_state_dict(state.model)
    try:
        opt.load_state_dict(state.optimizer)
    except (ValueError, KeyError, RuntimeError) as err:  # torch: group/parameter count mismatch
        raise ModelError(f"{path}: optimizer: does not fit this model's optimizer: {one_line(str(err))}") from None
    if schedule is not None:
        try:
            schedule.load_state_dict(state.schedule)
        except (ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{path}: schedule: does not fit this run's schedule: "
                             f"{one_line(f'{type(err).__name__}: {err}')}") from None
    return state


class EpochMeter:
    """Sample-weighted means of an epoch's metrics: ``add(name, value, n)`` counts ``value`` for
    ``n`` samples. A metric that no sample measured (a teacher whose task never appeared) is absent
    from :meth:`means` — never a 0.0. Under DDP :meth:`means` sums over all workers first."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float, n: float = 1.0) -> None:
        if n > 0:
            self.sums[name] += float(value) * n
            self.counts[name] += n

    def means(self, world: int = 1) -> dict[str, float]:
        sums, counts = _all_reduce_sums(dict(self.sums), dict(self.counts), world)
        return {k: sums[k] / c for k, c in counts.items() if c > 0}


def _all_reduce_sums(sums: dict[str, float], counts: dict[str, float], world: int
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Sum ``sums``/``counts`` over the DDP workers (float64 all-reduce; keys may differ per worker:
    the key lists are gathered first). With one worker, returned as they are."""
    if world <= 1:
        return sums, counts
    import torch.distributed as dist

    keys: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(keys, sorted(sums))
    names = sorted({k for ks in keys for k in ks})
    t = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0.0)] for k in names], dtype=torch.float64)
    t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    t = t.cpu()
    return ({k: float(t[i, 0]) for i, k in enumerate(names)}, {k: float(t[i, 1]) for i, k in enumerate(names)})


def global_terms(res: Any, taps: dict[str, list[str]], world: int = 1) -> dict[str, dict[str, float]]:
    """The step's unweighted tap terms as every worker's samples measured them (the adaptive
    schedule's input): per teacher and tap, Σ term·count / Σ count over all DDP workers. Teachers
    that no worker's batch held are left out (their term is not a measurement). Every worker gets
    the same numbers, so every worker's schedule holds the same state and weights."""
    sums, counts = {}, {}
    for t, n in res.counts.items():
        for tap in taps[t]:
            key = f"{t}/{tap}"
            if n > 0 and key in res.terms:
                sums[key], counts[key] = res.terms[key] * n, float(n)
    sums, counts = _all_reduce_sums(sums, counts, world)
    out: dict[str, dict[str, float]] = {}
    for key, c in counts.items():
        if c > 0:
            t, tap = key.split("/", 1)
            out.setdefault(t, {})[tap] = sums[key] / c
    return out


@dataclass
class StepStats:
    """What one transfer step measured (floats read back once per step)."""

    total: float
    teacher: float
    pixel: float
    shard: Any = None  # the shards' StepResult (None when no teacher carried weight)


def transfer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, task_ids: torch.Tensor,
                  weights: Any, shards: Any, masking: bool) -> StepStats:
    """One optimisation step of the autoencoder: forward, teachers on the shards, one backward, step.

    Args:
        model: the autoencoder (maybe DDP-wrapped). opt: its optimizer.
        x: B×3×H×W query images in [0, 1]. task_ids: B int64 (query masking).
        weights: the schedule's :class:`~mike_ray.mike.schedules.Weights` for this step, or None for
            the pixel method (pixel MSE with weight 1).
        shards: the MikeShardPool (unused when no teacher carries weight).
    """
    from mike_ray.mike.loss import pixel_loss

    # forward the autoencoder: x̄ = sigmoid(decoder(encoder(x)))
    xbar = model(x)
    pix_w = 1.0 if weights is None else weights.pixel

    # teachers: every shard returns its part of the loss and ∂loss/∂x̄ for this batch
    grad, res = None, None
    if weights is not None and weights.teacher_sum() > 0:
        res = shards.step(x, xbar.detach(), task_ids, weights.teachers, masking)
        grad = res.grad.to(xbar.device, xbar.dtype)

    # pixel term, computed here so its gradient joins the teachers' in one backward pass
    pix = pixel_loss(x, xbar)

    # backward: x̄ receives Σ_s ∂L_s/∂x̄ + w_pix·∂MSE/∂x̄; autograd finishes in the autoencoder
    opt.zero_grad(set_to_none=True)
    if grad is not None and pix_w > 0:
        torch.autograd.backward([xbar, pix_w * pix], [grad, None])
    elif grad is not None:
        xbar.backward(grad)
    else:
        (pix_w * pix).backward()
    opt.step()
    teacher = res.loss if res is not None else 0.0
    p = float(pix.detach())
    return StepStats(total=teacher + pix_w * p, teacher=teacher, pixel=p, shard=res)


def _add_teacher_terms(meter: EpochMeter, prefix: str, res: Any) -> None:
    """Per-teacher and per-tap measurements, each counted for the samples its teacher saw."""
    for key, v in res.terms.items():
        meter.add(f"{prefix}/{key}", v, res.counts.get(key.split("/", 1)[0], 0))


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train V2 ``train_loop_per_worker``.

    ``config`` keys: ``transfer`` (a :class:`TransferConfig` dict), ``shards`` (a MikeShardPool with
    Ray actor handles, or None for the pixel method), ``taps`` (teacher → tap paths; default: the
    shards'), ``data_root``
    and ``query_tasks`` (the prepared dataset and the tasks whose train/val splits are the query
    data, or a prepared folder/COCO query set and no tasks). Each worker reads the query rows itself and visits them in a fresh seeded global
    shuffle every epoch (:class:`~mike_ray.data.loaders.QueryBatches`), so batches mix the tasks.
    """
    import ray.train
    import ray.train.torch

    from mike_ray.data.loaders import QueryBatches
    from mike_ray.data.query import open_query
    from mike_ray.mike.loss import pixel_loss
    from mike_ray.models import build_model

    cfg = TransferConfig.model_validate(config["transfer"])
    shards = config.get("shards")
    # teacher → tap paths; asked of the shards when not given (waits for them to finish loading)
    taps: dict[str, list[str]] = config.get("taps") or (shards.taps() if shards is not None else {})
    limit_threads(cfg.threads)
    quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed)

    # --- model, optimizer, schedule -----------------------------------------------------------
    model = build_model(cfg.model, imports="any")  # the sweep's transfer.model
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1, moves to the worker's device
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_teachers = cfg.method == "mike"
    schedule = make_schedule(cfg.schedule, taps) if use_teachers else None
    uniform = make_schedule(ScheduleConfig(name="uniform"), taps) if use_teachers else None

    # --- query data: mixed-task batches, a new seeded global order every epoch ----------------
    root, tasks = config["data_root"], list(config["query_tasks"])
    train_q = QueryBatches(open_query(root, "train", tasks, memory=cfg.query_memory), cfg.batch_size, cfg.seed,
                           rank, world)
    val_q = QueryBatches(open_query(root, "val", tasks, memory=cfg.query_memory), cfg.batch_size, cfg.seed,
                         rank, world)
    total_steps = cfg.epochs * len(train_q)

    # --- resume from the latest checkpoint, if any -------------------------------------------
    start_epoch, step = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = _resume(Path(d) / CKPT_FILE, _unwrap(model), opt, schedule)
        start_epoch, step = state.epoch + 1, state.step
        history = list(state.history)
    else:
        history = []

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        meter = EpochMeter()
        retries_before = shards.retries if shards is not None else 0
        w = None
        for batch in train_q.epoch(epoch):
            x, task_ids = batch["image"].to(device), batch["task_id"].to(device)
            w = schedule.weights(progress_at(min(step, total_steps), total_steps)) if schedule else None
            stats = transfer_step(model, opt, x, task_ids, w, shards, cfg.masking)
            if not math.isfinite(stats.total):
                raise TrainingError(f"transfer: non-finite loss {stats.total} at epoch {epoch} step {step} "
                                    f"(teacher {stats.teacher}, pixel {stats.pixel})")
            if stats.shard is not None:
                _add_teacher_terms(meter, "loss/teacher", stats.shard)
                # adaptive weights learn from the terms all workers measured (identical on every rank)
                schedule.update(global_terms(stats.shard, taps, world))
            step += 1
            n = len(task_ids)
            meter.add("loss/train/total", stats.total, n)
            meter.add("loss/train/teacher", stats.teacher, n)
            meter.add("loss/train/pixel_mse", stats.pixel, n)

        # --- validation: pixel MSE and the uniform-weighted teacher loss, per teacher and tap ---
        model.eval()
        with torch.no_grad():
            for batch in val_q.validation(cfg.val_batches):
                x, task_ids = batch["image"].to(device), batch["task_id"].to(device)
                xbar = model(x)
                n = len(task_ids)
                meter.add("loss/val/pixel_mse", float(pixel_loss(x, xbar)), n)
                if uniform is not None:
                    res = shards.step(x, xbar, task_ids, uniform.weights(1.0).teachers, cfg.masking,
                                      need_grad=False)
                    meter.add("loss/val/teacher", res.loss, n)
                    _add_teacher_terms(meter, "loss/val/teacher", res)

        metrics = {**meter.means(world), "epoch": epoch, "step": step,
                   "time/epoch_seconds": time.perf_counter() - t0}
        if shards is not None:
            metrics["shard/retries"] = shards.retries - retries_before
        if w is not None:
            metrics.update(w.flat("weight"))

        history.append(metrics)

        # --- checkpoint (rank 0 writes; teachers are referenced, never saved) --------------------
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                            "schedule": schedule.state_dict() if schedule else {},
                            "epoch": epoch, "step": step, "history": history}, Path(d) / CKPT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
