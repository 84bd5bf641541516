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
