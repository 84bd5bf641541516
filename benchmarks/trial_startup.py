"""What starting a trial's teacher shards side by side with Ray Train saves, measured in one run.

    python benchmarks/trial_startup.py [--rounds 3] [--teachers 3] [--epochs 1]

One MIKE transfer (``run_transfer``: a TorchTrainer of one worker, teachers on two shard actors,
tiny generated data) is timed from the creation of its shard pool to the fitted result, two ways:

- **wait**: the pool's actors must load their teachers before Train starts (``pool.taps()`` first:
  how a trial ran before the shard pool became lazy);
- **side by side**: Train starts at once; its worker asks the shards for their taps, so the shard
  actors load their teachers while Train starts its controller and worker (how a trial runs now).

The two variants alternate round by round on the same local Ray (2 CPUs), so background load on the
machine hits both alike; the first round of each is a warm-up and not counted. Prints the median
seconds of each and their ratio. Each transfer has its own run name (no resume).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="counted rounds per variant (after one warm-up)")
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()

    import ray
    import torch

    from _common import TINY_STUDENT, TINY_TEACHER, make_teachers
    from mike_ray.data.coco import PrepareConfig
    from mike_ray.data.shards import prepare_dataset
    from mike_ray.data.synth import generate_coco
    from mike_ray.data.tasks import TASK_CODES
    from mike_ray.mike.config import TransferConfig
    from mike_ray.mike.shard import MikeShardPool, TeacherRef
    from mike_ray.orchestrate.transfer import run_transfer
    from mike_ray.resources import PlacementConfig, WorkersConfig

    torch.set_num_threads(1)
    tasks = ["DCH", "CTB", "PHB"]
    tmp = Path(tempfile.mkdtemp(prefix="mr-bench-startup-"))
    generate_coco(tmp / "coco", n_images=60, seed=0)
    data = prepare_dataset(PrepareConfig(tasks=tasks, augment_copies=1), tmp / "coco", tmp / "prepared")
    named = [(f"T{i:02d}", tasks[i % 3]) for i in range(args.teachers)]
    make_teachers(tmp / "teachers", named, TINY_TEACHER)
    refs = [TeacherRef(name=n, path=str(tmp / "teachers" / n), task_id=TASK_CODES.index(t)) for n, t in named]
    placement = PlacementConfig(mode="ray", teachers_per_shard="auto", num_shards=2, cpus_per_shard=0.5,
                                threads=1, device="cpu")
    workers = WorkersConfig(num_workers=1, cpus_per_worker=0.5)
    cfg = TransferConfig(model=TINY_STUDENT, epochs=args.epochs, batch_size=32, val_batches=1, device="cpu")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    times: dict[str, list[float]] = {"wait": [], "side by side": []}
    for r in range(args.rounds + 1):
        for variant in times:
            t0 = time.perf_counter()
            pool = MikeShardPool(refs, placement)
            try:
                if variant == "wait":
                    pool.taps()  # every shard actor has loaded its teachers before Train starts
                run_transfer(cfg, refs, data, tasks, placement, workers, tmp / "runs", f"{variant[:4]}-{r}",
                             shards=pool)
            finally:
                pool.shutdown()
            dt = time.perf_counter() - t0
            print(f"  round {r} {variant:<13} {dt:5.1f}s{'  (warm-up)' if r == 0 else ''}", file=sys.stderr,
                  flush=True)
            if r:
                times[variant].append(dt)
    ray.shutdown()

    wait, side = (statistics.median(times[k]) for k in ("wait", "side by side"))
    print(f"trial start-up: one MIKE transfer ({args.teachers} teachers on 2 shard actors, 1 Train worker, "
          f"{args.epochs} epoch(s)), median of {args.rounds} rounds, from the shard pool's creation to the result")
    print(f"  wait for the shards, then Train: {wait:6.1f} s")
    print(f"  shards and Train side by side:   {side:6.1f} s")
    print(f"  ratio side by side / wait:       {side / wait:6.2f}")


if __name__ == "__main__":
    main()
