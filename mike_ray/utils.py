"""Small helpers shared across packages: seeding, thread limits, hashing, atomic writes."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator with that seed."""
    import torch  # here, not at the top: configs import this module and must not pay for torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def limit_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (Ray sets OMP_NUM_THREADS from the actor's CPUs, not torch)."""
    import torch

    if n and n > 0:
        torch.set_num_threads(int(n))


def config_key(obj: Any, n: int = 12) -> str:
    """Short stable hash of a JSON-able object (stage outputs are keyed by the config that made them)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda if available else cpu; otherwise the named device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it to ``final`` only on success.

    An interrupted build leaves a ``.tmp-*`` folder that nothing reads, never a half-filled
    ``final`` that looks complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # a concurrent builder finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temp file + rename (never a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``'s re-exports: name → submodule, imported on
    first use, so importing a torch-free submodule (a config) does not import the package's torch code."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


def progress_bar(total: int | None, desc: str, unit: str, **kwargs: Any) -> Any:
    """A tqdm bar on stderr that stays readable in a log: on a terminal it redraws in place; when
    stderr is a file or a pipe (a ``ray job`` log, CI) it writes a line at most every 30 s
    (``mininterval``) and at the end, instead of one per item."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.1 if tty else 30.0,
                maxinterval=10.0 if tty else 60.0, **kwargs)


VERBOSE_ENV = "MIKE_RAY_VERBOSE"
"""Set to 1 by ``python -m mike_ray.sweep --verbose`` (and passed to every Ray worker): Ray Train's
and Tune's own progress lines are shown; otherwise only their warnings and errors are."""


def verbose() -> bool:
    """Whether this run shows Ray's own progress output (:data:`VERBOSE_ENV`)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def quiet_train_reports() -> None:
    """In a Ray Train worker: Ray logs every ``ray.train.report`` call with its whole metric dict
    (hundreds of metrics per epoch) at INFO, under a logger named by its file path, which Ray Train's
    ``LoggingConfig`` does not reach. Raise that logger to WARNING unless the run is ``--verbose``."""
    if verbose():
        return
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
