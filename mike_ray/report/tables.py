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


# --- MIKE sweeps: normalised downstream IoU per configuration, reported on the test split ---------
#: searched settings that change the autoencoder (config.SearchConfig.MODEL_DIMS): baselines and
#: controls are matched to MIKE configurations on these
MODEL_PARAMS = ("embed_channels",)


def config_label(rec: Mapping[str, Any]) -> str:
    """A trial's configuration without its seed (trials with equal labels are repeats)."""
    params = {k: v for k, v in rec.get("params", {}).items() if k not in ("teacher_subset", "method")}
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))
    return f"{rec['method']:7s} {rec['subset']:8s} {extra}".rstrip()


def _ms(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of the finite values."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group trials by configuration: n seeds, mean ± std of the val score (selection) and of the
    test score (reports), per-task test means, how many tasks the test mean averages. Best val first."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[config_label(r)].append(r)
    rows = []
    for label, recs in groups.items():
        mean, std, _ = _ms([r["score"] for r in recs])
        test_mean, test_std, _ = _ms([r.get("test_score", math.nan) for r in recs])
        tasks = sorted({t for r in recs for t in r["downstream"]})
        per_task = {t: _mean(r["downstream"][t].get("test_norm_iou", math.nan) for r in recs if t in r["downstream"])
                    for t in tasks}
        rows.append({"config": label, "method": recs[0]["method"], "subset": recs[0]["subset"], "n": len(recs),
                     "model": {k: v for k, v in recs[0].get("params", {}).items() if k in MODEL_PARAMS},
                     "mean": mean, "std": std, "test_mean": test_mean, "test_std": test_std,
                     "test_tasks": min((r.get("test_tasks", 0) for r in recs), default=0), "tasks": len(tasks),
                     "per_task": per_task, "seeds": sorted(r["seed"] for r in recs),
                     "trials": [r["trial_id"] for r in recs]})
    return sorted(rows, key=lambda r: (-r["mean"] if not math.isnan(r["mean"]) else math.inf))


def matched(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], method: str) -> Mapping[str, Any] | None:
    """The ``method`` row ("pixel": same subset and model; "control": same model) paired with ``row``."""
    for r in rows:
        if r["method"] == method and r["model"] == row["model"] and (method == "control" or r["subset"] == row["subset"]):
            return r
    return None


def _cell(v: float) -> str:
    return "    —" if v is None or math.isnan(v) else f"{v:5.2f}"


def _pm(mean: float, std: float) -> str:
    return "      —      " if math.isnan(mean) else f"{mean:5.3f} ± {std:5.3f}"


def trial_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The printed end-of-sweep table: one row per configuration, mean ± std over its seeds of the
    normalised IoU on the **test** split (the val mean beside it is what selected configurations),
    per-task test means ("—": no score), then the one-line verdict."""
    rows = summarize(records)
    if not rows:
        return "  (no finished trials)"
    tasks = sorted({t for r in rows for t in r["per_task"]})
    head = (f"  {'configuration':44s} {'n':>2s} {'val (select)':>13s} {'test (report)':>13s} {'tasks':>5s}  "
            + " ".join(f"{t:>5s}" for t in tasks))
    lines = ["  normalised downstream IoU (IoU ÷ teacher IoU), mean ± std over seeds; per-task columns: test",
             head]
    order = {"mike": 0, "pixel": 1, "control": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["method"], 3), r["subset"], -_nz(r["mean"]))):
        cells = " ".join(_cell(r["per_task"].get(t, math.nan)) for t in tasks)
        lines.append(f"  {r['config'][:44]:44s} {r['n']:2d} {_pm(r['mean'], r['std'])} {_pm(r['test_mean'], r['test_std'])} "
                     f"{r['test_tasks']:2d}/{r['tasks']:<2d}  {cells}")
    lines.append("  " + verdict(rows))
    return "\n".join(lines)


def _nz(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _beats(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """'beats' / 'is below' / 'ties with' on the test split, judged against the seed spread."""
    diff = a["test_mean"] - b["test_mean"]
    spread = a["test_std"] + b["test_std"]
    if diff > spread:
        return "beats"
    if -diff > spread:
        return "is below"
    return "is within the seed spread of"


def verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """One plain line: the MIKE configuration chosen on val, against its matched pixel baseline and
    the control, on the test split. "Beats" means the difference of the means exceeds the sum of the
    two seed standard deviations."""
    mike = [r for r in rows if r["method"] == "mike" and not math.isnan(r["mean"]) and not math.isnan(r["test_mean"])]
    if not mike:
        return "verdict: no finished MIKE configuration"
    best = max(mike, key=lambda r: r["mean"])  # selected on val, reported on test
    pixel, control = matched(best, rows, "pixel"), matched(best, rows, "control")
    seeds = f"{best['n']} seed{'s' if best['n'] != 1 else ''}"
    parts = [f"verdict (test split, {seeds}; chosen on val: {' '.join(best['config'].split())}):"]
    if best["n"] < 2:
        parts.append("one seed, so no spread was measured and nothing below is significant;")
    if pixel is not None:
        parts.append(f"MIKE {best['test_mean']:.3f} ± {best['test_std']:.3f} {_beats(best, pixel)} the pixel baseline "
                     f"{pixel['test_mean']:.3f} ± {pixel['test_std']:.3f};")
    else:
        parts.append("no matched pixel baseline;")
    if control is not None:
        parts.append(f"vs the untrained-encoder control {control['test_mean']:.3f} ± {control['test_std']:.3f}: "
                     f"MIKE {_beats(best, control)} it" + (f", pixel {_beats(pixel, control)} it" if pixel else "") + ".")
    else:
        parts.append("no control row.")
    return " ".join(parts)


def best_per_subset(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each teacher subset: the best MIKE configuration (on val) and its matched pixel baseline."""
    rows = summarize(records)
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for row in rows:  # sorted best val first
        if row["method"] == "mike" and "best" not in out[row["subset"]]:
            out[row["subset"]]["best"] = row
            base = matched(row, rows, "pixel")
            if base is not None:
                out[row["subset"]]["baseline"] = base
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
