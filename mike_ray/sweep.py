"""`python -m mike_ray.sweep SWEEP.yaml [--dry-run] [--resume] [--set KEY=VALUE ...]`

The user's main job, locally or through `ray job submit`: validate the sweep file, build (or re-use)
the data and the teacher zoo, run the trials, log everything to MLflow and print where it went.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from mike_ray.errors import cli_main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mike_ray.sweep", description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="sweep YAML file (see sweeps/)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and trial plan, exit 0")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--profile", help="apply the sweep file's profiles.<NAME> diff (e.g. smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set study.trials=2 (YAML value)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray Train's and Tune's own progress output (status tables, every report)")
    return p


def init_ray(address: str | None, num_cpus: int | None, verbose: bool = False) -> None:
    """Connect to a cluster (``address`` or $RAY_ADDRESS, as under `ray job submit`) or start a
    local instance whose dashboard listens on 127.0.0.1 only. ``verbose``: Ray Train's and Tune's
    own progress output is shown (every worker sees :data:`~mike_ray.utils.VERBOSE_ENV`)."""
    import ray

    from mike_ray.utils import VERBOSE_ENV

    if ray.is_initialized():
        return
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0", VERBOSE_ENV: os.environ[VERBOSE_ENV]}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # a local run's trials are short: Train's controller polls its workers every 0.5 s instead of
        # 2 s, which saves ~5 s per trial on a laptop (clusters keep Ray's default)
        env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"
        # the dashboard serves the State API that Ray Train's placement-group cleaner polls every second;
        # without it the cleaner logs a warning each time, and cannot clean up
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", include_dashboard=True, runtime_env=env)


def check_output(output: str | Path, create: bool) -> None:
    """The sweep's ``output`` folder can hold its results: not a file, and (``create``) created and
    writable — checked before Ray starts, so a bad folder costs no cluster time."""
    import tempfile

    from mike_ray.errors import ConfigError

    p = Path(output)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"output: {p} is a file, not a folder")
    if not create:
        return
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as err:
        raise ConfigError(f"output: {p}: not writable ({err.strerror or type(err).__name__})") from None


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from mike_ray.config import load_sweep

    args = _parser().parse_args(argv)
    cfg = load_sweep(args.sweep, args.overrides, args.profile)
    check_output(cfg.output, create=not args.dry_run)
    from mike_ray.orchestrate.mike_trial import list_teachers

    teachers = list_teachers(cfg, args.sweep)  # your own teachers loaded and probed: before Ray starts
    if args.dry_run:
        from mike_ray.orchestrate.driver import trial_plan

        print(json.dumps(cfg.resolved(), indent=2))
        print(trial_plan(cfg))
        if teachers:
            print("teachers (architecture, parameters, task, taps  [weights]):")
            print("\n".join(t.line() for t in teachers))
        return 0

    from mike_ray.orchestrate.driver import run_sweep

    t0 = time.perf_counter()
    init_ray(cfg.resources.ray_address, cfg.resources.num_cpus, verbose=args.verbose)
    summary = run_sweep(cfg, sweep_file=args.sweep, resume=args.resume)
    print(summary.report())
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
