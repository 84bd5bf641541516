"""Task tables: task code → its COCO category names. The default is the MIKE paper's 11 three-class
tasks (§4.1); a sweep's ``tasks:`` section (or ``data.prepare.task_table``) gives its own, with any
number of classes ≥ 1 per task.

A task's integer id is its index in the table (:data:`TASK_CODES` for the default; a prepared
dataset's manifest carries its table); channel k of a task's mask is the task's k-th class. Names
use COCO 2017's exact spelling, so they resolve through any COCO-format annotation file (real COCO
or the generated default, which uses COCO's real ids).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mike_ray.errors import ConfigError, DataError

if TYPE_CHECKING:  # pycocotools is only needed by callers that resolve names
    from pycocotools.coco import COCO

TASKS: dict[str, tuple[str, str, str]] = {
    "PHB": ("person", "handbag", "backpack"),
    "BTS": ("bench", "traffic light", "stop sign"),
    "SSS": ("sports ball", "surfboard", "skateboard"),
    "SOR": ("sink", "oven", "refrigerator"),
    "PCS": ("pizza", "cake", "sandwich"),
    "DCH": ("dog", "cat", "horse"),
    "CBB": ("cup", "bottle", "bowl"),
    "CDP": ("chair", "dining table", "potted plant"),
    "CTL": ("cell phone", "tv", "laptop"),
    "CTB": ("car", "truck", "bus"),
    "BCV": ("book", "clock", "vase"),
}
"""Task code → its three COCO category names, in the order of DESIGN.md (ids 0..10)."""

TASK_CODES: list[str] = list(TASKS)
"""Task codes in id order: ``TASK_CODES[task_id]``."""

CLASS_TO_TASK: dict[str, tuple[str, int]] = {
    name: (code, k) for code, names in TASKS.items() for k, name in enumerate(names)
}
"""COCO category name → (task code, mask channel). The 33 classes are all distinct."""


TaskTable = Mapping[str, Sequence[str]]
"""Task code → its class names (COCO category names), in id order."""

MAX_TASKS = 127          # task ids are stored as int8
MAX_CLASSES_PER_TASK = 32  # mask bytes per row grow with the widest task: 32 × 64 × 64 = 128 kB
_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")


def check_task_table(raw: Any, field: str = "tasks") -> dict[str, tuple[str, ...]]:
    """Validate a task table: a mapping of task code (a letter, then letters, digits or ``_``; at most
    16) → a list of 1..32 distinct COCO category names; no name in two tasks (a crop's task is its
    category's). Returns it with tuples, in the given order (the ids). One-line ConfigError naming
    ``field`` and the offending entry."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{field}: a mapping of task code → list of COCO category names, with at least one task")
    if len(raw) > MAX_TASKS:
        raise ConfigError(f"{field}: {len(raw)} tasks, at most {MAX_TASKS}")
    owner: dict[str, str] = {}
    out: dict[str, tuple[str, ...]] = {}
    for code, names in raw.items():
        if not isinstance(code, str) or not _CODE.match(code):
            raise ConfigError(f"{field}: task code {code!r}: a letter, then letters, digits or '_' (at most 16)")
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ConfigError(f"{field}.{code}: a list of COCO category names, at least one")
        if len(names) > MAX_CLASSES_PER_TASK:
            raise ConfigError(f"{field}.{code}: {len(names)} classes, at most {MAX_CLASSES_PER_TASK}")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{field}.{code}: {name!r} is not a category name")
            if name in owner:
                where = "listed twice" if owner[name] == code else f"also in task {owner[name]}"
                raise ConfigError(f"{field}.{code}: category {name!r} {where} (a crop's task is its category's)")
            owner[name] = code
        out[code] = tuple(names)
    return out


def resolve_table(table: TaskTable | None) -> dict[str, tuple[str, ...]]:
    """A stored or configured table (None: the paper's) as code → class-name tuples, in id order."""
    return {k: tuple(v) for k, v in (table or TASKS).items()}


