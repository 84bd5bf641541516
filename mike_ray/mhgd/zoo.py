"""The classifier teacher zoo: MHGD's teachers, trained in parallel as Ray tasks, stored with a manifest.

Like the segmenter zoo (:mod:`mike_ray.mike.zoo`), keyed by the config that made it and the data
it was trained on::

    <out>/classifier_zoo/<key>/<name>/weights.pt     state_dict (torch.load(weights_only=True))
    <out>/classifier_zoo/<key>/<name>/teacher.json   name, model spec (num_classes set), accuracy, history
    <out>/classifier_zoo/<key>/zoo.json              written last: the zoo is complete

Each teacher directory is written atomically, so an interrupted build keeps its finished teachers and
a rebuild trains only the missing ones. Every teacher gets an MLflow run (per-epoch metrics, final
accuracy, its ``teacher.json``) nested under the sweep's parent run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Collection

import torch

from mike_ray.mhgd.config import ClassifierTrainConfig, ClassifierZooConfig
from mike_ray.data.classification import ClassificationData, load_splits
from mike_ray.errors import DataError, one_line
from mike_ray.models.registry import ModelSpec, build_model, load_weights, save_weights
from mike_ray.tracking import LazyParentRun, Tracking
from mike_ray.utils import atomic_dir, config_key, resolve_device, write_json_atomic
from mike_ray.zoo import is_complete, manifest_names, train_missing, write_manifest

__all__ = ["ClassifierTrainConfig", "ClassifierZooConfig", "build_classifier_zoo", "data_fingerprint",
           "load_classifier", "read_classifier_zoo", "train_classifier"]

CLASSIFIER_ZOO_FORMAT = 1


def data_fingerprint(data: ClassificationData) -> str:
    """A short hash of what the teachers learn from: the prepared crops' content hash, or, for the
    published datasets, the relative paths and sizes of their files (a stat walk, no reading)."""
    root = Path(data.root)
    if data.source == "crops":
        from mike_ray.data.shards import read_manifest

        return read_manifest(root).content_hash
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    return config_key(files)


def zoo_key(cfg: ClassifierZooConfig, data: ClassificationData, fingerprint: str) -> str:
    """Key of a zoo: teachers + training + data selection + data content (not placement)."""
    relevant = cfg.model_dump(mode="json", include={"teachers", "train"})
    chosen = data.model_dump(mode="json", exclude={"root"})
    return config_key({"zoo": relevant, "data": chosen, "fingerprint": fingerprint,
                       "format": CLASSIFIER_ZOO_FORMAT})


def train_classifier(name: str, spec: ModelSpec, data: ClassificationData, cfg: ClassifierZooConfig,
                     zoo_dir: Path) -> dict[str, Any]:
    """Train teacher ``name`` (cross-entropy from scratch) and write ``zoo_dir/<name>`` atomically.

    Runs in the calling process (a Ray task under :func:`build_classifier_zoo`). Returns its record.
    """
    from mike_ray.mhgd.config import MHGDConfig
    from mike_ray.mhgd.train import train_teacher_classifier

    t0 = time.perf_counter()
    train_ds, val_ds = load_splits(data)
    t = cfg.train
    run = MHGDConfig(method="student", teacher=spec, teacher_epochs=t.epochs, batch_size=min(t.batch_size, len(train_ds)),
                     lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, lr_milestones=t.lr_milestones,
                     lr_gamma=t.lr_gamma, seed=t.seed, device=cfg.device, threads=cfg.threads)
    model, metrics = train_teacher_classifier(run, train_ds, val_ds)
    record = {"name": name, "model": spec.model_copy(update={"num_classes": train_ds.num_classes}).model_dump(mode="json"),
              "num_classes": train_ds.num_classes, "best_acc": metrics["best_acc"], "last_acc": metrics["last_acc"],
              "history": metrics["history"], "data": data.model_dump(mode="json"),
              "train_samples": len(train_ds), "val_samples": len(val_ds),
              "train_seconds": time.perf_counter() - t0, "weights": "weights.pt"}
    with atomic_dir(Path(zoo_dir) / name) as d:
        save_weights(model.cpu(), d / "weights.pt")
        write_json_atomic(d / "teacher.json", record)
    return record


def read_classifier(teacher_dir: Path) -> dict[str, Any]:
    """The ``teacher.json`` of a stored classifier (a missing or malformed one is a :class:`DataError`)."""
    path = Path(teacher_dir) / "teacher.json"
    if not path.is_file():
        raise DataError(f"{path}: teacher record not found")
    try:
        rec = json.loads(path.read_text())
        ModelSpec.model_validate(rec["model"])
        float(rec["best_acc"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed teacher record: {one_line(str(err))[:200]}") from None
    return rec


def load_classifier(teacher_dir: Path, device: str | torch.device = "cpu",
                    imports: Collection[str] = ()) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a stored teacher classifier in eval mode; weights load with ``weights_only=True``.

    ``imports``: the import-path archs the running sweep file names (``import_archs``); a record
    naming any other import path is refused, never imported."""
    rec = read_classifier(teacher_dir)
    model = build_model(ModelSpec.model_validate(rec["model"]), name=rec["name"], imports=imports)
    load_weights(model, Path(teacher_dir) / rec.get("weights", "weights.pt"), name=rec["name"])
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval(), rec


