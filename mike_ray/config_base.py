"""Strict pydantic base and YAML loading with one-line, field-naming errors.

Every config model in mike_ray derives from :class:`StrictModel`: unknown keys are errors, and
the error message suggests the closest known key (``teacher_subset`` → did you mean
``teacher_subsets``?).
"""
from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mike_ray.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: extra keys forbidden, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _unwrap(ann: Any) -> Any:
    """Strip ``Annotated[X, ...]`` and ``Optional`` (``X | None``) down to ``X``."""
    for _ in range(5):
        if get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
            continue
        members = _union_members(ann)
        if members is not None and len(members) == 1:
            ann = members[0]
            continue
        break
    return ann


def _union_members(ann: Any) -> list[Any] | None:
    """Non-None members of a union annotation (None if ``ann`` is not a union)."""
    if get_origin(ann) in (Union, types.UnionType):
        return [a for a in get_args(ann) if a is not type(None)]
    return None


def _branch(members: list[Any], tag: str) -> Any:
    """The union member that pydantic's loc tag (``'list[int]'``, ``'function-after[f(), Range]'``,
    ``"literal['all']"``, ``'str'``) stands for (``Any`` if none matches)."""
    for m in members:
        m = _unwrap(m)
        origin = get_origin(m)
        if isinstance(m, type) and issubclass(m, BaseModel) and re.search(rf"\b{m.__name__}\b", tag):
            return m
        if origin is Literal and tag.startswith("literal["):
            return m
        if origin is not None and isinstance(origin, type) and tag.startswith(f"{origin.__name__}["):
            return m
        if isinstance(m, type) and tag == m.__name__:
            return m
    return Any


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], int | None, Any]:
    """Follow ``loc`` through the model's annotations.

    Returns the path without pydantic's union-branch tags, the index in that path at which the first
    union branch was taken (None if none), and the annotation that the whole ``loc`` points at.
    """
    ann: Any = model
    clean: list[Any] = []
    tag_at: int | None = None
    for part in loc:
        ann = _unwrap(ann)
        members = _union_members(ann)
        if members is not None and isinstance(part, str):  # a union with 2+ members: part is a branch tag
            if tag_at is None:
                tag_at = len(clean)
            ann = _branch(members, part)
            continue
        clean.append(part)
        origin = get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(str(part))
            ann = field.annotation if field is not None else Any
        elif origin in (list, tuple, set, frozenset) and get_args(ann):
            ann = get_args(ann)[0]
        elif origin is dict and len(get_args(ann)) == 2:
            ann = get_args(ann)[1]
        else:
            ann = Any
    return clean, tag_at, _unwrap(ann)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Known field names of the sub-model that ``loc`` (minus its last element) points into."""
    _, _, parent = _walk(model, loc[:-1])
    fields = getattr(parent, "model_fields", None) if isinstance(parent, type) else None
    return list(fields) if fields else []


# Errors that only say "the input is not this union member's type": when a value fits none of a
# union's members they are merged; when one member got further, its (specific) error is shown.
_MISMATCH = {"list_type", "dict_type", "model_type", "model_attributes_type", "string_type", "int_type",
             "int_parsing", "float_type", "float_parsing", "bool_type", "bool_parsing", "literal_error",
             "tuple_type", "set_type", "is_instance_of", "none_required", "enum", "int_from_float"}


def _message(first: dict[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    if first.get("type") == "extra_forbidden":
        known = _field_names(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (allowed: {', '.join(known)})" if known else "")
        return f"unknown key{hint}"
    msg = first.get("msg", "invalid value")
    if first.get("type") in ("value_error", "assertion_error"):
        # a validator's own message, which names the bad value itself
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if "input" in first and first.get("type") != "missing":
        shown = repr(first["input"])
        if len(shown) <= 60:
            msg += f", got {shown}"
    return msg


def _shown_key(key: Any) -> str:
    """A key as it appears in a field path: plain when it is a simple name, else quoted (a key with
    a newline, a space or a quote must not break the one-line message)."""
    s = str(key)
    return s if s and s.isprintable() and not any(c in s for c in " :'\"") else repr(s)


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line: ``<source>: <field.path>: <problem>`` for the first error (+ count of others).

    Union branches are folded: ``lr: {low: 1, high: 0}`` reports the range's own error rather than
    "should be a list", and a value that fits no branch gets one message naming them all.
    """
    errors = err.errors()
    walked = [_walk(model, tuple(e.get("loc", ()))) for e in errors]
    clean, tag_at, _ = walked[0]
    first = errors[0]
    shown_msg = None
    if tag_at is not None:
        group = [i for i, (c, t, _) in enumerate(walked) if t == tag_at and c[:t] == clean[:t]]
        specific = [i for i in group if len(walked[i][0]) > tag_at or errors[i].get("type") not in _MISMATCH]
        if specific:
            first, (clean, tag_at, _) = errors[specific[0]], walked[specific[0]]
        else:
            clean = clean[:tag_at]
            msgs = [errors[i].get("msg", "") for i in group]
            shown_msg = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
            if "input" in first and len(repr(first["input"])) <= 60:
                shown_msg += f", got {first['input']!r}"
    loc = tuple(first.get("loc", ()))
    path = ".".join(_shown_key(p) for p in clean)
    msg = shown_msg or _message(first, model, loc)
    # groups of errors (all branches of one union count once)
    keys = {tuple(c[:t]) if t is not None else (i,) for i, (c, t, _) in enumerate(walked)}
    more = len(keys) - 1
    tail = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
    # a model-level validator names the field in its message ("data.coco_root: ..."): don't repeat it
    if not path or msg.startswith((f"{path}.", f"{path}:")):
        return f"{source}: {msg}{tail}"
    return f"{source}: {path}: {msg}{tail}"


