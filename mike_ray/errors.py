"""User-facing errors: one line that names the file or field, exit status 2.

Every command-line entry point wraps its ``main`` in :func:`cli_main`, so bad input never
surfaces as a bare traceback. Library code raises the typed subclasses; callers that use the
Python API catch :class:`MikeRayError`.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_BAD_INPUT = 2

F = TypeVar("F", bound=Callable[..., object])


class MikeRayError(Exception):
    """Base class. ``str(err)`` is the one line shown to the user (whitespace runs, newlines
    included, are collapsed: a value quoted from a file can never break the line)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(MikeRayError):
    """A sweep/config file is malformed: the message names the field path."""


class DataError(MikeRayError):
    """A dataset file (COCO json, image, Parquet shard, manifest) is missing or malformed."""


class ModelError(MikeRayError):
    """A model or checkpoint does not fit (wrong input shape, bad weights file, unknown arch)."""


class TrainingError(MikeRayError):
    """Training cannot go on (non-finite loss, ...): the message says where and why."""


def one_line(msg: str) -> str:
    """Collapse a message to a single line (pydantic and OS errors can span several)."""
    return " ".join(str(msg).split())


def cli_main(fn: F) -> F:
    """Decorate a CLI ``main``: a :class:`MikeRayError` prints ``error: <one line>`` and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MikeRayError as err:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def find_cause(err: BaseException) -> MikeRayError | None:
    """Walk an exception chain (Ray wraps worker errors) for one of our typed errors; return it as a
    plain instance of its mike_ray class with a one-line message (Ray's wrappers add tracebacks)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MikeRayError):
            cls = next(c for c in type(e).__mro__ if c.__module__ == "mike_ray.errors")
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            msg = lines[-1] if lines else cls.__name__
            for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
                msg = msg.removeprefix(prefix)
            return cls(one_line(msg))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None
