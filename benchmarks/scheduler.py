"""Early stopping: the demo's search with ``study.scheduler`` (ASHA) against the same search without.

    .venv/bin/python benchmarks/scheduler.py                          # demo + a 3-value lr search, 3 epochs
    .venv/bin/python benchmarks/scheduler.py --set output=/tmp/x      # re-use another run's data + zoo

Runs the demo sweep twice in this process on one local Ray instance, side by side on the same data
and teacher zoo (built once, before the timed runs): a search over ``transfer.lr`` (0.004, 0.0004,
0.00004; 3 transfer epochs, one seed, no baselines or controls, so only the search is timed), first
with every trial run to its end, then with ``study.scheduler: {grace_period: 1}``. Prints each run's
wall time, its trials finished and stopped, the best configuration each found (chosen on val), and
the ratio of the two wall times.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ["search.lr=[0.004, 0.0004, 0.00004]", "transfer.epochs=3", "study.repeats=1", "study.baselines=false",
          "study.control=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "demo.yaml"))
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from mike_ray.config import load_sweep
    from mike_ray.orchestrate.driver import run_sweep
    from mike_ray.orchestrate.family import family_of
    from mike_ray.sweep import init_ray
    from mike_ray.tracking import Tracking

    base = load_sweep(args.sweep, [*args.overrides, *SEARCH], args.profile)
    init_ray(base.resources.ray_address, base.resources.num_cpus)
    # the stages (data, zoo) once, untimed: both runs re-use them by key
    family_of(base).stages(base, base.output_dir(), Tracking.resolve(base.output_dir(), base.mlflow.experiment), "")

    rows = []
    for label, extra in (("every trial to its end", []), ("ASHA, grace period 1", ["study.scheduler={grace_period: 1}"])):
        name = "scheduler-bench-" + ("asha" if extra else "full")
        cfg = load_sweep(args.sweep, [*args.overrides, *SEARCH, *extra, f"name={name}"], args.profile)
        t0 = time.perf_counter()
        summary = run_sweep(cfg, args.sweep)
        wall = time.perf_counter() - t0
        best = max(summary.trials, key=lambda t: t["score"] if t["score"] == t["score"] else -1.0, default=None)
        rows.append((label, wall, len(summary.trials), len(summary.stopped),
                     best["params"].get("lr") if best else None, best["score"] if best else float("nan"),
                     sum(t["trial_seconds"] for t in summary.trials)))
    print("| run | wall s | finished | stopped early | best lr (val) | its val score | Σ finished trial s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, wall, done, stopped, lr, score, secs in rows:
        print(f"| {label} | {wall:.0f} | {done} | {stopped} | {lr} | {score:.3f} | {secs:.0f} |")
    print(f"scheduler: wall ASHA/full = {rows[1][1] / rows[0][1]:.2f} | stopped {rows[1][3]} of "
          f"{rows[1][2] + rows[1][3]} trials | same best lr: {rows[0][4] == rows[1][4]}")


if __name__ == "__main__":
    main()
