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
