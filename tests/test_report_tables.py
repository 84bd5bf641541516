"""Sweep summary tables: grouping by configuration and mean ± std over seeds (hand-computed values)."""
from __future__ import annotations

import math

from mike_ray.report.tables import accuracy_rows, accuracy_table, summarize


def _mhgd(trial: str, method: str, seed: int, best: float, last: float, **params) -> dict:
    return {"trial_id": trial, "method": method, "seed": seed, "best_acc": best, "last_acc": last,
            "subset": "-" if method == "student" else "t", "params": {"method": method, **params},
            "status": "finished"}


def test_accuracy_rows_group_seeds_and_give_mean_and_sample_std() -> None:
    recs = [_mhgd("a", "mhgd", 0, 0.50, 0.40, num_heads=2), _mhgd("b", "mhgd", 1, 0.60, 0.50, num_heads=2),
            _mhgd("c", "mhgd", 0, 0.70, 0.70, num_heads=8), _mhgd("d", "student", 0, 0.55, 0.45),
            _mhgd("e", "student", 1, 0.45, 0.45)]
    rows = {r["config"]: r for r in accuracy_rows(recs)}
    assert set(rows) == {"mhgd [t] num_heads=2", "mhgd [t] num_heads=8", "student"}
    two = rows["mhgd [t] num_heads=2"]
    # mean of 50 and 60 is 55; sample std = sqrt(((−5)² + 5²) / 1) = 7.0711
    assert two["n"] == 2 and two["best_mean"] == 55.0 and math.isclose(two["best_std"], 50 ** 0.5)
    assert two["last_mean"] == 45.0 and two["seeds"] == [0, 1]
    assert rows["mhgd [t] num_heads=8"]["best_std"] == 0.0  # one seed: no spread
    assert [r["config"] for r in accuracy_rows(recs)][0] == "mhgd [t] num_heads=8"  # best first
    table = accuracy_table(recs, {"wrn": 0.8}, [{**_mhgd("f", "mhgd", 2, 0, 0, num_heads=2), "reason": "nan"}])
    lines = table.splitlines()
    assert lines[2] == "| teacher wrn | 1 | 80.00 | |"
    assert "| mhgd [t] num_heads=2 | 2 | 55.00 ± 7.07 | 45.00 ± 7.07 |" in lines
    assert lines[-1] == "| mhgd [t] num_heads=2 (seed 2) | failed | nan | |"


def test_mike_summary_groups_by_configuration_without_the_seed() -> None:
    def rec(trial, seed, score):
        return {"trial_id": trial, "method": "mike", "subset": "three", "seed": seed, "score": score,
                "params": {"schedule": "uniform"}, "downstream": {"DCH": {"norm_iou": score}}}

    rows = summarize([rec("a", 0, 0.4), rec("b", 1, 0.6), rec("c", 2, math.nan)])
    assert len(rows) == 1 and rows[0]["n"] == 3
    assert math.isclose(rows[0]["mean"], 0.5) and math.isclose(rows[0]["std"], 0.02 ** 0.5)  # NaN ignored


def _mike_rec(trial, method, seed, val, test, subset="three", embed=2, per_task=None):
    params = {"embed_channels": embed, **({"schedule": "uniform"} if method == "mike" else {})}
    down = {t: {"norm_iou": val, "test_norm_iou": v} for t, v in (per_task or {"DCH": test}).items()}
    return {"trial_id": trial, "method": method, "subset": subset if method != "control" else "-", "seed": seed,
            "score": val, "test_score": test, "test_tasks": sum(v == v for v in (per_task or {"DCH": test}).values()),
            "params": params, "downstream": down}


def test_the_table_reports_test_means_and_pairs_matched_baselines_and_the_control() -> None:
    from mike_ray.report.tables import best_per_subset, trial_table, verdict

    recs = [_mike_rec("m0", "mike", 0, 0.6, 0.50), _mike_rec("m1", "mike", 1, 0.7, 0.60),
            _mike_rec("p0", "pixel", 0, 0.5, 0.30), _mike_rec("p1", "pixel", 1, 0.5, 0.32),
            # a pixel baseline of another embedding size must not be paired with the 2-channel MIKE
            _mike_rec("q0", "pixel", 0, 0.9, 0.90, embed=4), _mike_rec("q1", "pixel", 1, 0.9, 0.90, embed=4),
            _mike_rec("c0", "control", 0, 0.1, 0.10), _mike_rec("c1", "control", 1, 0.1, 0.12)]
    rows = summarize(recs)
    mike = next(r for r in rows if r["method"] == "mike")
    assert math.isclose(mike["test_mean"], 0.55) and math.isclose(mike["test_std"], 0.005 ** 0.5)
    assert best_per_subset(recs)["three"]["baseline"]["model"] == {"embed_channels": 2}
    line = verdict(rows)
    # 0.55 − 0.31 = 0.24 > 0.0707 + 0.0141: beyond the spread; both far above the control
    assert "MIKE 0.550 ± 0.071 beats the pixel baseline 0.310 ± 0.014" in line
    assert "MIKE beats it, pixel beats it" in line and "2 seeds" in line
    table = trial_table(recs)
    assert table.splitlines()[-1].strip() == line and "control" in table


def test_the_verdict_says_within_the_spread_and_the_table_shows_missing_tasks() -> None:
    from mike_ray.report.tables import trial_table, verdict

    recs = [_mike_rec("m0", "mike", 0, 0.6, 0.40, per_task={"DCH": 0.4, "PHB": math.nan}),
            _mike_rec("m1", "mike", 1, 0.6, 0.60, per_task={"DCH": 0.6, "PHB": math.nan}),
            _mike_rec("p0", "pixel", 0, 0.5, 0.50), _mike_rec("p1", "pixel", 1, 0.5, 0.52)]
    line = verdict(summarize(recs))
    assert "is within the seed spread of the pixel baseline" in line and "no control row" in line
    table = trial_table(recs)
    mike_line = next(ln for ln in table.splitlines() if ln.strip().startswith("mike"))
    assert " 1/2 " in mike_line and "—" in mike_line  # PHB has no test score: shown, and counted
