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
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from mike_ray.config_base import StrictModel, format_validation_error
from mike_ray.errors import ModelError, TrainingError, one_line
from mike_ray.mike.schedules import ScheduleConfig, make_schedule, progress_at
from mike_ray.utils import limit_threads, seed_everything

CKPT_FILE = "state.pt"


class TransferConfig(StrictModel):
    """What one transfer run trains and how (the worker's slice of a trial's config)."""

    method: Literal["mike", "pixel"] = "mike"
    model: dict[str, Any] = Field(default_factory=lambda: {"arch": "autoencoder", "width": 8, "embed_channels": 2})
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    masking: bool = True
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    threads: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    val_batches: int | None = Field(None, gt=0)  # cap on validation batches (None: all)


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


def _avg(acc: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in acc.items() if v}


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train V2 ``train_loop_per_worker``.

    ``config`` keys: ``transfer`` (a :class:`TransferConfig` dict), ``shards`` (a ShardGroup with
    Ray actor handles, or None for the pixel method), ``taps`` (teacher → tap paths).
    Datasets ``train`` and ``val`` come from ``ray.train.get_dataset_shard`` with columns
    image/mask float32 B×3×64×64 and task_id int64.
    """
    import ray.train
    import ray.train.torch

    from mike_ray.data.loaders import to_float_batch
    from mike_ray.mike.loss import pixel_loss
    from mike_ray.models import build_model

    cfg = TransferConfig.model_validate(config["transfer"])
    shards = config.get("shards")
    taps: dict[str, list[str]] = config.get("taps") or {}
    limit_threads(cfg.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed)

    # --- model, optimizer, schedule -----------------------------------------------------------
    model = build_model(cfg.model)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1, moves to the worker's device
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_teachers = cfg.method == "mike"
    schedule = make_schedule(cfg.schedule, taps) if use_teachers else None
    uniform = make_schedule(ScheduleConfig(name="uniform"), taps) if use_teachers else None

    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    steps_per_epoch = int(config.get("steps_per_epoch") or 1)
    total_steps = cfg.epochs * steps_per_epoch

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
        acc: dict[str, list[float]] = defaultdict(list)
        retries_before = shards.retries if shards is not None else 0
        for batch in train_ds.iter_torch_batches(batch_size=cfg.batch_size, device=device,
                                                 local_shuffle_buffer_size=4 * cfg.batch_size,
                                                 local_shuffle_seed=cfg.seed * 1000 + epoch):
            batch = to_float_batch(batch)
            x, task_ids = batch["image"], batch["task_id"]
            # forward the autoencoder: x̄ = sigmoid(decoder(encoder(x)))
            xbar = model(x)
            w = schedule.weights(progress_at(min(step, total_steps), total_steps)) if schedule else None
            pix_w = 1.0 if w is None else w.pixel

            # teachers: every shard returns its loss and ∂loss/∂x̄ for this batch
            grad = torch.zeros_like(xbar)
            teacher_loss = 0.0
            if w is not None and w.teacher_sum() > 0:
                res = shards.step(x.cpu(), xbar.detach().cpu(), task_ids.cpu(), w.teachers, cfg.masking)
                grad = res.grad.to(device, xbar.dtype)
                teacher_loss = res.loss
                for k, v in res.terms.items():
                    acc[f"loss/teacher/{k}"].append(v)
                if schedule is not None:
                    # adaptive weights learn only from teachers that saw samples of their task
                    seen = {t for t, n in res.counts.items() if n > 0}
                    schedule.update({t: {tap: res.terms[f"{t}/{tap}"] for tap in taps[t]
                                         if f"{t}/{tap}" in res.terms} for t in seen})

            # pixel term, computed here so its gradient joins the teachers' in one backward pass
            pix = pixel_loss(x, xbar)
            total = teacher_loss + pix_w * pix.item()
            if not math.isfinite(total):
                raise TrainingError(f"transfer: non-finite loss {total} at epoch {epoch} step {step} "
                                    f"(teacher {teacher_loss}, pixel {float(pix)})")

            # backward: x̄ receives Σ_s ∂L_s/∂x̄ + w_pix·∂MSE/∂x̄; autograd finishes in the autoencoder
            opt.zero_grad(set_to_none=True)
            if pix_w > 0:
                torch.autograd.backward([xbar, pix_w * pix], [grad, None])
            else:
                xbar.backward(grad)
            opt.step()
            step += 1
            acc["loss/train/total"].append(total)
            acc["loss/train/teacher"].append(teacher_loss)
            acc["loss/train/pixel_mse"].append(pix.item())

        # --- validation: pixel MSE and the uniform-weighted teacher loss, per tap ----------------
        model.eval()
        vacc: dict[str, list[float]] = defaultdict(list)
        with torch.no_grad():
            for i, batch in enumerate(val_ds.iter_torch_batches(batch_size=cfg.batch_size, device=device)):
                if cfg.val_batches is not None and i >= cfg.val_batches:
                    break
                batch = to_float_batch(batch)
                x, task_ids = batch["image"], batch["task_id"]
                xbar = model(x)
                vacc["loss/val/pixel_mse"].append(float(pixel_loss(x, xbar)))
                if uniform is not None:
                    res = shards.step(x.cpu(), xbar.cpu(), task_ids.cpu(), uniform.weights(1.0).teachers,
                                      cfg.masking, need_grad=False)
                    vacc["loss/val/teacher"].append(res.loss)
                    for k, v in res.terms.items():
                        vacc[f"loss/val/teacher/{k}"].append(v)

        metrics = {**_avg(acc), **_avg(vacc), "epoch": epoch, "step": step,
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
