"""The method-family interface: everything the sweep driver and the Tuner ask of a method.

Two families implement it — MIKE (:class:`~mike_ray.orchestrate.mike_trial.MikeFamily`) and MHGD
(:class:`~mike_ray.orchestrate.mhgd_trial.MHGDFamily`) — so the driver and the Tuner hold no
``family == …`` branch: a new family is a new module with one such class, added to :data:`FAMILIES`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from mike_ray.config import SweepConfig
from mike_ray.orchestrate.mhgd_trial import MHGDFamily
from mike_ray.orchestrate.mike_trial import MikeFamily
from mike_ray.orchestrate.records import TrialContext
from mike_ray.tracking import Tracking


class Family(Protocol):
    """One method family.

    Attributes:
        name: the family (``SweepConfig.family``). baseline: the method of its baseline trials.
        teacherless: methods of the family that need no teacher shards (their trials reserve none).
        trial_fn: the Tune trial function, ``trial_fn(params, ctx: TrialContext)``.
    """

    name: str
    baseline: str
    teacherless: frozenset[str]
    trial_fn: Callable[[dict[str, Any], TrialContext], None]

    def stages(self, cfg: SweepConfig, out: Path, tracking: Tracking, parent_id: str) -> tuple[Path | None, Path]:
        """Build (or re-use) what every trial reads: (prepared data root or None, teacher zoo dir)."""

    def settings(self, cfg: SweepConfig, data_root: Path | None) -> Any:
        """The family's slice of the sweep config, as ``TrialContext.settings`` (picklable, typed)."""

    def extra_studies(self, cfg: SweepConfig, seeds: Any) -> list[tuple[str, list[str], dict[str, Any]]]:
        """Tuners run before the search: (tuner name, methods its trials use, param space) each."""

    def teacher_table(self, zoo_dir: Path) -> dict[str, dict[str, float]]:
        """Teacher name → its reference figures (for the report and the summary)."""

    def plan_lines(self, cfg: SweepConfig) -> list[str]:
        """``--dry-run`` lines after the search plan (baselines, controls, shard plans)."""

    def report_lines(self, summary: Any) -> list[str]:
        """The family's part of the end-of-sweep report (teachers, result table)."""

    def log_summary(self, client: Any, parent_id: str, summary: Any) -> None:
        """The family's summary artifacts and metrics on the sweep's parent MLflow run."""


FAMILIES: dict[str, Family] = {"mike": MikeFamily(), "mhgd": MHGDFamily()}


def family_of(cfg: SweepConfig) -> Family:
    """The family of a sweep's method."""
    return FAMILIES[cfg.family]
