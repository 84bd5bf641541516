"""MHGD and its baselines: teacher training, phase 1 (attention heads), phase 2 (student), in-process.

    teacher (frozen) ─► teacher_targets(teacher, x) = [V_1 … V_L]   one vector per sample and sensing point
    phase 1:  heads_m  ← minimise Σ_m mean(1 − cos(f2(G·f1(V_m)), V_{m+1}))          (teacher only)
    phase 2:  student  ← ∇CE + ∇wd + clip(∇ Σ_m KL(G^S_m ‖ G^T_m), ‖∇CE‖·sigmoid(epoch − P))   per parameter
              with G = softmax_j(tanh(θ(v_i^B)·φ(v_j^F))) through the frozen heads (BN in inference mode)

Everything here runs in one process without Ray: :func:`train_teacher_classifier` and :func:`run_method`
are functions of a :class:`MHGDConfig` and two datasets that return metrics; per-epoch metrics go to an
optional ``on_epoch(epoch, metrics)`` callback with path-like names. The teacher side is isolated in
:func:`teacher_targets` / :func:`teacher_outputs` (no gradient; a teacher shard can call them and ship
the few small tensors they return), the student side never needs the teacher's weights.

Epochs are counted like the authors': phase-1 (or FSP/AB initialisation) epochs first, ``0 … P−1``,
then the student's ``P … P+E−1``; callback epochs and ``history`` use this global count.

Methods (columns of the paper's table 1):

* ``student``: cross-entropy + weight decay.
* ``soft_logits``: + ``soft_weight · T²·KL(p_T^T ‖ p_S^T)`` (Hinton).
* ``fsp``, ``ab``: an initialisation stage of ``init_epochs`` (default ``phase1_epochs``) trains the student
  (and AB's connectors) on the distillation loss alone; then cross-entropy only.
* ``kdsvd``: + KD-SVD's loss with MHGD's per-parameter clipping, ramp sigmoid(student epoch).
* ``mhgd``: phase 1 then phase 2 as above (DESIGN.md § MHGD).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mike_ray.data.classification import make_classification_loader
from mike_ray.errors import ConfigError, ModelError, TrainingError
from mike_ray.mhgd.attention import MultiHeadGraph
from mike_ray.mhgd.baselines import ABConnectors, ab_distill_loss, fsp_distill_loss, kdsvd_distill_loss
from mike_ray.mhgd.config import CLIPPED, NEEDS_PAIRS, MHGDConfig, as_config
from mike_ray.mhgd.functional import soft_logits_loss
from mike_ray.mhgd.loss import clipped_multitask_grads, mhgd_transfer_loss
from mike_ray.mhgd.teachers import LocalTeachers, TeacherSet, frozen_teacher
from mike_ray.models.registry import ModelSpec, build_model
from mike_ray.models.taps import TappedModel
from mike_ray.utils import limit_threads, resolve_device

EpochCallback = Callable[[int, dict[str, float]], None]
"""``on_epoch(epoch, metrics)``: global epoch index and ``{"acc/val": …, "loss/train/ce": …}``."""
CheckpointCallback = Callable[[int, dict[str, float], dict[str, Any]], None]
"""``on_checkpoint(epoch, metrics, state)``: after every epoch, the run's whole state (tensors, numbers,
lists, dicts: loadable with ``torch.load(weights_only=True)``); ``run_method(resume=state)`` continues
from it exactly (same later epochs as an uninterrupted run)."""


# --------------------------------------------------------------------------------------------
# Plumbing


def _xy(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        x, y = batch["image"], batch["label"]
    else:
        x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _num_classes(ds: Any, spec: ModelSpec, role: str) -> int:
    n = getattr(ds, "num_classes", None)
    if n is None:
        if spec.num_classes is None:
            raise ConfigError(f"{role}.num_classes: the dataset does not tell its class count; set it")
        return spec.num_classes
    if spec.num_classes is not None and spec.num_classes != n:
        raise ConfigError(f"{role}.num_classes: {spec.num_classes}, but the dataset has {n} classes")
    return int(n)


def _build(spec: ModelSpec, num_classes: int, role: str) -> nn.Module:
    return build_model(spec.model_copy(update={"num_classes": num_classes}), name=role, imports="any")  # sweep config


def _image_shape(ds: Any) -> tuple[int, int, int]:
    x = ds[0]["image"] if isinstance(ds[0], Mapping) else ds[0][0]
    return tuple(int(d) for d in x.shape)  # type: ignore[return-value]


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _set_epoch(ds: Any, epoch: int) -> None:
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)


def _eval_view(ds: Any) -> Any:
    return ds.with_augment(False) if getattr(ds, "augment", False) and hasattr(ds, "with_augment") else ds


def _train_loader(ds: Any, cfg: MHGDConfig) -> torch.utils.data.DataLoader:
    if len(ds) < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the training set ({len(ds)} samples)")
    # full batches only: the graph relates the samples of a batch, and batch norm needs > 1 sample
    return make_classification_loader(ds, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)


def _sgd(params: Any, lr: float, cfg: MHGDConfig, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: MHGDConfig, epochs: int) -> torch.optim.lr_scheduler.MultiStepLR:
    milestones = sorted({max(1, round(f * epochs)) for f in cfg.lr_milestones})
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.lr_gamma)


def _finite(value: Tensor, what: str, epoch: int) -> float:
    v = float(value.detach())
    if not math.isfinite(v):
        raise TrainingError(f"{what} is {v} at epoch {epoch}: lower the lr or the loss weight")
    return v


def _mean(acc: Mapping[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in acc.items() if v}


def _emit(history: list[dict[str, float]], on_epoch: EpochCallback | None, epoch: int,
          metrics: dict[str, float], on_checkpoint: CheckpointCallback | None = None,
          snapshot: Callable[[], dict[str, Any]] | None = None) -> None:
    history.append({"epoch": float(epoch), **metrics})
    if on_epoch is not None:
        on_epoch(epoch, dict(metrics))
    if on_checkpoint is not None and snapshot is not None:
        state = {**snapshot(), "history": [dict(h) for h in history], "rng": torch.get_rng_state()}
        on_checkpoint(epoch, dict(metrics), state)


def _cpu(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict's tensors copied to CPU (a checkpoint must not hold device memory)."""
    return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


