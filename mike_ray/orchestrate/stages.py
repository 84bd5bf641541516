"""Pipeline stages before any trial: data → teacher zoo. Each is keyed by its config and re-used.

    <output>/data/generated/<key>/     the embedded COCO-format default (annotations + images)
    <output>/data/prepared/<key>/      Parquet shards + manifest
    <output>/query/<key>/              a folder or COCO query set (MIKE, query.source folder/coco)
    <output>/zoo/<key>/                teacher weights + manifests (MIKE: segmenters)
    <output>/classifier_zoo/<key>/     teacher weights + manifests (MHGD: classifiers)
"""
from __future__ import annotations

import json
from pathlib import Path

from mike_ray.config import ClassificationSource, DataConfig
from mike_ray.data.query import QueryConfig, prepare_query
from mike_ray.data.shards import prepare_dataset
from mike_ray.tracking import Tracking
from mike_ray.mike.zoo import ZooConfig, build_zoo
from mike_ray.utils import atomic_dir, config_key


def _bar(desc: str, unit: str):
    """A progress(done, total) callback drawing a progress bar (throttled when not on a terminal:
    :func:`mike_ray.utils.progress_bar`)."""
    from mike_ray.utils import progress_bar

    state: dict = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = progress_bar(total, desc, unit, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.update(done - bar.n)  # update, not refresh: a redraw only when mininterval has passed
        if done >= total:
            bar.close()

    return progress


def ensure_coco_root(cfg: DataConfig, out: Path) -> Path:
    """The COCO-layout source directory: the user's, or the generated default (built once)."""
    if cfg.source == "coco":
        return Path(cfg.coco_root)  # validated to exist by the config
    from mike_ray.data.synth import DEFAULT_SPLIT, generate_coco

    root = out / "data" / "generated" / config_key(cfg.generate.model_dump())
    if not (root / "annotations" / f"instances_{DEFAULT_SPLIT}.json").is_file():
        # generated under a temporary name: a killed run leaves nothing that looks finished
        with atomic_dir(root) as tmp:
            generate_coco(tmp, n_images=cfg.generate.images, seed=cfg.generate.seed,
                          progress=_bar("generate COCO-format data", "img"))
    return root


def ensure_data(cfg: DataConfig, out: Path) -> Path:
    """Prepared Parquet dataset for ``cfg`` (re-used when its manifest exists)."""
    coco_root = ensure_coco_root(cfg, out)
    return prepare_dataset(cfg.prepare, coco_root, out / "data" / "prepared", splits=cfg.splits,
                           progress=_bar("prepare task crops", "img"))


_QUERY_ROOTS: dict[str, Path] = {}  # this process's prepared query sets, by config: listed once


def ensure_query(cfg: QueryConfig, image_size: int, out: Path) -> Path | None:
    """The prepared folder/COCO query set of ``cfg`` (built once, re-used by key); None for the
    ``tasks`` source, whose query rows are the prepared dataset's own crops."""
    if cfg.source == "tasks":
        return None
    key = json.dumps([cfg.model_dump(mode="json"), image_size, str(out)], sort_keys=True)
    if key not in _QUERY_ROOTS:
        _QUERY_ROOTS[key] = prepare_query(cfg, image_size, out)
    return _QUERY_ROOTS[key]


def ensure_zoo(cfg: ZooConfig, data_root: Path, out: Path, tracking: Tracking | None = None,
               parent_run_id: str | None = None) -> Path:
    """The teacher zoo for ``cfg`` on ``data_root`` (missing teachers are trained as Ray tasks)."""
    return build_zoo(cfg, data_root, out, tracking=tracking, parent_run_id=parent_run_id)


def ensure_classifier_zoo(cfg, source: ClassificationSource, data_root: Path | None, out: Path,
                          tracking: Tracking | None = None, parent_run_id: str | None = None) -> Path:
    """The classifier teachers of an MHGD sweep, trained on ``source`` (crops default to ``data_root``)."""
    from mike_ray.mhgd.zoo import build_classifier_zoo

    return build_classifier_zoo(cfg, source.resolve(data_root), out, tracking=tracking, parent_run_id=parent_run_id)
