"""Memory of the query path as the query set grows ×20: the trial driver stays flat, a worker too (mmap).

    python benchmarks/query_memory.py [--images 60] [--scale 20] [--batch 64]

Cost: ~1–2 min on 2 CPU cores (generates and prepares two COCO-format datasets, then 6 subprocesses).

Two datasets are generated and prepared (tasks DCH, CTB, PHB): ``--images`` and ``--scale`` × as
many. Each measurement runs in a fresh process (its own peak):

- ``driver``: what a trial driver does with the query set — the row counts and task shares it sizes
  the shards by (``query_shares``, ``count_rows``); it never reads a row.
- ``worker ram``: a trainer worker with ``transfer.query_memory: ram``: the query set loaded, one
  epoch of mixed batches (``QueryBatches``) iterated.
- ``worker mmap``: the same with ``query_memory: mmap`` (the default): the decoded cache is
  memory-mapped; the worker's own (anonymous) memory holds only the batch being gathered, file pages
  are the kernel's page cache (shared by the workers of a node, reclaimable). The cache is written
  first by another process, as a node's first worker does once.

Printed: peak RSS (VmHWM) and the largest anonymous RSS seen after any batch (RssAnon), MB, and the
×scale / ×1 ratios. Last line: ``query memory ×20: driver X.XX | worker mmap (anon) Y.YY | worker ram Z.ZZ``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import TAG, run_worker, status_mb

TASKS = ["DCH", "CTB", "PHB"]


def _worker(a: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from mike_ray.data.loaders import QueryBatches, ShardDataset, count_rows
    from mike_ray.orchestrate.transfer import query_shares

    root = a["root"]
    base = status_mb("VmRSS")
    rows = count_rows(root, "train", TASKS)
    if a["role"] == "cache":  # a node's first worker decodes the shards into the cache, once
        ShardDataset(root, "train", TASKS, memory="mmap")
        return {}
    if a["role"] == "driver":
        query_shares(root, TASKS)
        return {"rows": rows, "base": base, "peak": status_mb("VmHWM"), "anon": status_mb("RssAnon")}
    q = QueryBatches(ShardDataset(root, "train", TASKS, memory=a["role"]), a["batch"], seed=0)
    anon = status_mb("RssAnon")
    for b in q.epoch(0):
        anon = max(anon, status_mb("RssAnon"))
        del b
    return {"rows": rows, "base": base, "peak": status_mb("VmHWM"), "anon": anon}


def _run(spec: dict) -> dict:
    return run_worker(__file__, spec, 600, spec["role"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--_worker")
    args = ap.parse_args()
    if args._worker:
        print(TAG + json.dumps(_worker(json.loads(args._worker))), flush=True)
        return

    from mike_ray.data.coco import PrepareConfig
    from mike_ray.data.shards import prepare_dataset
    from mike_ray.data.synth import generate_coco

    t0 = time.perf_counter()
    res: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mike-query-mem-") as tmp:
        for scale in (1, args.scale):
            coco = Path(tmp) / f"coco{scale}"
            generate_coco(coco, n_images=args.images * scale, seed=0)
            root = prepare_dataset(PrepareConfig(tasks=TASKS, augment_copies=1), coco, Path(tmp) / f"prep{scale}")
            res[scale] = {role: _run({"role": role, "root": str(root), "batch": args.batch})
                          for role in ("driver", "ram", "cache", "mmap")}
    s = args.scale
    print(f"\nquery set train rows: ×1 {res[1]['driver']['rows']}, ×{s} {res[s]['driver']['rows']} "
          f"(tasks {', '.join(TASKS)}, 3×64×64 crops; {time.perf_counter() - t0:.0f}s)")
    print(f"{'process':<12} | {'×1 peak':>8} | {f'×{s} peak':>9} | {'ratio':>5} | {'×1 anon':>8} | {f'×{s} anon':>9} | {'ratio':>5}")
    ratio = {}
    for role, label in (("driver", "driver"), ("ram", "worker ram"), ("mmap", "worker mmap")):
        a, b = res[1][role], res[s][role]
        ratio[role] = (b["peak"] / a["peak"], b["anon"] / a["anon"])
        print(f"{label:<12} | {a['peak']:8.0f} | {b['peak']:9.0f} | {ratio[role][0]:5.2f} | {a['anon']:8.0f} | "
              f"{b['anon']:9.0f} | {ratio[role][1]:5.2f}")
    print(f"query memory ×{s}: driver {ratio['driver'][0]:.2f} | worker mmap (anon) {ratio['mmap'][1]:.2f} | "
          f"worker ram {ratio['ram'][0]:.2f}")


if __name__ == "__main__":
    main()
