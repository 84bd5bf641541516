"""What teacher sharding costs and saves on this machine, measured in one run.

    python benchmarks/sharding.py [--teachers 3 11] [--mem-teachers 1 11] [--steps 8] [--steps1 3]
                                  [--mem-steps 2] [--warmup 2] [--batch 32] [--paper]

A step is one MIKE training step: autoencoder forward → ``MikeShardPool.step(x, x̄, task_ids, uniform
weights)`` → ``x̄.backward(Σ grads)`` → Adam step, on a batch of random 3×64×64 images whose task ids are
spread over the teachers. The teachers are untrained segmenters written in the zoo's stored format
(``weights.pt`` + ``teacher.json``) to a temporary directory, so the shards load them with
``load_teacher`` like real ones; compute and memory do not depend on the weights' values.

Prints:

(a) step time (median over ``--steps`` rounds after warm-up): teachers on 2 Ray actor shards (1 CPU,
    1 thread each; ``teachers_per_shard = ceil(n/2)``) ÷ the same step in one process with the same
    total threads (placement ``local``, torch 2 threads). The two variants run in the same process,
    alternating step by step, so background load on the machine hits both alike. Also 1 shard
    (1 CPU, 1 thread) ÷ one process with 1 thread: the bare cost of going through Ray.
(b) peak resident memory (VmHWM) for 1 and 11 teachers, each in a fresh process: the student
    process with sharded teachers, each shard actor (``MikeShard.peak_rss_mb``), the same step
    in one process with the teachers run one after another (``local``, each teacher's graph freed
    before the next), and a naive single process that keeps every teacher's graph alive (sum of
    all teachers' losses, one backward).

Every configuration runs in its own subprocess (own ``ray.init``), so each peak is its own.
"""
from __future__ import annotations

import argparse
import json
import math
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



# --------------------------------------------------------------------------------------------------
# helpers used inside the worker processes


class _Bench:
    """Student, batch, teachers and weights of one configuration (inside a worker process)."""

    def __init__(self, a: dict[str, Any]):
        import torch

        from mike_ray.data.tasks import TASK_CODES
        from mike_ray.models import build_model
        from mike_ray.mike.shard import TeacherRef
        from mike_ray.mike.zoo import read_teacher

        n, batch = a["n"], a["batch"]
        gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 3, 64, 64, generator=gen)
        self.task_ids = torch.arange(batch) % n  # teacher i serves task i: samples spread over all
        self.refs = [TeacherRef(name=TASK_CODES[i], path=str(Path(a["zoo"]) / TASK_CODES[i]), task_id=i)
                     for i in range(n)]
        taps = {r.name: read_teacher(Path(r.path)).taps for r in self.refs}
        n_terms = sum(len(t) for t in taps.values())
        self.weights = {name: {tap: 1.0 / n_terms for tap in t} for name, t in taps.items()}  # uniform, Σ = 1
        self.ae = build_model({**a["student"], "seed": 0})
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=1e-3)

    def step(self, group) -> tuple[float, float]:
        """One training step through ``group``; returns (seconds, slowest shard's own seconds)."""
        t0 = time.perf_counter()
        xbar = self.ae(self.x)
        res = group.step(self.x, xbar.detach(), self.task_ids, self.weights)
        self.opt.zero_grad(set_to_none=True)
        xbar.backward(res.grad)
        self.opt.step()
        return time.perf_counter() - t0, max(res.shard_seconds)

    def naive_step(self, tapped: list) -> float:
        """All teachers in this process, every teacher's graph alive until one backward."""
        import torch

        from mike_ray.mike.loss import task_mask, teacher_loss

        t0 = time.perf_counter()
        xbar = self.ae(self.x)
        total = None
        for ref, t in zip(self.refs, tapped):
            with torch.no_grad():
                fx = t(self.x)
            loss, _ = teacher_loss(fx, t(xbar), self.weights[ref.name], task_mask(self.task_ids, ref.task_id))
            total = loss if total is None else total + loss
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        return time.perf_counter() - t0


def _alternate(bench: _Bench, a_fn, b_fn, rounds: int) -> tuple[list, list]:
    """Run ``a_fn``/``b_fn`` alternately (order flipped every round); return both lists of results."""
    ra, rb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ra.append(a_fn())
            rb.append(b_fn())
        else:
            rb.append(b_fn())
            ra.append(a_fn())
    return ra, rb


def _med(xs: list[float]) -> float:
    return statistics.median(xs) * 1000  # ms