def table_field(v: Any, field: str) -> dict[str, list[str]] | None:
    """A pydantic validator's body for a task-table field: None stays None; else the checked table
    (lists), or a ValueError whose one-line message names the entry (``tasks.VEH: …``)."""
    if v is None:
        return v
    try:
        return {k: list(names) for k, names in check_task_table(v, field=field).items()}
    except ConfigError as err:
        raise ValueError(str(err)) from None


def table_of(info: Any) -> TaskTable:
    """The task table a pydantic validator checks codes against: the validation context's ``tasks``
    (a sweep file's ``tasks:`` section, passed by :meth:`mike_ray.config.SweepConfig.model_validate`),
    else the paper's default."""
    ctx = getattr(info, "context", None) or {}
    return ctx.get("tasks") or TASKS


def task_id(code: str, table: TaskTable = TASKS) -> int:
    """Integer id of a task code (its index in ``table``); unknown → ConfigError."""
    try:
        return list(table).index(code)
    except ValueError:
        raise ConfigError(f"tasks: unknown task code {code!r} (known: {', '.join(table)})") from None


def check_task_codes(codes: Iterable[str], field: str = "tasks", table: TaskTable = TASKS) -> list[str]:
    """Validate a list of task codes: known in ``table``, no duplicates, at least one. Returns them as a list.

    Raises :class:`ConfigError` naming ``field`` and the offending code.
    """
    out = list(codes)
    if not out:
        raise ConfigError(f"{field}: at least one task is required")
    seen: set[str] = set()
    for code in out:
        if code not in table:
            raise ConfigError(f"{field}: unknown task code {code!r} (known: {', '.join(table)})")
        if code in seen:
            raise ConfigError(f"{field}: task code {code!r} listed twice")
        seen.add(code)
    return out


def resolve_task_categories(coco: "COCO", code: str, source: str, table: TaskTable = TASKS) -> tuple[int, ...]:
    """COCO category ids of a task's classes (``table[code]``), looked up by exact name in ``coco``.

    ``source`` names the annotation file for the error message. A class name the file does not
    define raises :class:`DataError` (``<file>: categories: no category named 'x' (task T)``).
    """
    ids: list[int] = []
    for name in table[code]:
        found = coco.getCatIds(catNms=[name])
        # getCatIds matches names exactly, but a file may define a name twice; that is malformed
        if len(found) != 1:
            what = "no category" if not found else f"{len(found)} categories"
            raise DataError(f"{source}: categories: {what} named {name!r} (task {code})")
        ids.append(int(found[0]))
    return tuple(ids)


def task_classes(codes: Sequence[str], table: TaskTable = TASKS) -> list[str]:
    """All class names of the given tasks, in task then channel order."""
    return [name for code in codes for name in table[code]]


def table_defaults(data: Any) -> Any:
    """A raw sweep (a mapping) with its ``tasks:`` table applied: the table becomes the prepared
    data's ``data.prepare.task_table`` and the default of ``data.prepare.tasks``, ``zoo.tasks`` and
    ``downstream.tasks`` (every task of the table). Anything else (no table, a bad one, a section of
    the wrong type) is returned as it is: the sweep's validators report it, with its path."""
    if not isinstance(data, dict) or data.get("tasks") is None:
        return data
    try:
        check_task_table(data["tasks"])
    except ConfigError:
        return data
    codes = list(data["tasks"])
    data = dict(data)
    if isinstance(data.get("data") or {}, dict) and isinstance((data.get("data") or {}).get("prepare") or {}, dict):
        section = dict(data.get("data") or {})
        prep = dict(section.get("prepare") or {})
        if prep.get("task_table") not in (None, data["tasks"]):
            raise ValueError("data.prepare.task_table: differs from the sweep's tasks: section (give the table "
                             "once, as tasks:)")
        section["prepare"] = {**prep, "task_table": data["tasks"], "tasks": prep.get("tasks", codes)}
        data["data"] = section
    for name in ("zoo", "downstream"):
        if isinstance(data.get(name) or {}, dict):
            data[name] = {"tasks": codes, **(data.get(name) or {})}
    return data
