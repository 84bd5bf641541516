"""Teacher cost vs teacher count: a MIKE step with 1 … 100 teachers, measured side by side in one run.

    python benchmarks/scaling.py [--quick] [--paper] [--device cpu|cuda] [--steps 6] [--warmup 2]

Cost: --quick (N ∈ {1, 11, 100}, 3 timed rounds, the full-batch shard only up to 11) ≈ 4–5 min on
2 CPU cores; the full run (N ∈ {1, 3, 11, 33, 100}, 6 rounds; the full-batch shard at 100 alone is
~100 teachers' work per step) ≈ 15–20 min; --paper adds paper-sized teachers for N ∈ {1, 3, 11}.

A step is one MIKE training step: autoencoder forward → teachers' loss and ∂/∂x̄ → ``x̄.backward`` →
Adam step, on a batch of 64 random 3×64×64 images whose task ids are spread evenly over the N
teachers' tasks (teacher i owns task i; with N > 64 the tasks rotate from step to step, so every
teacher gets rows), query masking on. Teachers are untrained segmenters written in the zoo's stored
format (compute and memory do not depend on the weights' values), 18 taps each, uniform weights.

Variants, all stepping the same student on the same batches:

(a) ``ours``: ``MikeShardPool`` on 2 Ray actor shards (1 CPU, 1 torch thread each;
    ``teachers_per_shard: auto``): each teacher runs on its own rows only (gathered), an absent
    teacher does nothing, and a shard's teachers of one architecture with as many rows, at most
    ``placement.group_rows`` (4) each, run as one grouped (vmapped) forward (``models/stacked.py``).
``one-by-one``: (a) without the grouping — one teacher's forward and backward after another (the
    shard step before grouping), N > 1; at N ≤ 11 (≥ 6 rows per teacher) (a) runs this way too.
(b) ``full-batch``: the shard step before the gather (every teacher on the whole batch, the loss
    masked afterwards) — the same 2 shards, written here as a ``MikeShard`` subclass.
(c) ``peer``: the step written by hand in one process (what a user writes without mike_ray): every
    teacher on the whole batch, every teacher's graph alive until one backward, 2 torch threads (the
    same threads as 2 shards × 1). Run for N ≤ 11 (its memory grows with N: at 100 it does not fit).
``unmasked``: (a) with masking off (every teacher scores every sample), N ∈ {1, 11}.

Step times: one process, one Ray instance, one phase per N: that N's variants and a reference
``ours`` at N = 1 (kept alive throughout) are stepped round-robin (the order rotating every round),
so load from other work on the machine hits them alike; figures are medians, and ``÷ N=1`` divides
by the reference measured in the same phase. A phase's shards are stopped before the next starts
(keeping every N's shards alive at once went out of memory on 24 GiB at N = 100). Memory: each N
again in its own subprocess (own ``ray.init``): the student
process's peak RSS (VmHWM) and each shard's, after warm-up + 2 steps.

The last line is always:
    scaling: step 100/1 = X.XX | student mem 100/1 = Y.YY | peer/ours at 11 = Z.ZZ
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from _common import (PAPER_STUDENT, PAPER_TEACHER, TAG, TINY_STUDENT, TINY_TEACHER, make_teachers, run_worker,
                     status_mb)

BATCH = 64



# --------------------------------------------------------------------------------------------------
# inside the worker processes


def _full_batch_shard_class():
    """The shard step as it was before the gather: every weighted teacher runs on the whole batch
    and the loss is masked afterwards (kept here as the comparison, not in the package)."""
    import torch

    from mike_ray.mike.loss import task_mask, teacher_loss
    from mike_ray.mike.shard import ShardOutput, MikeShard

    class FullBatchShard(MikeShard):
        def step(self, x, xbar, task_ids, weights, masking=True, need_grad=True):
            t0 = time.perf_counter()
            x, xbar = x.to(self.device), xbar.to(self.device).detach().requires_grad_(True)
            grad = torch.zeros_like(xbar)
            total = 0.0
            for name, (ref, tapped) in self.teachers.items():
                w = {tap: float(weights.get(name, {}).get(tap, 0.0)) for tap in self._taps[name]}
                with torch.no_grad():
                    fx = tapped(x)
                mask = task_mask(task_ids, ref.task_id) if masking else torch.ones(len(x), dtype=torch.bool)
                loss, _ = teacher_loss(fx, tapped(xbar), w, mask)
                (g,) = torch.autograd.grad(loss, xbar)
                grad += g
                total += float(loss)
            return ShardOutput(total, {}, grad.cpu(), {}, time.perf_counter() - t0)

    return FullBatchShard


def _one_by_one_shard_class():
    """The gathered step without grouping: every teacher on its own rows, one teacher at a time
    (the shard step before same-architecture teachers ran as one grouped forward)."""
    from mike_ray.mike.shard import MikeShard

    class OneByOneShard(MikeShard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._stacks = {}

    return OneByOneShard


class _Case:
    """One teacher count: its refs, uniform weights and the batches (same for every variant)."""

    def __init__(self, zoo: Path, n: int):
        from mike_ray.mike.shard import TeacherRef
        from mike_ray.mike.zoo import read_teacher

        self.n = n
        self.refs = [TeacherRef(name=f"T{i:03d}", path=str(zoo / f"T{i:03d}"), task_id=i) for i in range(n)]
        taps = read_teacher(Path(self.refs[0].path)).taps
        self.weights = {r.name: {t: 1.0 / (n * len(taps)) for t in taps} for r in self.refs}  # uniform, Σ = 1

    def task_ids(self, step: int):
        import torch

        return (torch.arange(BATCH) + step * BATCH) % self.n  # even mix; rotating when N > batch


class _Student:
    def __init__(self, spec: dict[str, Any], device: str):
        import torch

        from mike_ray.models import build_model

        self.device = device
        self.ae = build_model({**spec, "seed": 0}).to(device)
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=1e-3)
        self.x = torch.rand(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
        self.count = 0

    def step(self, fn) -> float:
        """One step with ``fn(x, x̄_detached, step) -> ∂/∂x̄``; returns seconds (device synchronised)."""
        import torch

        t0 = time.perf_counter()
        xbar = self.ae(self.x)
        grad = fn(self.x, xbar.detach(), self.count)
        self.opt.zero_grad(set_to_none=True)
        xbar.backward(grad.to(xbar.device))
        self.opt.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.count += 1
        return time.perf_counter() - t0


def _peer_fn(case: _Case, device: str):
    """(c): every teacher in this process on the whole batch, all graphs alive, one backward."""
    import torch

    from mike_ray.mike.loss import task_mask, teacher_loss
    from mike_ray.models import TappedModel
    from mike_ray.mike.zoo import load_teacher

    tapped = []
    for r in case.refs:
        model, rec = load_teacher(Path(r.path), device)
        tapped.append(TappedModel(model, rec.taps).eval().requires_grad_(False))

    def fn(x, xbar, step):
        xb = xbar.requires_grad_(True)
        ids = case.task_ids(step).to(x.device)
        total = None
        for ref, t in zip(case.refs, tapped):
            with torch.no_grad():
                fx = t(x)
            loss, _ = teacher_loss(fx, t(xb), case.weights[ref.name], task_mask(ids, ref.task_id))
            total = loss if total is None else total + loss
        (g,) = torch.autograd.grad(total, xb)
        return g

    return fn


def _placement(device: str, num_shards: int = 2):
    from mike_ray.resources import PlacementConfig

    return PlacementConfig(mode="ray", teachers_per_shard="auto", num_shards=num_shards, cpus_per_shard=1.0,
                           gpus_per_shard=0.0, threads=1, device=device)


def _ray_init(device: str) -> None:
    import ray

    ray.init(address="local", num_cpus=64, num_gpus=1 if device == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, object_store_memory=512 * 1024 ** 2,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def _worker_time(a: dict[str, Any]) -> dict[str, Any]:
    """One phase per N, in this one process: that N's variants and the N = 1 reference (``ours/1``,
    alive throughout) stepped round-robin; the phase's shards are stopped before the next one, so
    only ~6 shard actors are ever alive (all N at once did not fit in 24 GiB). Ratios against N = 1
    use the reference measured in the same phase."""
    import torch

    from mike_ray.mike.shard import MikeShardPool
    from mike_ray.pool import call_shards, partition, start_shard_actors, stop_shard_actors

    torch.set_num_threads(2)
    dev = a["device"]
    _ray_init(dev)
    zoo = Path(a["zoo"])
    FullBatchShard = _full_batch_shard_class()
    OneByOneShard = _one_by_one_shard_class()
    student = _Student(a["student"], dev)
    ref_case = _Case(zoo, 1)
    ref = MikeShardPool(ref_case.refs, _placement(dev))
    step_ms: dict[str, float] = {}
    ref_ms: dict[int, float] = {}
    plans = {1: ref.plan}
    for n in a["ns"]:
        # --- this phase's variants (label → fn(x, x̄, step) → grad) ---------------------------------
        case = _Case(zoo, n)
        stop: list[Any] = []
        variants: dict[str, Any] = {
            "ref": lambda x, xb, s: ref.step(x, xb, ref_case.task_ids(s), ref_case.weights).grad}
        ours = ref if n == 1 else MikeShardPool(case.refs, _placement(dev))
        if n != 1:
            stop.append(ours.shutdown)
        plans[n] = ours.plan
        variants[f"ours/{n}"] = (lambda c, g: lambda x, xb, s: g.step(x, xb, c.task_ids(s), c.weights).grad)(case, ours)
        if n in a["unmasked"]:
            variants[f"unmasked/{n}"] = (lambda c, g: lambda x, xb, s: g.step(x, xb, c.task_ids(s), c.weights,
                                                                           masking=False).grad)(case, ours)
        for label, cls, wanted in (("full-batch", FullBatchShard, a["full"]), ("one-by-one", OneByOneShard, a["one_by_one"])):
            if n not in wanted:
                continue
            plan = partition(case.refs, "auto", None, 2)
            shards = start_shard_actors(cls, [(g, dev, 1, False) for g in plan], _placement(dev))
            stop.append(lambda shards=shards: stop_shard_actors(shards))

            def other(x, xb, s, c=case, shards=shards):
                import ray

                refs = [ray.put(t.cpu()) for t in (x, xb, c.task_ids(s))]
                outs, _ = call_shards(shards, [str(i) for i in range(len(shards))], "step",
                                      (*refs, c.weights), _placement(dev))
                return sum(o.grad for o in outs)

            variants[f"{label}/{n}"] = other
        if n in a["peer"]:
            variants[f"peer/{n}"] = _peer_fn(case, dev)
        # --- round-robin rounds, the order rotating every round ------------------------------------
        labels = list(variants)
        times: dict[str, list[float]] = {k: [] for k in labels}
        for r in range(a["warmup"] + a["steps"]):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for k in order:
                t = student.step(variants[k])
                if r >= a["warmup"]:
                    times[k].append(t)
            print(f"  N={n}: round {r + 1}/{a['warmup'] + a['steps']}", file=sys.stderr, flush=True)
        ref_ms[n] = statistics.median(times.pop("ref")) * 1000
        step_ms.update({k: statistics.median(v) * 1000 for k, v in times.items()})
        for f in stop:
            f()
    return {"step_ms": step_ms, "ref_ms": ref_ms, "plans": plans}


def _worker_mem(a: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of the student process and of each shard for one N (a fresh process)."""
    import ray
    import torch

    from mike_ray.mike.shard import MikeShardPool

    torch.set_num_threads(2)
    dev = a["device"]
    _ray_init(dev)
    case = _Case(Path(a["zoo"]), a["n"])
    student = _Student(a["student"], dev)
    base = status_mb("VmRSS")
    group = MikeShardPool(case.refs, _placement(dev))
    for _ in range(a["warmup"] + 2):
        student.step(lambda x, xb, s: group.step(x, xb, case.task_ids(s), case.weights).grad)
    return {"n": a["n"], "base_mb": base, "peak_mb": status_mb("VmHWM"),
            "shard_peak_mb": ray.get([s.peak_rss_mb.remote() for s in group.shards]),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if dev == "cuda" else None}


