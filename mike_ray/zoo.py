"""The zoo skeleton both teacher zoos use: train the missing teachers of a zoo in parallel as Ray
tasks, with a progress bar and typed errors, then write ``zoo.json`` last.

A zoo is a folder of teacher folders (``<name>/teacher.json`` + weights, each written atomically by
its training task) and a ``zoo.json`` whose presence means "complete". The method's zoo module
(:mod:`mike_ray.mike.zoo`, :mod:`mike_ray.mhgd.zoo`) supplies what a teacher is and how it trains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import Field

from mike_ray.config_base import StrictModel
from mike_ray.errors import DataError, ModelError, find_cause, one_line
from mike_ray.utils import write_json_atomic


class TeacherPlacement(StrictModel):
    """Where each teacher of a zoo trains (both zoos' configs extend it). Placement never changes the
    weights, so these fields stay out of a zoo's key (:data:`PLACEMENT_FIELDS`)."""

    cpus_per_teacher: float = Field(1.0, gt=0)
    gpus_per_teacher: float = Field(0.0, ge=0)
    threads: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


PLACEMENT_FIELDS = frozenset(TeacherPlacement.model_fields)


def is_complete(zoo_dir: Path) -> bool:
    """Whether ``zoo_dir`` holds a finished zoo (its ``zoo.json`` is written last)."""
    return (Path(zoo_dir) / "zoo.json").is_file()


def train_missing(zoo_dir: Path, names: Sequence[str], train_fn: Callable[..., Any],
                  args_of: Callable[[str], tuple], *, cpus: float, gpus: float, desc: str,
                  on_done: Callable[[str, Any], str], progress: bool = True) -> None:
    """Train every teacher of ``names`` that has no ``<zoo_dir>/<name>/teacher.json`` yet.

    Each runs as a Ray task ``train_fn(*args_of(name))`` (``cpus``/``gpus`` each, one retry), all at
    once; ``on_done(name, result)`` is called as each finishes (log it, return the progress bar's
    postfix). The finished teachers of an interrupted build are kept, so a re-run trains only the
    rest. A task's mike_ray error is raised as itself (one line); anything else as a ``ModelError``.
    Requires ``ray.init``.
    """
    import ray

    todo = [n for n in names if not (Path(zoo_dir) / n / "teacher.json").is_file()]
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=1)(train_fn)
    pending = {remote.remote(*args_of(n)): n for n in todo}
    bar = None
    if progress and pending:
        from mike_ray.utils import progress_bar

        bar = progress_bar(len(pending), desc, "teacher")
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - a typed error from the task, wrapped by Ray
                cause = find_cause(err)
                raise (cause or ModelError(f"teacher '{name}': training failed: {one_line(str(err))[:300]}")) from None
            postfix = on_done(name, result)
            if bar is not None:
                bar.set_postfix_str(postfix, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def write_manifest(zoo_dir: Path, manifest: Mapping[str, Any]) -> None:
    """``zoo.json``, written atomically and last: from now on the zoo is complete and re-used."""
    write_json_atomic(Path(zoo_dir) / "zoo.json", dict(manifest))


def manifest_names(zoo_dir: Path, what: str) -> list[str]:
    """The teacher names a complete zoo's ``zoo.json`` lists (``what``: "teacher zoo", … for messages);
    a missing or malformed manifest is a one-line :class:`DataError`."""
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        raise DataError(f"{path}: {what} manifest not found (is the zoo built?)")
    try:
        return list(json.loads(path.read_text())["teachers"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: malformed zoo manifest: {one_line(str(err))[:200]}") from None
