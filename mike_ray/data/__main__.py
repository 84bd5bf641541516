"""``python -m mike_ray.data {generate,prepare,inspect}`` — build and look at datasets.

Examples::

    # the embedded default (no download): generate a COCO-format dataset, then prepare it
    python -m mike_ray.data generate --out data/synth
    python -m mike_ray.data prepare --coco-root data/synth --out data/prepared

    # real COCO 2017 (same code path): <root>/annotations/instances_train2017.json, <root>/train2017/*.jpg
    python -m mike_ray.data prepare --coco-root /data/coco --splits train2017 val2017 \\
        --out data/prepared --config prepare.yaml        # YAML with PrepareConfig fields
    python -m mike_ray.data prepare --coco-root /data/coco --out data/prepared --tasks DCH CTB

    python -m mike_ray.data inspect data/prepared/<config_key>

``prepare`` prints the dataset directory (``<out>/<config_key>``) on its last line; running it
again with the same config and annotations re-uses that directory. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from mike_ray.config_base import load_model, validate
from mike_ray.data.coco import PrepareConfig
from mike_ray.data.shards import MANIFEST, dataset_summary, prepare_dataset
from mike_ray.data.synth import DEFAULT_IMAGES, DEFAULT_SEED, DEFAULT_SPLIT, generate_coco
from mike_ray.errors import ConfigError, cli_main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mike_ray.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the generated COCO-format default dataset")
    g.add_argument("--out", required=True, help="dataset root (annotations/ and <split>/ go here)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--images", type=int, default=DEFAULT_IMAGES, help=f"number of images (default {DEFAULT_IMAGES})")
    g.add_argument("--split", default=DEFAULT_SPLIT, help=f"split name (default {DEFAULT_SPLIT!r})")
    p = sub.add_parser("prepare", help="crop a COCO-layout dataset into Parquet shards")
    p.add_argument("--coco-root", required=True, help="directory with annotations/instances_<split>.json")
    p.add_argument("--out", required=True, help="parent directory of prepared datasets")
    p.add_argument("--splits", nargs="+", help="source splits (default: every instances_*.json)")
    p.add_argument("--config", help="YAML file with PrepareConfig fields")
    p.add_argument("--tasks", nargs="+", metavar="CODE", help="task codes (overrides the config's tasks)")
    i = sub.add_parser("inspect", help="print a prepared dataset's counts")
    i.add_argument("dir", help="prepared dataset directory (<out>/<config_key>), or <out> to list all")
    return ap


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "generate":
        if args.images < 1:
            raise ConfigError(f"--images: must be >= 1, got {args.images}")
        t0 = time.perf_counter()
        with tqdm(total=args.images, desc="generate", unit="img", file=sys.stderr, disable=None) as bar:
            path = generate_coco(args.out, n_images=args.images, seed=args.seed, split=args.split,
                                 progress=lambda done, total: bar.update(done - bar.n))
        print(f"wrote {args.images} images and {path} in {time.perf_counter() - t0:.1f}s")
        return 0
    if args.cmd == "prepare":
        cfg = load_model(PrepareConfig, args.config) if args.config else PrepareConfig()
        if args.tasks:
            cfg = validate(PrepareConfig, {**cfg.model_dump(), "tasks": args.tasks}, source="--tasks")
        # disable=None: no bar when stderr is not a terminal, so a failing run's stderr is the one error line
        bar = tqdm(desc="prepare", unit="img", file=sys.stderr, disable=None)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        t0 = time.perf_counter()
        try:
            root = prepare_dataset(cfg, args.coco_root, args.out, splits=args.splits, progress=progress)
        finally:
            bar.close()
        print(dataset_summary(root))
        print(f"prepared in {time.perf_counter() - t0:.1f}s")
        print(root)
        return 0
    target = Path(args.dir)
    found = sorted(p.parent for p in target.glob(f"*/{MANIFEST}")) if not (target / MANIFEST).exists() else []
    for root in found or [target]:  # an --out directory: summarise every dataset in it
        print(dataset_summary(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
