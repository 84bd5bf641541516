"""The shard pool: how teachers are split over shards, and shard actors started, called and stopped.

Shared by both methods' teacher shards (:mod:`mike_ray.mike.shard`, :mod:`mike_ray.mhgd.shard`),
which add only what a shard computes. A shard call is a pure function of its arguments, so a call
to a shard that died is sent again once Ray has restarted it (:func:`call_shards`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import torch

from mike_ray.errors import ModelError, TrainingError
from mike_ray.resources import PlacementConfig


def shard_count(n_teachers: int, per_shard: int | str, num_shards: int = 2) -> int:
    """How many shards :func:`partition` makes for ``n_teachers`` (a trial reserves one bundle each)."""
    if per_shard == "all":
        return 1
    if per_shard == "auto":
        return max(1, min(n_teachers, num_shards))
    if int(per_shard) <= 0:
        raise ModelError(f"placement.teachers_per_shard: must be ≥ 1, 'all' or 'auto', got {per_shard}")
    return math.ceil(n_teachers / int(per_shard))


def partition(teachers: Sequence[Any], per_shard: int | str, work: Sequence[float] | None = None,
              num_shards: int = 2) -> list[list[Any]]:
    """Split teachers into shards, each shard's teachers in their given order.

    ``per_shard`` k: consecutive groups of k; "all": one shard; "auto": ``num_shards`` shards (fewer
    if there are fewer teachers) balanced by ``work`` (one number per teacher, default equal): the
    heaviest teacher first, each to the currently lightest shard (LPT; within 4/3 of the best
    split), ties to the lower index, so the plan is deterministic.
    """
    n = shard_count(len(teachers), per_shard, num_shards)
    if per_shard != "auto":
        k = len(teachers) if per_shard == "all" else int(per_shard)
        return [list(teachers[i:i + k]) for i in range(0, len(teachers), k)]
    work = [1.0] * len(teachers) if work is None else [float(w) for w in work]
    if len(work) != len(teachers) or any(not math.isfinite(w) or w < 0 for w in work):
        raise ValueError(f"partition: need one finite work ≥ 0 per teacher, got {work}")
    load = [0.0] * n
    members: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(teachers)), key=lambda i: (-work[i], i)):
        j = min(range(n), key=lambda j: (load[j], len(members[j]), j))
        load[j] += work[i]
        members[j].append(i)
    return [[teachers[i] for i in sorted(m)] for m in members if m]


def forward_flops(spec: Mapping[str, Any], input_shape: Sequence[int] = (3, 64, 64),
                  imports: Sequence[str] | str = ()) -> float:
    """FLOPs of one forward of the model ``spec`` on one sample (torch's FlopCounterMode; an
    untrained instance: the count does not depend on the weights). ``imports`` as in ``build_model``."""
    from torch.utils.flop_counter import FlopCounterMode

    from mike_ray.models import build_model

    model = build_model(dict(spec), imports=imports).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return float(counter.get_total_flops())


def describe_plan(groups: Sequence[Sequence[Any]], work: Sequence[float] | None, names: Sequence[str]) -> str:
    """One line per shard: its teachers and (when known) its share of the expected work."""
    w = dict(zip(names, work)) if work is not None else {}
    total = sum(w.values()) or 1.0
    lines = []
    for i, g in enumerate(groups):
        label = ", ".join(getattr(t, "name", str(t)) for t in g)
        share = f"  {sum(w.get(getattr(t, 'name', str(t)), 0.0) for t in g) / total:5.1%} of the work" if w else ""
        lines.append(f"shard {i}: {label}{share}")
    return "\n".join(lines)


class ShardPool:
    """The client side both methods' shard pools share (:class:`mike_ray.mike.shard.MikeShardPool`,
    :class:`mike_ray.mhgd.shard.MHGDShardPool`). A subclass sets ``placement``, ``groups`` (each
    shard's teacher refs, with ``.name``), ``shards`` (actor handles, or in-process shard objects when
    ``placement.mode == "local"``) and ``retries = 0``; it adds what its method asks of the shards."""

    placement: PlacementConfig
    groups: list[list[Any]]
    shards: list[Any]
    retries: int

    def call(self, method: str, *args: Any) -> list[Any]:
        """``shard.method(*args)`` on every shard, answers in shard order. In process: called as they
        are (tensors stay on the caller's device). On Ray: every tensor argument is put in the object
        store once for all shards (on the CPU), the shards run in parallel, and a shard that died is
        waited for and called again (:func:`call_shards`); re-sent calls count in ``retries``."""
        if self.placement.mode == "local":
            return [getattr(s, method)(*args) for s in self.shards]
        import ray

        refs = [ray.put(a.detach().cpu()) if isinstance(a, torch.Tensor) else a for a in args]
        labels = [", ".join(r.name for r in g) for g in self.groups]
        outs, retried = call_shards(self.shards, labels, method, refs, self.placement)
        self.retries += retried
        return outs

    def shutdown(self) -> None:
        """Kill the shard actors (in-process shards are just dropped)."""
        if self.placement.mode == "ray":
            stop_shard_actors(self.shards)
        self.shards = []


def start_shard_actors(cls: type, args: Sequence[tuple], placement: PlacementConfig,
                       placement_group: object | None = None, first_bundle: int = 0,
                       concurrency: int = 1) -> list[Any]:
    """One Ray actor of ``cls`` per entry of ``args`` (its constructor arguments), with the shard's CPUs,
    GPUs and restart policy from ``placement``; actor i goes to bundle ``first_bundle + i`` of
    ``placement_group`` when given (a Tune trial reserves them, so the autoscaler sees the demand).
    ``concurrency`` > 1 makes a threaded actor serving that many calls at once (torch releases the
    GIL in its kernels; the teachers are read-only, so concurrent steps do not interfere)."""
    import ray

    if concurrency < 1:
        raise ValueError(f"start_shard_actors: concurrency must be ≥ 1, got {concurrency}")
    actor = ray.remote(cls)
    base = dict(num_cpus=placement.cpus_per_shard, num_gpus=placement.gpus_per_shard,
                max_restarts=placement.max_restarts, max_task_retries=0, max_concurrency=concurrency,
                **({"resources": dict(placement.resources)} if placement.resources else {}))
    shards = []
    for i, a in enumerate(args):
        opts = dict(base)
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=first_bundle + i)
        shards.append(actor.options(**opts).remote(*a))
    return shards


def call_shards(shards: Sequence[Any], labels: Sequence[str], method: str, args: Sequence[Any],
                placement: PlacementConfig) -> tuple[list[Any], int]:
    """``shard.<method>.remote(*args)`` on every shard actor at once; returns the answers in shard
    order and how many calls were sent again.

    A shard that dies mid-call is restarted by Ray (``placement.max_restarts``; its constructor reloads
    its teachers). The call waits until the shard answers a ping again (at most
    ``placement.restart_timeout_s``) and is then sent again, up to ``placement.step_retries`` times per
    call: a shard call is a pure function of its arguments, so repeating it is safe. Past either
    limit, a one-line :class:`TrainingError`.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    calls = {i: getattr(s, method).remote(*args) for i, s in enumerate(shards)}
    outs: dict[int, Any] = {}
    attempts = {i: 0 for i in calls}
    retried = 0
    while calls:
        i, ref = next(iter(calls.items()))
        try:
            outs[i] = ray.get(ref)
            del calls[i]
        except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
            attempts[i] += 1
            retried += 1
            if attempts[i] > placement.step_retries:
                raise TrainingError(f"teacher shard {i} ({labels[i]}): died {attempts[i]} times in one "
                                    f"{method} call: {type(err).__name__}") from None
            _wait_until_back(shards[i], f"teacher shard {i} ({labels[i]})", placement.restart_timeout_s)
            calls[i] = getattr(shards[i], method).remote(*args)
    return [outs[i] for i in range(len(shards))], retried


def _wait_until_back(shard: Any, label: str, timeout_s: float) -> None:
    """Block until a restarting shard actor answers ``ping`` (calls to it fail fast while Ray restarts
    it), or raise a one-line :class:`TrainingError` after ``timeout_s``."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrainingError(f"{label}: not back {timeout_s:g} s after it died "
                                f"(placement.restart_timeout_s)")
        try:
            ray.get(shard.ping.remote(), timeout=left)
            return
        except ActorDiedError:  # for good: Ray has no restart left for it
            raise TrainingError(f"{label}: died and will not be restarted "
                                f"(placement.max_restarts exhausted)") from None
        except (ActorUnavailableError, RayActorError, GetTimeoutError):  # still restarting
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2.0, delay * 2)


def stop_shard_actors(shards: Sequence[Any]) -> None:
    """Kill shard actors for good (no restart); a list of in-process shards is simply dropped."""
    import ray

    for s in shards:
        if isinstance(s, ray.actor.ActorHandle):
            ray.kill(s, no_restart=True)


def bundle_strategy(cpus: float, gpus: float = 0.0) -> Any:
    """A scheduling strategy for tasks started from inside a Tune trial: the trial's placement group
    when one of its bundles can hold a task of ``cpus``/``gpus`` (the shards' bundles are idle once
    the transfer is done), otherwise outside it (a task that fits no bundle would wait forever)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.get_current_placement_group()
    fits = pg is not None and any(b.get("CPU", 0) >= cpus and b.get("GPU", 0) >= gpus for b in pg.bundle_specs)
    return PlacementGroupSchedulingStrategy(pg if fits else None, placement_group_bundle_index=-1)
