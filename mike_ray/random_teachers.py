"""``python -m mike_ray.random_teachers SWEEP.yaml [--profile P] [--set KEY=VALUE ...]``

Writes a randomly initialised state dict for every ``teachers:`` entry of a sweep file whose weights
file does not exist yet — in the entry's own layout (under ``weights_key``, with ``strip_prefix`` put
in front of every key), so the file exercises the same loading path a real checkpoint takes. For smoke
runs and for trying the pipeline before your checkpoints are at hand: a random teacher knows nothing,
so its transfer measures nothing. An existing file is never overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from mike_ray.errors import ConfigError, cli_main


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from mike_ray.config import load_sweep
    from mike_ray.mike.teachers import build_entry_model

    p = argparse.ArgumentParser(prog="python -m mike_ray.random_teachers", description=__doc__.splitlines()[2])
    p.add_argument("sweep")
    p.add_argument("--profile")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_sweep(args.sweep, args.overrides, args.profile)
    if not cfg.teachers:
        raise ConfigError(f"{args.sweep}: teachers: the sweep file lists no teachers of its own")
    for i, (name, entry) in enumerate(cfg.teachers.items()):
        path = Path(entry.weights)
        if path.exists():
            print(f"kept     {name}: {path} exists")
            continue
        model = build_entry_model(name, entry.model_copy(update={"model": {**entry.model, "seed": i}}))
        state = {f"{entry.strip_prefix or ''}{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        obj = {entry.weights_key: state} if entry.weights_key is not None else state
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)  # a killed run leaves no half-written file under the final name
        finally:
            tmp.unlink(missing_ok=True)
        print(f"written  {name}: {path} (random {entry.model.get('arch')}, seed {i})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
