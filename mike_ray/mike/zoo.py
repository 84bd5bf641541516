"""The teacher zoo: one segmenter per task, trained in parallel as Ray tasks, stored with a manifest.

Layout of a zoo (keyed by the config that made it and the data it was trained on)::

    <out>/zoo/<key>/<TASK>/weights.pt     state_dict, loadable with torch.load(weights_only=True)
    <out>/zoo/<key>/<TASK>/teacher.json   task, classes, model spec, taps, val and test IoU, data hash
    <out>/zoo/<key>/zoo.json              written last: the zoo is complete

Each teacher directory is written atomically, so a killed build keeps the finished teachers and
re-training resumes with the missing ones only.

Teachers are selected and reported on the val split (``val_miou``); ``test_miou`` is measured once,
after training, on the held-out test split, for reports only. An IoU that does not exist (no test
rows, or a class absent from a split) is NaN in memory and ``null`` in the JSON files, which stay
strict JSON.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection

import torch

from mike_ray.data.tasks import TASKS
from mike_ray.errors import DataError, ModelError, one_line
from mike_ray.metrics import IoUMeter, prevalence_iou
from mike_ray.tracking import LazyParentRun, Tracking
from mike_ray.utils import atomic_dir, config_key, limit_threads, resolve_device, seed_everything, write_json_atomic
from mike_ray.mike.config import ZooConfig
from mike_ray.zoo import PLACEMENT_FIELDS, is_complete, manifest_names, train_missing, write_manifest

ZOO_FORMAT = 2  # 2: teacher.json has test_iou/test_miou (1 had val only)


_FLOAT_FIELDS = ("val_miou", "test_miou", "untrained_miou")
_FLOAT_DICT_FIELDS = ("val_iou", "test_iou", "chance_iou")
_REQUIRED_SINCE_FORMAT_2 = ("test_iou", "test_miou")


@dataclass
class TeacherRecord:
    """What the zoo knows about one trained teacher (the content of teacher.json).

    ``val_iou``/``val_miou``: per class / mean IoU on the val split (selection, normalisation);
    ``test_iou``/``test_miou``: the same on the test split (NaN when the task has no test crops);
    ``untrained_miou``: val mIoU before training; ``chance_iou``: val IoU of "every pixel is this class".
    """

    name: str
    task: str
    classes: list[str]
    model: dict[str, Any]
    taps: list[str]
    val_iou: dict[str, float]
    val_miou: float
    test_iou: dict[str, float]
    test_miou: float
    untrained_miou: float
    chance_iou: dict[str, float]
    data_hash: str
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    weights: str = "weights.pt"

    @property
    def chance_miou(self) -> float:
        """Mean over classes of ``chance_iou`` (NaN when unknown)."""
        vals = [v for v in self.chance_iou.values() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def reference_iou(self) -> dict[str, float]:
        """The mIoU that normalises this task's downstream IoU, per split ("val", "test").

        NaN where the teacher does not beat the trivial "every pixel is this class" predictor (its
        mean ``chance_iou``): a ratio to a teacher that learnt nothing measures nothing, so such a
        task is shown as "—" and left out of the means (the raw IoU is still logged).
        """
        floor = self.chance_miou
        return {split: (m if not math.isnan(m) and (math.isnan(floor) or m > floor) else math.nan)
                for split, m in (("val", self.val_miou), ("test", self.test_miou))}


def zoo_key(cfg: ZooConfig, data_hash: str) -> str:
    """Key of a zoo: its config (minus placement, which does not change the weights) + data hash."""
    relevant = cfg.model_dump(exclude=set(PLACEMENT_FIELDS))
    return config_key({"zoo": relevant, "data": data_hash, "format": ZOO_FORMAT})


def _data_hash(data_root: Path) -> str:
    from mike_ray.data.shards import read_manifest

    return read_manifest(data_root).content_hash


def train_teacher(task: str, data_root: Path, cfg: ZooConfig, out_dir: Path) -> TeacherRecord:
    """Train the segmenter of ``task`` on its train split; write ``out_dir/<task>`` atomically.

    Runs in the calling process (a Ray task when called from :func:`build_zoo`).
    """
    from mike_ray.data.loaders import ShardDataset, make_loader
    from mike_ray.models import build_model
    from mike_ray.models.taps import tap_names

    limit_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    train_ds = ShardDataset(data_root, "train", [task], limit=cfg.train.max_train_samples, seed=cfg.train.seed)
    man = train_ds.manifest
    classes = list(man.classes(task))
    k = len(classes)  # the teacher's output channels; a dataset's masks are as wide as its widest task
    seed_everything(cfg.train.seed + man.task_id(task))
    val_ds = ShardDataset(data_root, "val", [task])
    test_ds = ShardDataset(data_root, "test", [task])  # may be empty (tiny data): test IoU is then NaN
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if len(ds) == 0:
            raise DataError(f"{data_root}: task {task} has no {split} crops (generate or prepare more images, "
                            f"or a larger val_fraction)")
    train_dl = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    val_dl = make_loader(val_ds, 256, shuffle=False)
    test_dl = make_loader(test_ds, 256, shuffle=False)

    spec = {**cfg.model, "num_classes": k}
    model = build_model(spec, imports="any").to(device)  # the sweep's zoo.model
    taps = tap_names(model, cfg.taps)

    def evaluate(loader: torch.utils.data.DataLoader | None = None) -> IoUMeter:
        """IoU of the current model on ``loader`` (default: val); an empty loader gives NaN IoUs."""
        model.eval()
        meter = IoUMeter(k)
        with torch.no_grad():
            for batch in (val_dl if loader is None else loader):
                meter.update(model(batch["image"].to(device)), batch["mask"][:, :k].to(device))
        return meter

    untrained = evaluate().mean()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps = cfg.train.epochs * max(1, len(train_dl))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    history: list[dict[str, float]] = []
    for epoch in range(cfg.train.epochs):
        # one epoch of per-pixel, per-class (multi-label) BCE on the task's masks (one channel per class)
        model.train()
        total, n = 0.0, 0
        for batch in train_dl:
            x, y = batch["image"].to(device), batch["mask"][:, :k].to(device)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise ModelError(f"teacher '{task}': non-finite training loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(x)
            n += len(x)
        meter = evaluate()
        history.append({"epoch": epoch, "loss/train": total / max(n, 1), "iou/val/mean": meter.mean()})

    meter = evaluate()
    test_meter = evaluate(test_dl)  # measured once, never used to choose anything
    chance = prevalence_iou(torch.cat([b["mask"][:, :k] for b in val_dl]))
    rec = TeacherRecord(
        name=task, task=task, classes=classes, model=spec, taps=taps,
        val_iou={c: v for c, v in zip(classes, meter.per_class())}, val_miou=meter.mean(),
        test_iou={c: v for c, v in zip(classes, test_meter.per_class())}, test_miou=test_meter.mean(),
        untrained_miou=untrained, chance_iou={c: v for c, v in zip(classes, chance)},
        data_hash=_data_hash(data_root), history=history, train_seconds=time.perf_counter() - t0,
    )
    with atomic_dir(out_dir / task) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / rec.weights)
        write_json_atomic(tmp / "teacher.json", _nan_to_none(asdict(rec)))  # strict JSON: NaN → null
    return rec


def _nan_to_none(v: Any) -> Any:
    """NaN/inf floats → None, recursively (``json.dump`` would write the non-JSON token ``NaN``)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def _from_json(raw: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`_nan_to_none` on a record: ``null`` IoUs are NaN again (a file of an older
    mike_ray may hold the token ``NaN``, which ``json.loads`` reads as NaN already)."""
    out = dict(raw)
    for name in _FLOAT_FIELDS:
        if name in out and out[name] is None:
            out[name] = math.nan
    for name in _FLOAT_DICT_FIELDS:
        if isinstance(out.get(name), dict):
            out[name] = {k: math.nan if v is None else v for k, v in out[name].items()}
    if isinstance(out.get("history"), list):
        out["history"] = [{k: math.nan if v is None else v for k, v in h.items()} if isinstance(h, dict) else h
                          for h in out["history"]]
    return out


def write_untrained_teachers(root: Path, teachers: Collection[tuple[str, str]], spec: dict[str, Any]) -> list[Path]:
    """Untrained teachers in the stored format (``weights.pt`` + ``teacher.json``), one folder per
    ``(name, task)`` under ``root``, teacher i initialised from seed i: what benchmarks and tests use to
    run many teachers (compute and memory do not depend on the weights). Existing folders are kept.
    Their IoU fields are 0 (never a reference for normalised scores)."""
    from mike_ray.models import build_model, tap_names

    out = []
    for i, (name, task) in enumerate(teachers):
        d = Path(root) / name
        out.append(d)
        if (d / "teacher.json").is_file():
            continue
        model = build_model({**spec, "seed": i})
        classes = list(TASKS[task])
        zeros = {c: 0.0 for c in classes}
        rec = TeacherRecord(name=name, task=task, classes=classes, model=dict(spec),
                            taps=tap_names(model, "blocks"), val_iou=zeros, val_miou=0.0, test_iou=zeros,
                            test_miou=0.0, untrained_miou=0.0, chance_iou=zeros, data_hash="untrained")
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / rec.weights)
        write_json_atomic(d / "teacher.json", asdict(rec))
    return out


def read_teacher(teacher_dir: Path) -> TeacherRecord:
    """Read and validate ``teacher.json`` (a missing or malformed file is a :class:`DataError`)."""
    path = Path(teacher_dir) / "teacher.json"
    if not path.is_file():
        raise DataError(f"{path}: teacher manifest not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: malformed teacher manifest: {one_line(str(err))[:200]}") from None
    if isinstance(raw, dict) and "val_iou" in raw:
        # a teacher of an older zoo format (its zoo key differs, so a build never re-uses it): say so
        missing = [f for f in _REQUIRED_SINCE_FORMAT_2 if f not in raw]
        if missing:
            raise DataError(f"{path}: {', '.join(missing)}: missing (a teacher of an older zoo format, without "
                            f"test IoU: rebuild the zoo)")
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        rec = TeacherRecord(**_from_json(raw))
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed teacher manifest: {one_line(str(err))[:200]}") from None
    # fields used to find and rebuild the teacher: typed, and the weights file stays inside the folder
    for name, typ in (("name", str), ("task", str), ("model", dict), ("taps", list), ("weights", str)):
        if not isinstance(getattr(rec, name), typ):
            raise DataError(f"{path}: {name}: expected {typ.__name__}, got {type(getattr(rec, name)).__name__}")
    if Path(rec.weights).name != rec.weights or rec.weights in ("", ".", ".."):
        raise DataError(f"{path}: weights: {rec.weights!r} must be a file name inside the teacher folder")
    return rec


def load_teacher(teacher_dir: Path, device: str | torch.device = "cpu",
                 imports: Collection[str] = ()) -> tuple[torch.nn.Module, TeacherRecord]:
    """Rebuild a stored teacher, frozen and in eval mode. Weights load with ``weights_only=True``.

    ``imports``: the import-path archs the running sweep file names (``import_archs``); a record
    naming any other import path is a one-line ModelError, and nothing is imported."""
    from mike_ray.models import build_model
    from mike_ray.models.registry import load_weights

    rec = read_teacher(teacher_dir)
    try:
        model = build_model(rec.model, name=rec.name, imports=imports)
    except ModelError as err:  # the record is at fault: name it
        raise ModelError(f"{Path(teacher_dir) / 'teacher.json'}: model: {err}") from None
    model = load_weights(model, Path(teacher_dir) / rec.weights, name=rec.name)
    model.eval().requires_grad_(False)
    return model.to(device), rec


def build_zoo(cfg: ZooConfig, data_root: Path, out_root: Path, tracking: Tracking | None = None,
              parent_run_id: str | None = None, progress: bool = True) -> Path:
    """Train every missing teacher of ``cfg`` in parallel as Ray tasks; return the zoo directory.

    Re-uses a complete zoo with the same key, and the finished teachers of an interrupted one.
    Each teacher's per-epoch metrics and final IoU go to MLflow (one run per teacher, nested under
    ``parent_run_id``) when ``tracking`` is given. Requires ``ray.init`` to have been called.
    """
    zoo_dir = Path(out_root) / "zoo" / zoo_key(cfg, _data_hash(data_root))
    if is_complete(zoo_dir):
        return zoo_dir

    # teacher runs under a parent of their own (not the sweep's, whose children are its trials)
    zoo_run = LazyParentRun(tracking, f"zoo-{zoo_dir.name}", {"mike_ray.stage": "zoo", "mike_ray.zoo": zoo_dir.name,
                                                             **({"mike_ray.sweep_run": parent_run_id}
                                                                if parent_run_id else {})})

    def done(task: str, rec: TeacherRecord) -> str:
        if tracking is not None:
            _log_teacher(tracking, rec, zoo_run.id(), Path(data_root))
        return f"{task} mIoU {rec.val_miou:.3f}"

    status = "FAILED"
    try:
        train_missing(zoo_dir, list(cfg.tasks), train_teacher, lambda t: (t, Path(data_root), cfg, zoo_dir),
                      cpus=cfg.cpus_per_teacher, gpus=cfg.gpus_per_teacher, desc="teacher zoo", on_done=done,
                      progress=progress)
        status = "FINISHED"
    finally:
        zoo_run.close(status)
    records = [read_teacher(zoo_dir / t) for t in cfg.tasks]
    write_manifest(zoo_dir, {
        "format": ZOO_FORMAT, "config": cfg.model_dump(), "data_root": str(data_root),
        "teachers": {r.name: {"task": r.task, "val_miou": _nan_to_none(r.val_miou),
                              "test_miou": _nan_to_none(r.test_miou), "path": r.name} for r in records},
    })
    return zoo_dir


def read_zoo(zoo_dir: Path) -> dict[str, TeacherRecord]:
    """All teacher records of a complete zoo, by name (a missing zoo.json is a :class:`DataError`)."""
    return {n: read_teacher(Path(zoo_dir) / n) for n in manifest_names(zoo_dir, "teacher zoo")}


def _log_teacher(tracking: Tracking, rec: TeacherRecord, parent_run_id: str | None, data_root: Path) -> None:
    from mike_ray.data.query import describe_data
    from mike_ray.tracking import start_run

    with start_run(tracking, f"teacher-{rec.name}", parent_run_id,
                   tags={"mike_ray.stage": "teacher", "mike_ray.task": rec.task}) as run:
        run.params({"task": rec.task, "model": rec.model, "taps": ",".join(rec.taps), "data_hash": rec.data_hash})
        for split, context in (("train", "train"), ("val", "validation"), ("test", "test")):
            name, digest, profile = describe_data(data_root, split, [rec.task])
            run.dataset(name, str(data_root), digest, profile, context)
        for h in rec.history:
            run.metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
        final = {f"iou/{split}/{c.replace(' ', '_')}": v
                 for split, ious in (("val", rec.val_iou), ("test", rec.test_iou)) for c, v in ious.items()}
        final.update({"iou/val/mean": rec.val_miou, "iou/test/mean": rec.test_miou,
                      "iou/untrained/mean": rec.untrained_miou, "time/train_seconds": rec.train_seconds})
        # a missing IoU (no test rows, a class absent from a split) is left out rather than logged as NaN
        run.metrics({k: v for k, v in final.items() if not math.isnan(v)})
