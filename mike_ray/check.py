"""``python -m mike_ray.check PATH [PATH ...]`` — validate input files with the readers the pipeline uses.

Each path is checked by the very code that reads it in a run (pycocotools/:func:`load_coco` for
annotation files, PIL/:func:`read_image` for images, pyarrow/:func:`read_shard` for Parquet shards,
:func:`read_manifest`/:func:`check_dataset` for manifests and datasets, ``torch.load(weights_only=True)``
for checkpoints and weights, :func:`load_sweep` for sweep files), so a file that passes here will not
fail there for a format reason. A good file prints ``ok: <path> (<kind>, <summary>)``; a bad one prints
``error: <path>: <field>: <problem>`` on stderr and the exit status is 2.

Kinds (``--kind``; detected from the name and extension when absent):

==========  ==========================================================================================
coco        a COCO ``instances_*.json`` (any ``*.json`` that is not a manifest)
coco-root   a directory with ``annotations/instances_<split>.json``: every image is decoded and its size
            compared with the annotation file (what ``python -m mike_ray.data prepare`` will read)
image       ``*.jpg``/``*.jpeg``/``*.png``/...: decoded in full (a truncated file fails)
shard       ``*.parquet``: schema, blob sizes, mask and label values (image size from the dataset's
            manifest when the shard lies in one, else ``--image-size``)
manifest    ``manifest.json``/``*.manifest.json``; inside a dataset the whole dataset is checked
dataset     a directory with ``manifest.json``: manifest, every shard, row counts, content hash
checkpoint  a transfer checkpoint (``state.pt``, or a ``.pt`` holding model/optimizer/epoch/...)
weights     a state dict ``.pt``; fitted against ``teacher.json`` beside it or ``--model``
teacher     a teacher directory (``teacher.json`` + weights), rebuilt as the sweep loads it
sweep       ``*.yaml``/``*.yml``: a sweep file
==========  ==========================================================================================

``--each`` checks every path and prints one line per path (exit 2 if any failed); without it the
first bad path stops the run.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mike_ray.errors import ConfigError, DataError, MikeRayError, ModelError, cli_main, one_line

KINDS = ("coco", "coco-root", "image", "shard", "manifest", "dataset", "checkpoint", "weights", "teacher", "sweep")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_IMAGE_SIZE = 64  # PrepareConfig's default, for a shard that lies outside a dataset


def detect_kind(path: str | Path) -> str:
    """The kind of ``path`` from its name, extension and (for ``.json``) its first bytes.

    Raises:
        DataError: the path does not exist.
        ConfigError: nothing tells what it is (pass ``--kind``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        for marker, kind in (("manifest.json", "dataset"), ("annotations", "coco-root"), ("teacher.json", "teacher")):
            if (path / marker).exists():
                return kind
        if any(path.glob("*/*.parquet")):  # shards without a manifest: an unfinished build, checked as one
            return "dataset"
        raise ConfigError(f"{path}: a directory without manifest.json, annotations/ or teacher.json; pass --kind")
    name, suffix = path.name.lower(), path.suffix.lower()
    if name == "manifest.json" or name.endswith(".manifest.json"):
        return "manifest"
    if name == "teacher.json":
        return "teacher"
    if suffix == ".json":
        # a manifest under another name: sniff its first bytes instead of parsing a 400 MB COCO file twice
        with open(path, "rb") as fh:
            head = fh.read(4096)
        return "manifest" if b'"config_key"' in head or b'"format_version"' in head else "coco"
    if suffix == ".parquet":
        return "shard"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in (".pt", ".pth"):
        from mike_ray.mike.train import CKPT_FILE

        if path.name == CKPT_FILE:
            return "checkpoint"
        return "weights" if (path.parent / "teacher.json").is_file() else "pt"  # "pt": decided by content
    if suffix in (".yaml", ".yml"):
        return "sweep"
    raise ConfigError(f"{path}: cannot tell the kind of file from its name; pass --kind ({', '.join(KINDS)})")


# --------------------------------------------------------------------------- one check per kind

def _coco(path: Path, **_: Any) -> str:
    from mike_ray.data.coco import load_coco

    coco = load_coco(path)
    return f"{len(coco.imgs)} images, {len(coco.anns)} annotations, {len(coco.cats)} categories"


def _coco_root(path: Path, **_: Any) -> str:
    from mike_ray.data.coco import check_coco_root

    done = check_coco_root(path)
    return ", ".join(f"{split}: {n} images decoded" for split, n in done.items())


def _image(path: Path, **_: Any) -> str:
    from mike_ray.data.coco import read_image

    im = read_image(path)
    return f"{im.size[0]}x{im.size[1]}"


def _shard(path: Path, image_size: int | None = None, **_: Any) -> str:
    from mike_ray.data.shards import MANIFEST, read_manifest, read_shard

    source = "--image-size"
    manifest = path.parent.parent / MANIFEST
    # <dataset>/<split>/<TASK>.parquet: the dataset says how big its crops are, its task table and
    # how many mask channels its rows have
    man = read_manifest(manifest) if manifest.is_file() else None
    if image_size is None:
        image_size, source = DEFAULT_IMAGE_SIZE, "default"
        if man is not None:
            image_size, source = man.image_size, str(manifest)
    table = read_shard(path, image_size, **({"table": man.table, "channels": man.mask_channels} if man else {}))
    return f"{table.num_rows} rows, image_size {image_size} ({source})"


def _manifest(path: Path, **_: Any) -> str:
    from mike_ray.data.coco import SPLITS
    from mike_ray.data.shards import MANIFEST, read_manifest

    if path.name == MANIFEST and any((path.parent / s).is_dir() for s in SPLITS):
        return _dataset(path.parent)  # the manifest of a dataset: check what it promises, too
    man = read_manifest(path)
    return f"config_key {man.config_key}, tasks {' '.join(man.tasks)}"


def _dataset(path: Path, **_: Any) -> str:
    from mike_ray.data.coco import SPLITS
    from mike_ray.data.shards import check_dataset

    man = check_dataset(path)
    rows = {s: sum(man.rows(s, t) for t in man.tasks) for s in SPLITS}
    return (f"config_key {man.config_key}, {len(man.tasks)} tasks, "
            f"{' + '.join(f'{rows[s]} {s}' for s in SPLITS)} crops, content hash verified")


def _spec_model(spec: dict[str, Any] | None, label: str) -> Any:
    from mike_ray.models import build_model

    return None if spec is None else build_model(spec, name=label, imports="any")  # the --model argument


def _checkpoint(path: Path, model: dict[str, Any] | None = None, **_: Any) -> str:
    from mike_ray.mike.train import load_checkpoint
    from mike_ray.models.registry import check_state_dict

    state = load_checkpoint(path)
    fits = ""
    if model is not None:
        check_state_dict(_spec_model(model, "--model"), state.model, path, name="--model", field="model")
        fits = ", fits --model"
    return f"epoch {state.epoch}, step {state.step}, {len(state.model)} model tensors{fits}"


def _weights(path: Path, model: dict[str, Any] | None = None, **_: Any) -> str:
    from mike_ray.models.registry import check_state_dict, load_torch_file

    if model is None and (path.parent / "teacher.json").is_file():
        from mike_ray.mike.zoo import read_teacher

        _teacher_json_is_text(path.parent)
        rec = read_teacher(path.parent)
        model, label = rec.model, f"teacher {rec.name}"
    else:
        label = "--model"
    state = load_torch_file(path, "weights file")
    if model is None:
        if not isinstance(state, dict) or not all(_is_tensor(v) for v in state.values()):
            raise ModelError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
        return f"{len(state)} tensors (no model to fit: pass --model)"
    check_state_dict(_spec_model(model, label), state, path, name=label)
    return f"{len(state)} tensors, fit {label}"


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _pt(path: Path, **kw: Any) -> str:
    """A ``.pt`` of unknown role: a dict with model and optimizer is a checkpoint, anything else weights."""
    from mike_ray.models.registry import load_torch_file

    raw = load_torch_file(path, "torch file")
    if isinstance(raw, dict) and "model" in raw and "optimizer" in raw:
        return _checkpoint(path, **kw)
    return _weights(path, **kw)


def _teacher_json_is_text(teacher_dir: Path) -> None:
    """Workaround: ``zoo.read_teacher`` lets a non-UTF-8 teacher.json escape as a bare UnicodeDecodeError."""
    path = teacher_dir / "teacher.json"
    if path.is_file():
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: malformed teacher manifest: not UTF-8 text (byte {err.start})") from None


def _teacher(path: Path, **_: Any) -> str:
    from mike_ray.mike.zoo import load_teacher

    root = path.parent if path.is_file() else path
    _teacher_json_is_text(root)
    net, rec = load_teacher(root)
    return f"teacher {rec.name} (task {rec.task}), {sum(p.numel() for p in net.parameters())} parameters"


def _sweep(path: Path, **_: Any) -> str:
    from mike_ray.config import load_sweep

    from mike_ray.orchestrate.mike_trial import list_teachers

    cfg = load_sweep(path)
    teachers = list_teachers(cfg, path)  # a teachers: entry is loaded and probed as the sweep would
    return f"sweep {getattr(cfg, 'name', '?')}, {len(teachers)} teacher(s)" if teachers else \
        f"sweep {getattr(cfg, 'name', '?')}"


_CHECKS: dict[str, Callable[..., str]] = {
    "coco": _coco, "coco-root": _coco_root, "image": _image, "shard": _shard, "manifest": _manifest,
    "dataset": _dataset, "checkpoint": _checkpoint, "weights": _weights, "teacher": _teacher, "sweep": _sweep,
    "pt": _pt,
}


def check_path(path: str | Path, kind: str | None = None, *, image_size: int | None = None,
               model: dict[str, Any] | None = None) -> tuple[str, str]:
    """Validate one path with the pipeline's own reader for its kind.

    Args:
        path: the file or directory.
        kind: one of :data:`KINDS`; None detects it (:func:`detect_kind`).
        image_size: crop side for a shard outside a dataset (default: the manifest's, else 64).
        model: a model spec to fit a checkpoint's or weights file's state dict against.
    Returns:
        ``(kind, summary)``.
    Raises:
        MikeRayError: a :class:`DataError`, :class:`ModelError` or :class:`ConfigError` whose one-line
            message starts with (or contains) ``path`` and names the field.
    """
    path = Path(path)
    try:
        if kind is None:
            kind = detect_kind(path)
        elif kind not in KINDS:
            raise ConfigError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
        elif not path.exists():
            raise DataError(f"{path}: not found")
        summary = _CHECKS[kind](path, image_size=image_size, model=model)
    except MikeRayError as err:
        msg = one_line(str(err))
        if str(path) not in msg:  # e.g. a model spec error: say which file it was about
            raise type(err)(f"{path}: {msg}") from None
        raise
    return ("weights" if kind == "pt" else kind), summary


def _parse_model(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    import yaml

    from mike_ray.config_base import parse_yaml

    spec = parse_yaml(text, "--model", yaml.SafeLoader)
    if not isinstance(spec, dict):
        raise ConfigError("--model: must be a mapping such as '{arch: autoencoder, width: 8}'")
    return spec


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mike_ray.check", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to check")
    ap.add_argument("--kind", choices=KINDS, help="what the paths are (default: from the name/extension)")
    ap.add_argument("--each", action="store_true",
                    help="check every path and print one line per path (exit 2 if any failed)")
    ap.add_argument("--image-size", type=int, help="crop side of a shard outside a dataset (default 64)")
    ap.add_argument("--model", help="model spec (YAML/JSON mapping) to fit checkpoints/weights against")
    return ap


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Check each path; ``ok:`` lines on stdout, ``error:`` lines on stderr, exit 2 on any bad input."""
    args = _parser().parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError(f"--image-size: must be >= 1, got {args.image_size}")
    model = _parse_model(args.model)
    failed = 0
    for p in args.paths:
        try:
            kind, summary = check_path(p, args.kind, image_size=args.image_size, model=model)
        except MikeRayError as err:
            if not args.each:
                raise  # cli_main prints the one line and exits 2
            print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
            failed += 1
            continue
        print(f"ok: {p} ({kind}, {summary})", flush=True)
    if failed:
        raise SystemExit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