def build_classifier_zoo(cfg: ClassifierZooConfig, data: ClassificationData, out_root: Path,
                         tracking: Tracking | None = None, parent_run_id: str | None = None,
                         progress: bool = True) -> Path:
    """Train every missing teacher of ``cfg`` in parallel as Ray tasks; return the zoo directory.

    Re-uses a complete zoo with the same key, and the finished teachers of an interrupted one.
    Requires ``ray.init``.
    """
    zoo_dir = Path(out_root) / "classifier_zoo" / zoo_key(cfg, data, data_fingerprint(data))
    if is_complete(zoo_dir):
        return zoo_dir

    # teacher runs under a parent of their own (not the sweep's, whose children are its trials)
    zoo_run = LazyParentRun(tracking, f"classifier_zoo-{zoo_dir.name}",
                            {"mike_ray.stage": "zoo", "mike_ray.zoo": zoo_dir.name,
                             **({"mike_ray.sweep_run": parent_run_id} if parent_run_id else {})})

    def done(name: str, rec: dict[str, Any]) -> str:
        if tracking is not None:
            _log_classifier(tracking, zoo_dir / name, rec, zoo_run.id())
        return f"{name} acc {rec['best_acc']:.3f}"

    status = "FAILED"
    try:
        train_missing(zoo_dir, list(cfg.teachers), train_classifier,
                      lambda n: (n, cfg.teachers[n], data, cfg, zoo_dir), cpus=cfg.cpus_per_teacher,
                      gpus=cfg.gpus_per_teacher, desc="classifier teachers", on_done=done, progress=progress)
        status = "FINISHED"
    finally:
        zoo_run.close(status)
    records = {n: read_classifier(zoo_dir / n) for n in cfg.teachers}
    write_manifest(zoo_dir, {
        "format": CLASSIFIER_ZOO_FORMAT, "config": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json"),
        "teachers": {n: {"best_acc": r["best_acc"], "last_acc": r["last_acc"], "path": n} for n, r in records.items()},
    })
    return zoo_dir


def read_classifier_zoo(zoo_dir: Path) -> dict[str, dict[str, Any]]:
    """Every teacher record of a complete classifier zoo, by name."""
    return {n: read_classifier(Path(zoo_dir) / n) for n in manifest_names(zoo_dir, "classifier zoo")}


def _log_classifier(tracking: Tracking, teacher_dir: Path, rec: dict[str, Any], parent_run_id: str | None) -> None:
    from mike_ray.tracking import start_run

    with start_run(tracking, f"teacher-{rec['name']}", parent_run_id,
                   tags={"mike_ray.stage": "teacher", "mike_ray.teacher": rec["name"]}) as run:
        run.params({"model": rec["model"], "data": rec["data"], "train_samples": rec["train_samples"]})
        for h in rec["history"]:
            run.metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
        run.metrics({"acc/best": rec["best_acc"], "acc/last": rec["last_acc"],
                     "time/train_seconds": rec["train_seconds"]})
        run.artifact(teacher_dir / "teacher.json")
        if os.path.getsize(teacher_dir / "weights.pt") <= 64 << 20:  # the store keeps small weights too
            run.artifact(teacher_dir / "weights.pt")