def deep_merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``diff`` merged in (mappings recursively, everything else replaced)."""
    out = dict(base)
    for k, v in diff.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(model: type[M], data: Any, source: str = "config") -> M:
    """Validate ``data`` into ``model`` or raise :class:`ConfigError` with a one-line message."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second ``study:`` section would quietly replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *anchor' entries may legitimately be overridden
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


#: bounds on a YAML document once its aliases are expanded (a sweep file has a few hundred values)
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def check_yaml_shape(tree: Any, source: str) -> Any:
    """``tree`` unchanged if, with every alias expanded, it holds at most :data:`MAX_YAML_VALUES`
    values nested at most :data:`MAX_YAML_DEPTH` deep; else a one-line :class:`ConfigError`.

    YAML aliases share one object, so a 400-byte file can stand for billions of values (every later
    step — validation, printing — walks them all) or for a cycle; the walk is iterative and stops at
    the bound, so checking costs at most the bound."""
    stack = [(tree, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: more than {MAX_YAML_VALUES:,} values once its aliases are expanded "
                              f"(an alias bomb or a self-referencing alias?)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)
    return tree


def parse_yaml(text: str, source: str, loader: Any = None) -> Any:
    """Parse one YAML document with one-line errors and the shape bounds of :func:`check_yaml_shape`
    (an empty document is None)."""
    try:
        tree = yaml.load(text, Loader=loader or _StrictLoader)
    except RecursionError:
        raise ConfigError(f"{source}: nested more than {MAX_YAML_DEPTH} levels deep") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} invalid YAML: {getattr(err, 'problem', None) or err}") from None
    return check_yaml_shape(tree, source)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing or unreadable file, a YAML syntax error, a key given twice or a
    document beyond the shape bounds (:func:`check_yaml_shape`) is a :class:`ConfigError`. An empty
    file is ``{}``; any other top level is returned as it is (the caller says what it must be)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror or err}") from None
    tree = parse_yaml(text, str(p))
    return {} if tree is None else tree


def load_model(model: type[M], path: str | Path) -> M:
    """Load YAML at ``path`` and validate it into ``model``."""
    return validate(model, load_yaml(path), source=str(path))