def _restore(resume: Mapping[str, Any]) -> int:
    """Restore the global RNG of a resumed stage; returns the first epoch (stage-local) still to run."""
    torch.set_rng_state(resume["rng"])
    return int(resume["epoch"]) + 1


def _start_epoch(ds: Any, loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> None:
    """Augmentation and shuffle order of stage-local ``epoch``: functions of (seed, epoch) alone, so a
    resumed run sees the same batches as an uninterrupted one, and every method the same order in its
    student epochs."""
    _set_epoch(ds, epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Any, batch_size: int = 256,
             device: torch.device | str | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (which returns logits) on ``ds`` (no
    augmentation), in eval mode; the model's train/eval flag is restored afterwards.
    Returns ``{"acc": …, "ce": …}``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    correct, total, ce = 0, 0, 0.0
    try:
        for batch in make_classification_loader(_eval_view(ds), batch_size, shuffle=False):
            x, y = _xy(batch, device)
            logits = model(x)
            ce += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was)
    return {"acc": correct / max(total, 1), "ce": ce / max(total, 1)}


# --------------------------------------------------------------------------------------------
# Phase 1: attention heads on the teacher's features


def build_heads(cfg: MHGDConfig, teachers: TeacherSet, image_shape: tuple[int, int, int],
                device: torch.device) -> nn.ModuleList:
    """``heads[t][m]``: one :class:`MultiHeadGraph` per teacher t and module m, widths from the teachers'
    sensing points (one dummy batch)."""
    probe = teachers.outputs(torch.zeros(2, *image_shape, device=device), "mhgd")
    heads = nn.ModuleList()
    for tt in probe:
        chans = [int(v.shape[1]) for v in tt.vectors]
        heads.append(nn.ModuleList(MultiHeadGraph(chans[m], chans[m + 1], cfg.num_heads, cfg.head_dropout)
                                   for m in range(len(chans) - 1)))
    return heads.to(device)


def train_teacher_heads(cfg: MHGDConfig, teachers: TeacherSet, train_ds: Any, device: torch.device,
                        on_epoch: EpochCallback | None, history: list[dict[str, float]], *,
                        resume: Mapping[str, Any] | None = None,
                        on_checkpoint: CheckpointCallback | None = None) -> nn.ModuleList:
    """Phase 1 for every teacher of ``teachers`` at once: ``heads[t][m]`` for teacher t, module m.

    The teachers' phase-1 losses are summed into one optimiser step; their heads share nothing, so
    this equals training each teacher's heads alone. Metrics: ``loss/phase1/train`` (the sum) and,
    per teacher and module, ``loss/phase1/train/m<m>`` (one teacher) or ``…/<teacher>/m<m>``.
    """
    loader = _train_loader(train_ds, cfg)
    heads = build_heads(cfg, teachers, _image_shape(train_ds), device)
    opt = _sgd(heads.parameters(), cfg.phase1_lr, cfg, cfg.phase1_weight_decay)
    start = 0
    if resume is not None:  # a checkpoint taken during phase 1
        heads.load_state_dict(resume["heads"])
        opt.load_state_dict(resume["heads_opt"])
        start = _restore(resume)
    heads.train()
    names = [""] if len(teachers) == 1 else [f"{n}/" for n in teachers.names]
    for epoch in range(start, cfg.phase1_epochs):
        t0 = time.perf_counter()
        _start_epoch(train_ds, loader, cfg.seed, epoch)
        acc: dict[str, list[float]] = defaultdict(list)
        for batch in loader:
            x, _ = _xy(batch, device)
            targets = [tt.to(device) for tt in teachers.outputs(x, "mhgd")]
            losses = {f"{names[t]}m{m}": head.phase1_loss(tt.vectors[m], tt.vectors[m + 1])
                      for t, tt in enumerate(targets) for m, head in enumerate(heads[t])}
            loss = torch.stack(list(losses.values())).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc["loss/phase1/train"].append(_finite(loss, "mhgd phase-1 loss", epoch))
            for k, lm in losses.items():
                acc[f"loss/phase1/train/{k}"].append(float(lm.detach()))
        metrics = _mean(acc)
        metrics["lr"] = cfg.phase1_lr
        metrics["time/epoch_s"] = time.perf_counter() - t0
        _emit(history, on_epoch, epoch, metrics, on_checkpoint,
              lambda: {"stage": "phase1", "epoch": epoch, "heads": _cpu(heads.state_dict()),
                       "heads_opt": opt.state_dict()})
    for per_teacher in heads:
        for head in per_teacher:
            head.freeze()
    return heads


# --------------------------------------------------------------------------------------------
# FSP / AB initialisation stage


def _init_stage(cfg: MHGDConfig, method: str, student: TappedModel, points: list[str], ab_points: list[str],
                teachers: TeacherSet, train_ds: Any, device: torch.device, on_epoch: EpochCallback | None,
                history: list[dict[str, float]], resume: Mapping[str, Any] | None = None,
                on_checkpoint: CheckpointCallback | None = None) -> None:
    """Train the student (and AB's connectors, one set per teacher) on the distillation loss alone for
    ``init_stage_epochs``; with several teachers the losses are summed."""
    epochs = cfg.init_stage_epochs
    if epochs == 0:
        return
    loader = _train_loader(train_ds, cfg)
    extra: list[nn.Parameter] = []
    connectors: nn.ModuleList | None = None
    if method == "ab":
        c, h, w = _image_shape(train_ds)
        with torch.no_grad():
            was = student.training
            student.eval()
            s_out = student(torch.zeros(2, c, h, w, device=device))
            student.train(was)
            probes = teachers.probe(torch.zeros(2, c, h, w, device=device))
        connectors = nn.ModuleList(ABConnectors([int(s_out[p].shape[1]) for p in ab_points],
                                                [int(f.shape[1]) for f in t_feats]) for t_feats, _ in probes).to(device)
        extra = list(connectors.parameters())
    opt = _sgd(list(student.parameters()) + extra, cfg.lr, cfg, cfg.weight_decay)
    start = 0
    if resume is not None:  # a checkpoint taken during the initialisation stage
        student.model.load_state_dict(resume["student"])
        if connectors is not None:
            connectors.load_state_dict(resume["connectors"])
        opt.load_state_dict(resume["opt"])
        start = _restore(resume)
    student.train()
    if connectors is not None:
        connectors.train()
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        _start_epoch(train_ds, loader, cfg.seed, epoch)
        acc: dict[str, list[float]] = defaultdict(list)
        for batch in loader:
            x, _ = _xy(batch, device)
            targets = [tt.to(device) for tt in teachers.outputs(x, method)]
            out = student(x)
            if method == "fsp":
                loss = sum(fsp_distill_loss([out[p] for p in points], tt.fsp, cfg.fsp_weight) for tt in targets)
            else:
                assert connectors is not None
                loss = sum(ab_distill_loss(conn([out[p] for p in ab_points]), tt.on, cfg.ab_weight, cfg.ab_margin,
                                                cfg.ab_layer_weights)
                           for conn, tt in zip(connectors, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc["loss/init/train"].append(_finite(loss, f"{method} initialisation loss", epoch))
        metrics = _mean(acc)
        metrics["lr"] = cfg.lr
        metrics["time/epoch_s"] = time.perf_counter() - t0
        _emit(history, on_epoch, epoch, metrics, on_checkpoint,
              lambda: {"stage": "init", "epoch": epoch, "student": _cpu(student.model.state_dict()),
                       "connectors": _cpu(connectors.state_dict()) if connectors is not None else {},
                       "opt": opt.state_dict()})


# --------------------------------------------------------------------------------------------
# The student loop (shared by every method and by teacher training)


def _fit(cfg: MHGDConfig, method: str, tapped: TappedModel, points: list[str], train_ds: Any, val_ds: Any,
         device: torch.device, epochs: int, epoch_offset: int, teachers: TeacherSet | None,
         heads: nn.ModuleList | None, on_epoch: EpochCallback | None,
         history: list[dict[str, float]], resume: Mapping[str, Any] | None = None,
         on_checkpoint: CheckpointCallback | None = None) -> dict[str, Any]:
    loader = _train_loader(train_ds, cfg)
    params = [p for p in tapped.parameters() if p.requires_grad]
    opt = _sgd(params, cfg.lr, cfg, cfg.weight_decay)
    sched = _scheduler(opt, cfg, epochs)
    best, last = 0.0, 0.0
    start = 0
    if resume is not None:  # a checkpoint taken during the student's epochs
        tapped.model.load_state_dict(resume["student"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        best, last = float(resume["best"]), float(resume["last"])
        start = _restore(resume)
    # frozen heads (mhgd) are part of a student-stage checkpoint: a resumed run rebuilds them from it
    frozen_heads = _cpu(heads.state_dict()) if heads is not None and on_checkpoint is not None else {}
    for e in range(start, epochs):
        epoch = epoch_offset + e
        t0 = time.perf_counter()
        _start_epoch(train_ds, loader, cfg.seed, e)
        tapped.train()
        acc: dict[str, list[float]] = defaultdict(list)
        correct = seen = 0
        for batch in loader:
            x, y = _xy(batch, device)
            targets = ([tt.to(device) for tt in teachers.outputs(x, method)]
                       if (teachers is not None and method != "student") else None)
            out = tapped(x)
            logits = out[cfg.logits_tap]
            ce = F.cross_entropy(logits, y)
            _finite(ce, f"{method} cross-entropy", epoch)
            opt.zero_grad(set_to_none=True)
            if method in CLIPPED:
                assert targets is not None
                feats = [out[p] for p in points]
                # several teachers: their transfer losses are summed (TeacherSet)
                if method == "mhgd":
                    assert heads is not None
                    transfer = sum(mhgd_transfer_loss(list(hs), feats, tt.vectors, cfg.svd_candidates)
                                   for hs, tt in zip(heads, targets))
                    clip_epoch, clip_p1 = float(epoch), float(epoch_offset)   # sigmoid(e), e = student epoch
                else:
                    transfer = sum(kdsvd_distill_loss(feats, tt.vectors, tt.sigmas, cfg.svd_candidates)
                                   for tt in targets)
                    clip_epoch, clip_p1 = float(e), 0.0                      # the authors' KD-SVD ramp
                acc["loss/train/transfer"].append(_finite(transfer, f"{method} transfer loss", epoch))
                grads, stats = clipped_multitask_grads(ce, transfer, params, clip_epoch, clip_p1)
                for p, g in zip(params, grads):
                    p.grad = g
                for k, v in stats.items():
                    acc[f"grad/{k}"].append(v)
                acc["loss/train/total"].append(float(ce.detach() + transfer.detach()))
            elif method == "soft_logits":
                assert targets is not None
                kd = sum(soft_logits_loss(logits, tt.logits, cfg.temperature) for tt in targets)
                loss = ce + cfg.soft_weight * kd
                acc["loss/train/transfer"].append(_finite(kd, "soft-logits loss", epoch))
                acc["loss/train/total"].append(float(loss.detach()))
                loss.backward()
            else:  # student, fsp/ab after their initialisation, teacher training
                ce.backward()
            opt.step()
            acc["loss/train/ce"].append(float(ce.detach()))
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += int(y.numel())
        metrics = _mean(acc)
        if "grad/clip_ratio_max" in acc:
            metrics["grad/clip_ratio_max"] = max(acc["grad/clip_ratio_max"])
        metrics["acc/train"] = correct / max(seen, 1)
        metrics["lr"] = float(opt.param_groups[0]["lr"])
        sched.step()
        ev = evaluate(tapped.model, val_ds, cfg.eval_batch_size, device)
        metrics["acc/val"], metrics["loss/val/ce"] = ev["acc"], ev["ce"]
        metrics["time/epoch_s"] = time.perf_counter() - t0
        last = ev["acc"]
        best = max(best, last)
        _emit(history, on_epoch, epoch, metrics, on_checkpoint,
              lambda: {"stage": "fit", "epoch": e, "student": _cpu(tapped.model.state_dict()),
                       "opt": opt.state_dict(), "sched": sched.state_dict(), "best": best, "last": last,
                       "heads": frozen_heads})
    return {"best_acc": best, "last_acc": last}


def _ab_points(cfg: MHGDConfig, student: nn.Module) -> list[str]:
    if cfg.ab_student_points is not None:
        return list(cfg.ab_student_points)
    names = dict(student.named_modules())
    return [f"{p}.body" if f"{p}.body" in names else p for p in cfg.student_sensing_points]


def _check_channels(cfg: MHGDConfig, teachers: TeacherSet, student: TappedModel, points: list[str],
                    shape: tuple[int, int, int], device: torch.device) -> None:
    """Equal channels (and, for FSP/AB, resolutions) at the sensing points; one dummy batch each."""
    x = torch.zeros(2, *shape, device=device)
    with torch.no_grad():
        probes = teachers.probe(x)
        was = student.training
        student.eval()
        s_out = student(x)
        student.train(was)
    for (t_feats, _), tname in zip(probes, teachers.names):
        _check_pairs(cfg, s_out, points, t_feats, tname if len(teachers) > 1 else "teacher")


def _check_pairs(cfg: MHGDConfig, s_out: Mapping[str, Tensor], points: list[str], t_feats: Sequence[Tensor],
                 tname: str) -> None:
    for pt, ps, ft in zip(cfg.sensing_points, points, t_feats):
        fs = s_out[ps]
        if fs.shape[1] != ft.shape[1]:
            raise ModelError(f"{cfg.method}: teacher and student need equal channels at each sensing point: "
                             f"{tname} '{pt}' has {ft.shape[1]}, student '{ps}' has {fs.shape[1]}")
        if cfg.method == "fsp" and fs.shape[2:] != ft.shape[2:]:
            raise ModelError(f"fsp: {tname} '{pt}' is {tuple(ft.shape[2:])}, student '{ps}' {tuple(fs.shape[2:])}: "
                             f"sensing points must have equal resolution")


# --------------------------------------------------------------------------------------------
# Public entry points


def train_teacher_classifier(cfg: MHGDConfig | Mapping[str, Any], train_ds: Any, val_ds: Any,
                             on_epoch: EpochCallback | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``cfg.teacher`` from scratch with cross-entropy for ``cfg.teacher_epochs``.

    Same optimiser and schedule as the student (``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
    ``lr_milestones``, ``lr_gamma``, ``batch_size``); seeded by ``cfg.seed`` (global RNG untouched).

    Returns:
        ``(model, metrics)``: the trained model (last epoch, eval mode, on the run's device) and
        ``{"best_acc", "last_acc", "history"}`` (history: one dict per epoch, ``epoch`` + metrics).
    """
    cfg = as_config(cfg)
    limit_threads(cfg.threads)
    device = resolve_device(cfg.device)
    history: list[dict[str, float]] = []
    with _seeded(cfg.seed, device):
        model = _build(cfg.teacher, _num_classes(train_ds, cfg.teacher, "teacher"), "teacher").to(device)
        tapped = TappedModel(model, [cfg.logits_tap], name="teacher")
        res = _fit(cfg, "student", tapped, [], train_ds, val_ds, device, cfg.teacher_epochs, 0, None, None,
                   on_epoch, history)
    model.eval()
    return model, {**res, "history": history}


def run_method(cfg: MHGDConfig | Mapping[str, Any],
               teacher_model: nn.Module | Sequence[nn.Module] | TeacherSet | None, train_ds: Any, val_ds: Any,
               on_epoch: EpochCallback | None = None, *, return_model: bool = False,
               on_checkpoint: CheckpointCallback | None = None,
               resume: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train a student from ``cfg.student`` with ``cfg.method``, distilling from ``teacher_model``.

    Args:
        cfg: the run (a :class:`MHGDConfig` or its dict).
        teacher_model: a trained classifier tapped at ``cfg.sensing_points`` / ``cfg.logits_tap``;
            frozen in place (eval mode, no parameter gradients) and moved to the run's device. Or
            several (a list: their transfer losses are summed), or a :class:`TeacherSet` built for
            ``cfg.method`` (e.g. teachers on Ray shards). Unused (may be None) for ``method="student"``.
        train_ds, val_ds: datasets whose items/batches are ``{"image", "label"}`` (e.g.
            :class:`~mike_ray.data.classification.ClassificationDataset`; ``train_ds`` augmented).
        on_epoch: called after every epoch (phase 1 / initialisation epochs included).
        return_model: also return the trained student under ``"student"`` (eval mode).
        on_checkpoint: called after every epoch with the run's state (see :data:`CheckpointCallback`).
        resume: a state given to ``on_checkpoint`` by an earlier run of the same config and data:
            training continues after that epoch, with the same results as an uninterrupted run.

    Returns:
        ``{"method", "best_acc", "last_acc", "history"}``: best and last validation accuracy over the
        student's epochs, and every epoch's metrics (``epoch`` + the callback's dict).

    Raises:
        ConfigError / ModelError before training when the config does not fit the models or data
        (unequal channels at sensing points, unknown taps, batch larger than the data); TrainingError
        on a non-finite loss.

    The same seed gives the same student initialisation, data order and augmentation whatever the
    method, so methods differ only in what they add.
    """
    cfg = as_config(cfg)
    limit_threads(cfg.threads)
    device = resolve_device(cfg.device)
    method = cfg.method
    history: list[dict[str, float]] = [dict(h) for h in resume["history"]] if resume is not None else []
    stage = resume["stage"] if resume is not None else None
    points = cfg.student_sensing_points
    with _seeded(cfg.seed, device):
        num_classes = _num_classes(train_ds, cfg.student, "student")
        student = _build(cfg.student, num_classes, "student").to(device)
        ab_points = _ab_points(cfg, student) if method == "ab" else []
        student_taps = list(dict.fromkeys((points if method != "student" else []) + ab_points + [cfg.logits_tap]))
        tapped = TappedModel(student, student_taps, name="student")
        teacher: TeacherSet | None = None
        if method != "student":
            teacher = _teacher_set(cfg, teacher_model, device)
        shape = _image_shape(train_ds)
        if method in NEEDS_PAIRS:
            assert teacher is not None
            _check_channels(cfg, teacher, tapped, points, shape, device)
        if method == "soft_logits":
            assert teacher is not None
            for (_, tl), tname in zip(teacher.probe(torch.zeros(2, *shape, device=device)), teacher.names):
                if tl is None or tl.shape[1] != num_classes:
                    raise ModelError(f"soft_logits: {tname} logits have {None if tl is None else tl.shape[1]} "
                                     f"classes, student {num_classes}")

        offset = 0
        heads: nn.ModuleList | None = None
        # --- phase 1 (mhgd) or the initialisation stage (fsp, ab); skipped when resuming after it ---
        if method == "mhgd":
            assert teacher is not None
            if stage == "fit":
                heads = build_heads(cfg, teacher, shape, device)
                heads.load_state_dict(resume["heads"])
                for per_teacher in heads:
                    for head in per_teacher:
                        head.freeze()
            else:
                heads = train_teacher_heads(cfg, teacher, train_ds, device, on_epoch, history,
                                            resume=resume if stage == "phase1" else None, on_checkpoint=on_checkpoint)
            offset = cfg.phase1_epochs
        elif method in ("fsp", "ab"):
            assert teacher is not None
            if stage != "fit":
                _init_stage(cfg, method, tapped, points, ab_points, teacher, train_ds, device, on_epoch, history,
                            resume if stage == "init" else None, on_checkpoint)
            offset = cfg.init_stage_epochs
        # --- the student; after FSP/AB initialisation it continues with cross-entropy only ---------
        fit_method = "student" if method in ("fsp", "ab") else method
        res = _fit(cfg, fit_method, tapped, points, train_ds, val_ds, device, cfg.epochs, offset,
                   teacher if fit_method != "student" else None, heads, on_epoch, history,
                   resume if stage == "fit" else None, on_checkpoint)
    out: dict[str, Any] = {"method": method, **res, "history": history}
    if return_model:
        out["student"] = student.eval()
    return out


def _teacher_set(cfg: MHGDConfig, teacher: nn.Module | Sequence[nn.Module] | TeacherSet | None,
                 device: torch.device) -> TeacherSet:
    if teacher is None:
        raise ConfigError(f"method: '{cfg.method}' needs a teacher model")
    if isinstance(teacher, TeacherSet):
        return teacher
    models = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if not models:
        raise ConfigError(f"method: '{cfg.method}' needs a teacher model")
    return LocalTeachers([frozen_teacher(cfg, m.to(device)) for m in models])
