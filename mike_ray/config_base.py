"""Strict pydantic base and YAML loading with one-line, field-naming errors.

Every config model in mike_ray derives from :class:`StrictModel`: unknown keys are errors, and
the error message suggests the closest known key (``teacher_subset`` → did you mean
``teacher_subsets``?).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mike_ray.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: extra keys forbidden, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Known field names of the sub-model that ``loc`` (minus its last element) points into."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        # unwrap Optional[X], list[X], dict[str, X]
        for _ in range(3):
            args = getattr(ann, "__args__", None)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                break
            if not args:
                break
            cands = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            ann = cands[0] if cands else args[-1]
        cur = ann
    fields = getattr(cur, "model_fields", None)
    return list(fields) if fields else []


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line: ``<source>: <field.path>: <problem>`` for the first error (+ count of others)."""
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    path = ".".join(str(p) for p in loc) or "<root>"
    if first.get("type") == "extra_forbidden":
        known = _field_names(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (allowed: {', '.join(known)})" if known else "")
        msg = f"unknown key{hint}"
    else:
        msg = first.get("msg", "invalid value")
        if "input" in first and first.get("type") not in ("missing",):
            shown = repr(first["input"])
            if len(shown) <= 60:
                msg += f", got {shown}"
    more = len(err.errors()) - 1
    tail = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {path}: {msg}{tail}"


def validate(model: type[M], data: Any, source: str = "config") -> M:
    """Validate ``data`` into ``model`` or raise :class:`ConfigError` with a one-line message."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing file or a YAML syntax error is a :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None


def load_model(model: type[M], path: str | Path) -> M:
    """Load YAML at ``path`` and validate it into ``model``."""
    return validate(model, load_yaml(path), source=str(path))
