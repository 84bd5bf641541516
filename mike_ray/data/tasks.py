"""The 11 three-class segmentation tasks of the MIKE paper (§4.1), as COCO category names.

A task's integer id is its index in :data:`TASK_CODES`; channel k of a task's mask is the task's
k-th class. Names use COCO 2017's exact spelling, so they resolve through any COCO-format
annotation file (real COCO or the generated default, which uses COCO's real ids).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

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


def task_id(code: str) -> int:
    """Integer id of a task code (its index in :data:`TASK_CODES`); unknown → ConfigError."""
    try:
        return TASK_CODES.index(code)
    except ValueError:
        raise ConfigError(f"tasks: unknown task code {code!r} (known: {', '.join(TASK_CODES)})") from None


def check_task_codes(codes: Iterable[str], field: str = "tasks") -> list[str]:
    """Validate a list of task codes: known, no duplicates, at least one. Returns them as a list.

    Raises :class:`ConfigError` naming ``field`` and the offending code.
    """
    out = list(codes)
    if not out:
        raise ConfigError(f"{field}: at least one task is required")
    seen: set[str] = set()
    for code in out:
        if code not in TASKS:
            raise ConfigError(f"{field}: unknown task code {code!r} (known: {', '.join(TASK_CODES)})")
        if code in seen:
            raise ConfigError(f"{field}: task code {code!r} listed twice")
        seen.add(code)
    return out


def resolve_task_categories(coco: "COCO", code: str, source: str) -> tuple[int, int, int]:
    """COCO category ids of a task's three classes, looked up by exact name in ``coco``.

    ``source`` names the annotation file for the error message. A class name the file does not
    define raises :class:`DataError` (``<file>: categories: no category named 'x' (task T)``).
    """
    ids: list[int] = []
    for name in TASKS[code]:
        found = coco.getCatIds(catNms=[name])
        # getCatIds matches names exactly, but a file may define a name twice; that is malformed
        if len(found) != 1:
            what = "no category" if not found else f"{len(found)} categories"
            raise DataError(f"{source}: categories: {what} named {name!r} (task {code})")
        ids.append(int(found[0]))
    return ids[0], ids[1], ids[2]


def task_classes(codes: Sequence[str]) -> list[str]:
    """All class names of the given tasks, in task then channel order."""
    return [name for code in codes for name in TASKS[code]]