def _worker(a: dict[str, Any]) -> dict[str, Any]:
    if a["role"] == "make":
        import torch

        from mike_ray.data.tasks import TASK_CODES

        torch.set_num_threads(1)
        # the stored task only labels a teacher; the benchmark masks teacher i to task i
        make_teachers(Path(a["zoo"]), [(f"T{i:03d}", TASK_CODES[i % len(TASK_CODES)]) for i in range(a["n"])],
                      a["teacher"])
        return {}
    return _worker_time(a) if a["role"] == "time" else _worker_mem(a)


# --------------------------------------------------------------------------------------------------
# the driver: launches workers and prints


def _run(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_worker(__file__, spec, timeout, f"{spec['role']} {spec.get('n', spec.get('ns', ''))}")


def _table(ns: list[int], times: dict[str, float], ref: dict[int, float], mem: dict[int, dict[str, Any]]) -> None:
    """``÷ N=1``: ours at N over the N = 1 reference stepped in the same phase (``N=1 ms``)."""
    hdr = (f"{'N':>4} | {'ours ms':>8} | {'N=1 ms':>7} | {'÷ N=1':>6} | {'one-by-one ms':>13} | {'÷ ours':>6} | "
           f"{'full-batch ms':>13} | {'÷ ours':>6} | "
           f"{'peer ms':>8} | {'÷ ours':>6} | {'unmasked ms':>11} | {'student MB':>10} | {'shards MB':>13}")
    print(hdr)
    print("-" * len(hdr))
    for n in ns:
        o = times[f"ours/{n}"]
        fb, pr, um = times.get(f"full-batch/{n}"), times.get(f"peer/{n}"), times.get(f"unmasked/{n}")
        ob = times.get(f"one-by-one/{n}")
        m = mem[n]
        print(f"{n:>4} | {o:8.0f} | {ref[n]:7.0f} | {o / ref[n]:6.2f} | {_f(ob):>13} | {_f(ob and ob / o, '.2f'):>6} | "
              f"{_f(fb):>13} | {_f(fb and fb / o, '.2f'):>6} | "
              f"{_f(pr):>8} | {_f(pr and pr / o, '.2f'):>6} | {_f(um):>11} | {m['peak_mb']:10.0f} | "
              f"{' + '.join(f'{v:.0f}' for v in m['shard_peak_mb']):>13}")


def _f(x: float | None, spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N ∈ {1, 11, 100}, 3 rounds (< 5 min)")
    ap.add_argument("--paper", action="store_true", help="also paper-sized teachers for N ∈ {1, 3, 11}")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (default 6; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    ap.add_argument("--teachers", type=int, nargs="+", default=None,
                    help="teacher counts (default 1 3 11 33 100; --quick 1 11 100); must include 1 and 11")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per worker process")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        try:
            res = _worker(json.loads(args._worker))
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
        print(TAG + json.dumps(res), flush=True)
        return

    ns = args.teachers or ([1, 11, 100] if args.quick else [1, 3, 11, 33, 100])
    if ns[0] != 1 or 11 not in ns:
        raise SystemExit("--teachers: the list starts at 1 and holds 11 (the ratios are taken against them)")
    steps = args.steps or (3 if args.quick else 6)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    t_all = time.perf_counter()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    sizes = [("tiny", TINY_TEACHER, TINY_STUDENT, ns)] + (
        [("paper", PAPER_TEACHER, PAPER_STUDENT, [1, 3, 11])] if args.paper else [])
    results = {}
    with tempfile.TemporaryDirectory(prefix="mike-scaling-") as tmp:
        for size, teacher, student, sns in sizes:
            zoo = Path(tmp) / size
            _run({"role": "make", "zoo": str(zoo), "n": max(sns), "teacher": teacher}, args.timeout)
            base = {"zoo": str(zoo), "student": student, "device": args.device, "warmup": warmup}
            timed = _run({**base, "role": "time", "ns": sns, "steps": steps, "unmasked": [1, 11],
                          "full": [n for n in sns if n <= 11] if args.quick else sns,
                          "one_by_one": [n for n in sns if n > 1],
                          "peer": [n for n in sns if n <= 11]}, args.timeout)
            mem = {n: _run({**base, "role": "mem", "n": n}, args.timeout) for n in sns}
            results[size] = (sns, timed, mem)
    total_s = time.perf_counter() - t_all

    print(f"\nMIKE step, batch {BATCH} of 3×64×64 mixed evenly over the N teachers' tasks, masking on, "
          f"2 shards × 1 CPU × 1 thread (teachers_per_shard: auto), device {args.device}; medians of {steps} "
          f"round-robin rounds after {warmup} warm-up; {os.cpu_count()} CPU cores")
    for size, (sns, timed, mem) in results.items():
        print(f"\n{size} teachers (18 taps each):")
        _table(sns, timed["step_ms"], {int(k): v for k, v in timed["ref_ms"].items()}, mem)
    sns, timed, mem = results["tiny"]
    t = timed["step_ms"]
    step_ratio = t[f"ours/{sns[-1]}"] / timed["ref_ms"][str(sns[-1])]  # both from the N = 100 phase (JSON keys)
    mem_ratio = mem[sns[-1]]["peak_mb"] / mem[1]["peak_mb"]
    peer_ratio = t["peer/11"] / t["ours/11"]
    targets = [("step 100/1 ≤ 1.5", step_ratio <= 1.5), ("student mem 100/1 ≤ 1.05", mem_ratio <= 1.05),
               ("ours ≤ 0.3 × peer at 11", peer_ratio >= 1 / 0.3)]
    print("\ntargets: " + "; ".join(f"{k}: {'MET' if ok else 'MISSED'}" for k, ok in targets))
    print(f"whole benchmark {total_s:.0f}s; load average before {load_before}, after "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"scaling: step 100/1 = {step_ratio:.2f} | student mem 100/1 = {mem_ratio:.2f} | "
          f"peer/ours at 11 = {peer_ratio:.2f}")


if __name__ == "__main__":
    main()
