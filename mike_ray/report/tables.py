"""Sweep summaries: a table of trials and mean ± std over seeds per configuration."""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any, Mapping, Sequence


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def config_label(rec: Mapping[str, Any]) -> str:
    """A trial's configuration without its seed (trials with equal labels are repeats)."""
    params = {k: v for k, v in rec.get("params", {}).items() if k not in ("teacher_subset", "method")}
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    return f"{rec['method']:5s} {rec['subset']:10s} {extra}".rstrip()


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group trials by configuration: n, mean ± std of the objective, per-task means."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[config_label(r)].append(r)
    rows = []
    for label, recs in groups.items():
        scores = [r["score"] for r in recs if r["score"] is not None and not math.isnan(r["score"])]
        tasks = sorted({t for r in recs for t in r["downstream"]})
        per_task = {t: _mean(r["downstream"][t]["norm_iou"] for r in recs if t in r["downstream"]) for t in tasks}
        rows.append({"config": label, "method": recs[0]["method"], "subset": recs[0]["subset"], "n": len(recs),
                     "mean": _mean(scores),
                     "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "per_task": per_task,
                     "trials": [r["trial_id"] for r in recs]})
    return sorted(rows, key=lambda r: (-r["mean"] if not math.isnan(r["mean"]) else math.inf))


def trial_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The printed end-of-sweep table: one row per configuration, mean ± std over its seeds."""
    rows = summarize(records)
    if not rows:
        return "  (no finished trials)"
    tasks = sorted({t for r in rows for t in r["per_task"]})
    head = f"  {'configuration':48s} {'n':>2s} {'mean norm IoU':>15s}  " + " ".join(f"{t:>5s}" for t in tasks)
    lines = ["  trials (normalised downstream IoU = IoU ÷ teacher IoU):", head]
    for r in rows:
        cells = " ".join(f"{r['per_task'].get(t, math.nan):5.2f}" for t in tasks)
        lines.append(f"  {r['config'][:48]:48s} {r['n']:2d} {r['mean']:7.3f} ± {r['std']:5.3f}  {cells}")
    return "\n".join(lines)


def best_per_subset(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each teacher subset: the best MIKE configuration and the pixel baseline (summary rows)."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for row in summarize(records):
        key = "baseline" if row["method"] == "pixel" else "best"
        if key not in out[row["subset"]]:
            out[row["subset"]][key] = row  # rows are sorted best first
    return dict(out)


def to_json(records: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"summary": summarize(records), "trials": list(records)}, indent=2, default=str)


# --- MHGD sweeps: accuracy per method (paper tables 1 and 4) ---------------------------------------
def accuracy_label(rec: Mapping[str, Any]) -> str:
    """An MHGD trial's configuration without its seed: method + searched values (+ subset)."""
    params = {k: v for k, v in rec.get("params", {}).items() if k not in ("method", "teacher_subset")}
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    subset = f" [{rec['subset']}]" if rec.get("subset", "-") != "-" else ""
    return f"{rec['method']}{subset} {extra}".rstrip()


def accuracy_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group finished MHGD trials by configuration: n seeds, mean ± std of best and last val accuracy."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("status", "finished") == "finished":
            groups[accuracy_label(r)].append(r)

    def ms(vals: list[float]) -> tuple[float, float]:
        return _mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    rows = []
    for label, recs in groups.items():
        best_m, best_s = ms([100 * r["best_acc"] for r in recs])
        last_m, last_s = ms([100 * r["last_acc"] for r in recs])
        rows.append({"config": label, "method": recs[0]["method"], "n": len(recs), "best_mean": best_m,
                     "best_std": best_s, "last_mean": last_m, "last_std": last_s,
                     "seeds": sorted(r["seed"] for r in recs), "trials": [r["trial_id"] for r in recs]})
    return sorted(rows, key=lambda r: -r["best_mean"])


def accuracy_table(records: Sequence[Mapping[str, Any]], teachers: Mapping[str, float] | None = None,
                   failed: Sequence[Mapping[str, Any]] = ()) -> str:
    """A Markdown table: per configuration, best and last val accuracy (%) as mean ± std over seeds."""
    lines = ["| configuration | seeds | best acc (%) | last acc (%) |", "|---|---:|---:|---:|"]
    for name, acc in (teachers or {}).items():
        lines.append(f"| teacher {name} | 1 | {100 * acc:.2f} | |")
    for r in accuracy_rows(records):
        lines.append(f"| {r['config']} | {r['n']} | {r['best_mean']:.2f} ± {r['best_std']:.2f} "
                     f"| {r['last_mean']:.2f} ± {r['last_std']:.2f} |")
    for f in failed:
        lines.append(f"| {accuracy_label(f)} (seed {f['seed']}) | failed | {f.get('reason', '')[:80]} | |")
    return "\n".join(lines)
