"""Sweep overhead: the demo sweep's wall time ÷ the time its trials spent training.

    .venv/bin/python benchmarks/sweep_overhead.py                    # sweeps/demo.yaml (re-uses data + zoo)
    .venv/bin/python benchmarks/sweep_overhead.py --profile smoke    # the tiny profile

Runs the sweep in this process on a local Ray instance, times it, and reads every finished trial's
record: ``transfer_seconds`` (Σ of the TorchTrainer's epoch times), ``downstream_seconds`` (the
slowest of the parallel downstream tasks) and ``trial_seconds`` (the trial function's wall time).
Overhead = what is not training: Ray/Tune/Train start-up, shard start-up, MLflow logging, plots,
and the stages when they have to be built.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "demo.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from mike_ray.config import load_sweep
    from mike_ray.orchestrate.driver import run_sweep
    from mike_ray.sweep import init_ray

    cfg = load_sweep(args.sweep, args.overrides, args.profile)
    t0 = time.perf_counter()
    init_ray(cfg.resources.ray_address, cfg.resources.num_cpus)
    t_stages = time.perf_counter()
    summary = run_sweep(cfg, args.sweep)
    wall = time.perf_counter() - t0
    trials = [t for t in summary.trials if "transfer_seconds" in t]
    transfer = sum(t["transfer_seconds"] for t in trials)
    training = sum(t["transfer_seconds"] + t["downstream_seconds"] for t in trials)
    trial_wall = sum(t["trial_seconds"] for t in trials)
    print(f"sweep {cfg.name}: {len(trials)} trials, wall {wall:.0f}s (ray.init {t_stages - t0:.0f}s)")
    for t in trials:
        print(f"  {t['trial_id']:>16s} {t['method']:5s} {t['subset']:8s} transfer {t['transfer_seconds']:6.1f}s "
              f"downstream {t['downstream_seconds']:6.1f}s trial {t['trial_seconds']:6.1f}s")
    print(f"sweep wall ÷ Σ transfer training            = {wall / transfer:.2f}")
    print(f"sweep wall ÷ Σ (transfer + downstream)      = {wall / training:.2f}")
    print(f"sweep wall ÷ Σ trial wall (Tune overhead)   = {wall / trial_wall:.2f}")


if __name__ == "__main__":
    main()
