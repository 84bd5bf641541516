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
