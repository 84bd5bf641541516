"""Data pipeline throughput on this machine, measured in one run.

    python benchmarks/data_prep.py [--images 1000] [--batch-size 64] [--epochs 3]

Prints: generation (images/s), preparation (crops/s and source images/s, and their ratio = crops
made per source image), and the training loader's samples/s (ShardDataset with a batched
``__getitems__`` through a single-process DataLoader, shuffled), next to the per-item path
(``__getitem__`` + default collate) for scale. Everything runs in one process, one thread.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mike_ray.data.coco import PrepareConfig
from mike_ray.data.loaders import ShardDataset, make_loader
from mike_ray.data.shards import prepare_dataset, read_manifest
from mike_ray.data.synth import DEFAULT_IMAGES, generate_coco


class _PerItem(torch.utils.data.Dataset):
    """The same dataset without ``__getitems__``: the DataLoader fetches and collates item by item."""

    def __init__(self, ds: ShardDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def _rate(loader, n_epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in range(n_epochs):
        for batch in loader:
            n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        coco, out = Path(tmp) / "coco", Path(tmp) / "prepared"
        t0 = time.perf_counter()
        generate_coco(coco, n_images=args.images, seed=0)
        t_gen = time.perf_counter() - t0

        images_used = []
        t0 = time.perf_counter()
        root = prepare_dataset(PrepareConfig(), coco, out, progress=lambda d, t: images_used.append(d))
        t_prep = time.perf_counter() - t0
        man = read_manifest(root)
        crops = sum(man.rows(s, t) for s in ("train", "val") for t in man.tasks)

        t0 = time.perf_counter()
        ds = ShardDataset(root, "train")
        t_load = time.perf_counter() - t0
        batched = _rate(make_loader(ds, args.batch_size, shuffle=True, seed=0), args.epochs)
        per_item = _rate(DataLoader(_PerItem(ds), batch_size=args.batch_size, shuffle=True), 1)

    n_img = images_used[-1] if images_used else 0
    print(f"generate : {args.images} images in {t_gen:.2f}s = {args.images / t_gen:,.0f} images/s")
    print(f"prepare  : {crops} crops from {n_img} images in {t_prep:.2f}s = {crops / t_prep:,.0f} crops/s, "
          f"{n_img / t_prep:,.0f} images/s; crops/s / images/s = {crops / n_img:.1f} crops per image")
    print(f"generate+prepare (default): {t_gen + t_prep:.1f}s")
    print(f"loader   : {len(ds)} train samples loaded in {t_load:.2f}s; batched __getitems__ "
          f"{batched:,.0f} samples/s (batch {args.batch_size}, shuffled, {args.epochs} epochs); "
          f"per-item {per_item:,.0f} samples/s; ratio {batched / per_item:.1f}x")


if __name__ == "__main__":
    main()