def _worker(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    if a["role"] == "make":
        torch.set_num_threads(1)
        from mike_ray.data.tasks import TASK_CODES

        if a["n"] > len(TASK_CODES):
            raise SystemExit(f"--teachers: at most {len(TASK_CODES)} (one per task), got {a['n']}")
        make_teachers(Path(a["zoo"]), [(t, t) for t in TASK_CODES[:a["n"]]], a["teacher"])
        return {}

    from mike_ray.resources import PlacementConfig
    from mike_ray.mike.shard import MikeShardPool

    torch.set_num_threads(2)  # the student process has the machine's 2 cores
    bench = _Bench(a)
    out: dict[str, Any] = {"n": a["n"]}
    warm, steps = a["warmup"], a["steps"]

    if a["role"] in ("local", "naive"):  # memory of one process doing everything, no Ray
        out["base_mb"] = status_mb("VmRSS")
        if a["role"] == "local":
            group = MikeShardPool(bench.refs, PlacementConfig(mode="local", teachers_per_shard="all", threads=2,
                                                           device="cpu"))
            fn = lambda: bench.step(group)[0]  # noqa: E731
        else:
            from mike_ray.models import TappedModel
            from mike_ray.mike.zoo import load_teacher

            tapped = []
            for r in bench.refs:
                model, rec = load_teacher(Path(r.path), "cpu")
                tapped.append(TappedModel(model, rec.taps).eval().requires_grad_(False))
            fn = lambda: bench.naive_step(tapped)  # noqa: E731
        out["loaded_mb"] = status_mb("VmRSS")
        times = [fn() for _ in range(warm + a["mem_steps"])][warm:]
        out["peak_mb"] = status_mb("VmHWM")
        out["step_ms"] = _med(times)
        return out

    # role "sharded": Ray actors; the student process measured first, then timing against local
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 ** 2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        out["base_mb"] = status_mb("VmRSS")
        n = a["n"]
        two = PlacementConfig(mode="ray", teachers_per_shard=math.ceil(n / 2), cpus_per_shard=1.0, threads=1,
                              device="cpu")
        sharded = MikeShardPool(bench.refs, two)
        out["shards"] = [len(g) for g in sharded.groups]
        res = [bench.step(sharded) for _ in range(warm + a["mem_steps"])][warm:]
        out["peak_mb"] = status_mb("VmHWM")  # before anything else runs in this process
        out["shard_peak_mb"] = ray.get([s.peak_rss_mb.remote() for s in sharded.shards])
        out["alone_ms"] = _med([t for t, _ in res])
        if not a["time"]:
            return out

        # (a) 2 shards × 1 thread vs one process with 2 threads, alternating step by step
        local = MikeShardPool(bench.refs, PlacementConfig(mode="local", teachers_per_shard="all", threads=2,
                                                       device="cpu"))
        torch.set_num_threads(2)
        for _ in range(warm):  # the sharded group is warm already
            bench.step(local)
        rs, rl = _alternate(bench, lambda: bench.step(sharded), lambda: bench.step(local), steps)
        out["sharded_ms"], out["sharded_shard_ms"] = _med([t for t, _ in rs]), _med([s for _, s in rs])
        out["local_ms"], out["local_shard_ms"] = _med([t for t, _ in rl]), _med([s for _, s in rl])
        out["sharded_min_ms"], out["local_min_ms"] = min(t for t, _ in rs) * 1000, min(t for t, _ in rl) * 1000

        # 1 shard × 1 thread vs one process with 1 thread: the bare cost of the Ray round trip
        rounds1 = a["steps1"]
        if rounds1:
            sharded.shutdown()
            one = MikeShardPool(bench.refs, PlacementConfig(mode="ray", teachers_per_shard="all", cpus_per_shard=1.0,
                                                         threads=1, device="cpu"))
            torch.set_num_threads(1)
            bench.step(one)
            bench.step(local)
            rs, rl = _alternate(bench, lambda: bench.step(one), lambda: bench.step(local), rounds1)
            out["one_ms"], out["one_shard_ms"] = _med([t for t, _ in rs]), _med([s for _, s in rs])
            out["local1_ms"], out["local1_shard_ms"] = _med([t for t, _ in rl]), _med([s for _, s in rl])
            one.shutdown()
        return out
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# the driver: no torch here, it only launches workers and prints


def _run(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_worker(__file__, spec, timeout, f"{spec['role']} n={spec['n']}")


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", type=int, nargs="+", default=[3, 11], help="teacher counts for step time (a)")
    ap.add_argument("--mem-teachers", type=int, nargs=2, default=[1, 11], metavar=("FEW", "MANY"),
                    help="the two teacher counts compared for peak memory (b)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (rounds) per configuration")
    ap.add_argument("--steps1", type=int, default=3,
                    help="rounds of the 1-shard vs 1-thread comparison (0 skips it)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=2,
                    help="steps after warm-up before peak memory is read (every memory configuration alike)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--paper", action="store_true",
                    help="paper-sized teacher (width 16, 64→8→64, expand 6) and student; much slower, and "
                         "the naive process is only run for up to --naive-max teachers")
    ap.add_argument("--naive-max", type=int, default=None,
                    help="largest teacher count for the naive all-graphs-alive process "
                         "(default 11; 1 with --paper: DESIGN.md measured 10.1 GB at 3 paper teachers)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds allowed per worker process")
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

    few, many = args.mem_teachers
    naive_max = args.naive_max if args.naive_max is not None else (1 if args.paper else 11)
    teacher, student = (PAPER_TEACHER, PAPER_STUDENT) if args.paper else (TINY_TEACHER, TINY_STUDENT)
    t_all = time.perf_counter()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="mike-shard-bench-") as zoo:
        base = {"zoo": zoo, "batch": args.batch, "steps": args.steps, "steps1": args.steps1,
                "mem_steps": args.mem_steps,
                "warmup": args.warmup, "teacher": teacher, "student": student}
        n_max = max([*args.teachers, few, many])
        _run({**base, "role": "make", "n": n_max}, args.timeout)
        sh = {n: _run({**base, "role": "sharded", "n": n, "time": n in args.teachers}, args.timeout)
              for n in sorted({*args.teachers, few, many})}
        local = {n: _run({**base, "role": "local", "n": n}, args.timeout) for n in (few, many)}
        naive = {n: _run({**base, "role": "naive", "n": n}, args.timeout) for n in (few, many) if n <= naive_max}
    total_s = time.perf_counter() - t_all

    size = "paper-sized (width 16)" if args.paper else "tiny (width 8, stem stride 2)"
    print(f"\nMIKE step, batch {args.batch} of 3×64×64, {size} segmenter teachers, 18 taps each, uniform "
          f"weights; {os.cpu_count()} CPU cores; medians of {args.steps} alternating steps after "
          f"{args.warmup} warm-up")
    print("\n(a) step time, ms   [in brackets: the slowest shard's own compute]")
    hdr = (f"{'teachers':>8} | {'shards':>6} | {'2 shards×1 thr':>18} | {'1 process 2 thr':>18} | {'ratio':>5} || "
           f"{'1 shard×1 thr':>18} | {'1 process 1 thr':>18} | {'ratio':>5}")
    print(hdr)
    print("-" * len(hdr))
    for n in args.teachers:
        r = sh[n]
        ratio = r["sharded_ms"] / r["local_ms"]
        one = (f"{r['one_ms']:7.0f} [{r['one_shard_ms']:6.0f}] | {r['local1_ms']:7.0f} [{r['local1_shard_ms']:6.0f}] "
               f"| {r['one_ms'] / r['local1_ms']:5.2f}") if "one_ms" in r else f"{'—':>18} | {'—':>18} | {'—':>5}"
        print(f"{n:>8} | {'+'.join(map(str, r['shards'])):>6} | {r['sharded_ms']:7.0f} [{r['sharded_shard_ms']:6.0f}] | "
              f"{r['local_ms']:7.0f} [{r['local_shard_ms']:6.0f}] | {ratio:5.2f} || {one}")
    big = max(args.teachers)
    ratio_a = sh[big]["sharded_ms"] / sh[big]["local_ms"]
    print(f"target: 2 shards ÷ 1 process at {big} teachers ≤ 1.10 → {ratio_a:.2f}: "
          f"{'MET' if ratio_a <= 1.10 else 'MISSED'}   (fastest step ÷ fastest step: "
          + ", ".join(f"{n} teachers {sh[n]['sharded_min_ms'] / sh[n]['local_min_ms']:.2f}" for n in args.teachers)
          + ")")

    print("\n(b) peak resident memory (VmHWM), MB   [in brackets: resident after start-up, before any step]")
    hdr = (f"{'teachers':>8} | {'sharded: student':>18} | {'each shard':>15} | {'1 process, sequential':>22} | "
           f"{'naive 1 process, all graphs':>28}")
    print(hdr)
    print("-" * len(hdr))
    for n in (few, many):
        s, lo, nv = sh[n], local[n], naive.get(n)
        shards = " + ".join(f"{v:.0f}" for v in s["shard_peak_mb"])
        nv_txt = f"{nv['peak_mb']:8.0f} [{nv['base_mb']:6.0f}]" if nv else "skipped"
        print(f"{n:>8} | {s['peak_mb']:9.0f} [{s['base_mb']:6.0f}] | {shards:>15} | "
              f"{lo['peak_mb']:13.0f} [{lo['base_mb']:6.0f}] | {nv_txt:>28}")
    ratio_b = sh[many]["peak_mb"] / sh[few]["peak_mb"]
    print(f"sharded student {many}/{few} teachers = {ratio_b:.2f}  (target ≤ 1.10 → "
          f"{'MET' if ratio_b <= 1.10 else 'MISSED'})")
    print(f"1 process sequential {many}/{few} = {local[many]['peak_mb'] / local[few]['peak_mb']:.2f}")
    if few in naive and many in naive:
        print(f"naive 1 process {many}/{few} = {naive[many]['peak_mb'] / naive[few]['peak_mb']:.2f}  "
              f"(naive step {naive[few]['step_ms']:.0f} ms at {few}, {naive[many]['step_ms']:.0f} ms at {many}, 2 thr)")
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nwhole benchmark: {total_s:.0f}s; load average (1/5/15 min) before {' '.join(load_before)}, "
          f"after {' '.join(load_after)} — other users' work on the 2 cores slows the 2-thread process most")


if __name__ == "__main__":
    main()
