"""MHGD teachers on Ray shards: a shard returns its teachers' targets for a batch, never a gradient.

MHGD's teacher side needs no gradient: per batch, a teacher contributes its compressed vectors
(``[B, C_k]`` per sensing point: a few KB), or its logits / FSP matrices / activation signs for the
baselines (:class:`~mike_ray.mhgd.train.TeacherTargets`). So a shard receives the batch, runs its
teachers one after another under ``no_grad`` and ships those small tensors back; the student's
process keeps only the heads and its own graph. Teachers never see the student.

:class:`MHGDShardPool` is a :class:`~mike_ray.mhgd.train.TeacherSet`: ``run_method`` takes it in place
of local teacher models. Actor handles pickle, so a trial creates the shards (in its placement group)
and hands them to the TorchTrainer's worker.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mike_ray.errors import ModelError
from mike_ray.mhgd.config import MHGDConfig
from mike_ray.mhgd.teachers import LocalTeachers, TeacherSet, TeacherTargets, frozen_teacher
from mike_ray.pool import ShardPool, partition, start_shard_actors
from mike_ray.resources import PlacementConfig
from mike_ray.utils import limit_threads, resolve_device

__all__ = ["ClassifierRef", "MHGDShard", "MHGDShardPool"]


@dataclass(frozen=True)
class ClassifierRef:
    """A stored teacher classifier (a classifier-zoo entry)."""

    name: str
    path: str
    imports: tuple[str, ...] = ()  # import-path archs the running sweep file names (never from a file)


class MHGDShard:
    """One or more frozen teacher classifiers in one process, tapped for ``cfg.method``.

    Args:
        teachers: the teachers this shard serves.
        cfg: the run's :class:`MHGDConfig` (as a dict): method, sensing points, logits tap.
        device: "auto" | "cpu" | "cuda[:i]". threads: torch intra-op threads (None: leave as is).
    """

    def __init__(self, teachers: Sequence[ClassifierRef], cfg: dict[str, Any], device: str = "auto",
                 threads: int | None = 1) -> None:
        from mike_ray.mhgd.zoo import load_classifier

        limit_threads(threads)
        self.device = resolve_device(device)
        run = MHGDConfig.model_validate(cfg)
        frozen = [frozen_teacher(run, load_classifier(Path(r.path), self.device, r.imports)[0]) for r in teachers]
        self.local = LocalTeachers(frozen, [r.name for r in teachers])

    def outputs(self, x: Tensor, method: str) -> list[TeacherTargets]:
        """Per teacher, the targets of ``method`` for ``x`` (on CPU)."""
        return [t.to("cpu") for t in self.local.outputs(x.to(self.device), method)]

    def probe(self, x: Tensor) -> list[tuple[list[Tensor], Tensor | None]]:
        """Per teacher, (features, logits) of a small batch, on CPU (shape checks only)."""
        out = self.local.probe(x.to(self.device))
        return [([f.cpu() for f in feats], None if lg is None else lg.cpu()) for feats, lg in out]

    def ping(self) -> bool:
        return True


class MHGDShardPool(TeacherSet, ShardPool):
    """Teacher classifiers on shards: Ray actors (``placement.mode = "ray"``) or in-process ("local").

    ``teachers_per_shard`` groups teachers on one shard (run one after another there); shards answer
    in parallel. A shard that dies mid-call is restarted by Ray (its constructor reloads the weights)
    and the call is sent again — the call is a pure function of the batch. The count is
    :attr:`retries`.
    """

    def __init__(self, teachers: Sequence[ClassifierRef], cfg: MHGDConfig, placement: PlacementConfig,
                 placement_group: object | None = None, first_bundle: int = 0) -> None:
        if not teachers:
            raise ModelError("teachers: at least one teacher is required")
        self.names = [t.name for t in teachers]
        self.placement = placement
        self.groups = partition(list(teachers), placement.teachers_per_shard, num_shards=placement.num_shards)
        self.retries = 0
        cfg_dict = cfg.model_dump(mode="json")
        if placement.mode == "local":
            self.shards: list[Any] = [MHGDShard(g, cfg_dict, placement.device, None) for g in self.groups]
            return
        import ray

        self.shards = start_shard_actors(MHGDShard, [(g, cfg_dict, placement.device, placement.threads)
                                                           for g in self.groups],
                                         placement, placement_group, first_bundle)
        ray.get([s.ping.remote() for s in self.shards])  # weights load now: a bad teacher fails here

    def outputs(self, x: Tensor, method: str) -> list[TeacherTargets]:
        return [t for out in self.call("outputs", x.detach().cpu(), method) for t in out]

    def probe(self, x: Tensor) -> list[tuple[list[Tensor], Tensor | None]]:
        return [p for out in self.call("probe", x.detach().cpu()) for p in out]
