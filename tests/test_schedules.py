"""Golden-value tests for the layer-weight schedules. Expected numbers are worked out by hand."""
from __future__ import annotations

import json
import math

import pytest

from mike_ray.config_base import validate
from mike_ray.errors import ConfigError, ModelError
from mike_ray.mike.schedules import ScheduleConfig, Weights, make_schedule, progress_at

TAPS = {"A": ["a0", "a1", "a2", "a3"], "B": ["b0", "b1"]}
APPROX = dict(rel=1e-12, abs=1e-15)


def sched(taps=TAPS, **cfg):
    return make_schedule(ScheduleConfig(**cfg), taps)


def one_hot(teacher_taps: dict[str, list[str]], on: dict[str, str], share: dict[str, float]) -> dict:
    """Expected weights: teacher t has weight share[t] on tap on[t], 0 elsewhere."""
    return {t: {tap: (share[t] if tap == on[t] else 0.0) for tap in names} for t, names in teacher_taps.items()}


def assert_weights(w: Weights, expected: dict) -> None:
    assert list(w.teachers) == list(expected)
    for t, taps in expected.items():
        assert list(w.teachers[t]) == list(taps)  # every tap present, in order
        for tap, v in taps.items():
            assert w.teachers[t][tap] == pytest.approx(v, **APPROX), (t, tap)


# ---------- uniform / last_layer ----------

def test_uniform_every_tap_equal():
    w = sched(name="uniform").weights(0.3)
    assert_weights(w, {"A": {t: 1 / 6 for t in TAPS["A"]}, "B": {t: 1 / 6 for t in TAPS["B"]}})
    assert w.pixel == 0.0 and not w.pretraining
    assert w.teacher_sum() == pytest.approx(1.0, **APPROX)


def test_uniform_with_teacher_weights():
    # raw: A taps 1·1 (4 of them), B taps 1·2 (2 of them) → sum 8 → A 1/8 each, B 2/8 each
    w = sched(name="uniform", teacher_weights={"B": 2.0}).weights(0.0)
    assert_weights(w, {"A": {t: 0.125 for t in TAPS["A"]}, "B": {t: 0.25 for t in TAPS["B"]}})


def test_last_layer():
    s = sched(name="last_layer")
    for p in (0.0, 0.5, 1.0):
        assert_weights(s.weights(p), one_hot(TAPS, {"A": "a3", "B": "b1"}, {"A": 0.5, "B": 0.5}))
    w = sched(name="last_layer", teacher_weights={"A": 3.0, "B": 1.0}).weights(0.5)
    assert_weights(w, one_hot(TAPS, {"A": "a3", "B": "b1"}, {"A": 0.75, "B": 0.25}))


def test_teacher_weight_zero_drops_a_teacher():
    w = sched(name="last_layer", teacher_weights={"B": 0.0}).weights(0.5)
    assert_weights(w, one_hot(TAPS, {"A": "a3", "B": "b1"}, {"A": 1.0, "B": 0.0}))
    assert w.active("B") == {} and w.active("A") == {"a3": pytest.approx(1.0)}


# ---------- layerwise_progressive ----------

@pytest.mark.parametrize(
    "progress, a_tap, b_tap",
    [
        # A (4 taps) switches at 1/4, 1/2, 3/4; B (2 taps) at 1/2 — each walks its own depth.
        (0.0, "a0", "b0"),
        (0.2499, "a0", "b0"),
        (0.25, "a1", "b0"),
        (0.4999, "a1", "b0"),
        (0.5, "a2", "b1"),
        (0.7499, "a2", "b1"),
        (0.75, "a3", "b1"),
        (1.0, "a3", "b1"),
    ],
)
def test_progressive_own_depth(progress, a_tap, b_tap):
    w = sched(name="layerwise_progressive").weights(progress)
    assert_weights(w, one_hot(TAPS, {"A": a_tap, "B": b_tap}, {"A": 0.5, "B": 0.5}))


@pytest.mark.parametrize(
    "progress, a_tap, b_tap",
    [
        # P = 3: phases switch at 1/3, 2/3; phase k → tap round_half_up(k·(L−1)/2):
        #   A (L=4): k=0 → 0, k=1 → 1.5 → 2, k=2 → 3;  B (L=2): k=0 → 0, k=1 → 0.5 → 1, k=2 → 1
        (0.0, "a0", "b0"),
        (0.3333, "a0", "b0"),
        (progress_at(1, 3), "a2", "b1"),
        (0.6666, "a2", "b1"),
        (progress_at(2, 3), "a3", "b1"),
        (1.0, "a3", "b1"),
    ],
)
def test_progressive_num_phases(progress, a_tap, b_tap):
    w = sched(name="layerwise_progressive", num_phases=3).weights(progress)
    assert_weights(w, one_hot(TAPS, {"A": a_tap, "B": b_tap}, {"A": 0.5, "B": 0.5}))


def test_progressive_more_phases_than_taps():
    # P = 8, A (L=4): round(k·3/7) for k = 0..7 = 0, 0, 1, 1, 2, 2, 3, 3
    s = sched(name="layerwise_progressive", num_phases=8)
    got = [s.tap_index("A", (k + 0.5) / 8) for k in range(8)]
    assert got == [0, 0, 1, 1, 2, 2, 3, 3]


def test_progressive_one_phase_is_last_layer():
    s = sched(name="layerwise_progressive", num_phases=1)
    for p in (0.0, 0.7, 1.0):
        assert_weights(s.weights(p), one_hot(TAPS, {"A": "a3", "B": "b1"}, {"A": 0.5, "B": 0.5}))


def test_progressive_with_teacher_weights():
    w = sched(name="layerwise_progressive", teacher_weights={"A": 1.0, "B": 3.0}).weights(0.25)
    assert_weights(w, one_hot(TAPS, {"A": "a1", "B": "b0"}, {"A": 0.25, "B": 0.75}))


# ---------- pixel pretraining ----------

def test_pretraining_switch():
    s = sched(name="uniform", pretrain_fraction=0.2, pixel_weight=0.5)
    w = s.weights(0.1999)
    assert w.pretraining and w.pixel == 1.0
    assert_weights(w, {"A": {t: 0.0 for t in TAPS["A"]}, "B": {t: 0.0 for t in TAPS["B"]}})
    assert w.teacher_sum() == 0.0  # documented: teacher weights sum to 0 while pretraining
    w = s.weights(0.2)
    assert not w.pretraining and w.pixel == 0.5
    assert w.teacher_sum() == pytest.approx(1.0, **APPROX)
    assert w.teachers["A"]["a0"] == pytest.approx(1 / 6, **APPROX)
    # step/total just below the boundary by float rounding still counts as on it
    assert not s.weights(0.2 - 1e-12).pretraining


def test_progressive_after_pretraining_spans_the_rest():
    # p = 0.2: q = (progress − 0.2) / 0.8; A switches at q = 1/4, 1/2, 3/4 → progress 0.4, 0.6, 0.8
    s = sched(name="layerwise_progressive", pretrain_fraction=0.2)
    assert s.weights(0.0).pretraining
    assert_weights(s.weights(0.2), one_hot(TAPS, {"A": "a0", "B": "b0"}, {"A": 0.5, "B": 0.5}))
    assert_weights(s.weights(0.3999), one_hot(TAPS, {"A": "a0", "B": "b0"}, {"A": 0.5, "B": 0.5}))
    assert_weights(s.weights(0.4), one_hot(TAPS, {"A": "a1", "B": "b0"}, {"A": 0.5, "B": 0.5}))
    # step 6 of 10: q·2 evaluates to 0.9999999999999999 in floats; must still be phase 1 (b1, a2)
    assert ((progress_at(6, 10) - 0.2) / 0.8) * 2 < 1.0
    assert_weights(s.weights(progress_at(6, 10)), one_hot(TAPS, {"A": "a2", "B": "b1"}, {"A": 0.5, "B": 0.5}))
    assert_weights(s.weights(0.8), one_hot(TAPS, {"A": "a3", "B": "b1"}, {"A": 0.5, "B": 0.5}))


# ---------- every schedule: sum to 1 ----------

@pytest.mark.parametrize("name", ["uniform", "last_layer", "layerwise_progressive", "adaptive"])
def test_teacher_weights_sum_to_one(name):
    s = sched(name=name, pretrain_fraction=0.1, teacher_weights={"A": 0.3, "B": 2.0})
    for step in range(0, 101, 7):
        w = s.weights(progress_at(step, 100))
        assert w.teacher_sum() == pytest.approx(0.0 if w.pretraining else 1.0, **APPROX)
        assert all(v >= 0 for taps in w.teachers.values() for v in taps.values())


def test_progress_checks():
    s = sched(name="uniform")
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="progress"):
            s.weights(bad)
    assert progress_at(0, 4) == 0.0 and progress_at(3, 4) == 0.75 and progress_at(4, 4) == 1.0
    with pytest.raises(ValueError):
        progress_at(5, 4)
    with pytest.raises(ValueError):
        progress_at(0, 0)


def test_flat_for_logging():
    w = sched({"A": ["a0"], "B": ["b0"]}, name="uniform", pixel_weight=0.1).weights(0.0)
    assert w.flat() == {"w/A/a0": 0.5, "w/B/b0": 0.5, "w/pixel": 0.1}


# ---------- adaptive ----------

ADA_TAPS = {"A": ["a0", "a1"], "B": ["b0"]}


def ada(**cfg):
    base = dict(name="adaptive", ema_momentum=0.5, adaptive_eps=0.01)
    base.update(cfg)
    return make_schedule(ScheduleConfig(**base), ADA_TAPS)


def test_adaptive_uniform_before_first_update():
    assert_weights(ada().weights(0.5), {"A": {"a0": 1 / 3, "a1": 1 / 3}, "B": {"b0": 1 / 3}})


def test_adaptive_after_known_updates():
    s = ada()
    # update 1 sets EMA = terms: 0.99, 0.49, 0.19; scores 1/(EMA+0.01) = 1, 2, 5; sum 8
    s.update({"A": {"a0": 0.99, "a1": 0.49}, "B": {"b0": 0.19}})
    assert_weights(s.weights(0.5), {"A": {"a0": 1 / 8, "a1": 2 / 8}, "B": {"b0": 5 / 8}})
    # update 2 (B absent, keeps its EMA): a0 = 0.5·0.99 + 0.5·0.59 = 0.79, a1 = 0.5·0.49 + 0.5·0.49
    # scores 1/0.8 = 1.25, 2, 5; sum 8.25
    s.update({"A": {"a0": 0.59, "a1": 0.49}})
    expected = {"A": {"a0": 1.25 / 8.25, "a1": 2 / 8.25}, "B": {"b0": 5 / 8.25}}
    assert_weights(s.weights(0.5), expected)
    assert s.num_updates == 2
    assert s.ema["A"]["a0"] == pytest.approx(0.79, **APPROX)
    # teacher weight A = 2: scaled 2.5, 4, 5; sum 11.5
    s2 = ada(teacher_weights={"A": 2.0})
    s2.load_state_dict(s.state_dict())
    assert_weights(s2.weights(0.5), {"A": {"a0": 2.5 / 11.5, "a1": 4 / 11.5}, "B": {"b0": 5 / 11.5}})


def test_adaptive_unobserved_tap_gets_mean_score():
    s = ada()
    s.update({"A": {"a0": 0.99, "a1": 0.49}})  # scores 1, 2; b0 unobserved → mean 1.5; sum 4.5
    assert_weights(s.weights(0.5), {"A": {"a0": 1 / 4.5, "a1": 2 / 4.5}, "B": {"b0": 1.5 / 4.5}})


def test_adaptive_power():
    s = ada(adaptive_power=0.5)
    s.update({"A": {"a0": 0.99, "a1": 0.49}, "B": {"b0": 0.19}})
    r2, r5 = math.sqrt(2.0), math.sqrt(5.0)  # scores (EMA+eps)^−½ = 1, √2, √5
    tot = 1 + r2 + r5
    assert_weights(s.weights(0.5), {"A": {"a0": 1 / tot, "a1": r2 / tot}, "B": {"b0": r5 / tot}})
    s0 = ada(adaptive_power=0.0)
    s0.update({"A": {"a0": 0.99, "a1": 0.49}, "B": {"b0": 0.19}})
    assert_weights(s0.weights(0.5), {"A": {"a0": 1 / 3, "a1": 1 / 3}, "B": {"b0": 1 / 3}})


def test_adaptive_pretraining_and_eps_floor():
    s = ada(pretrain_fraction=0.5)
    s.update({"A": {"a0": 0.0, "a1": 0.0}, "B": {"b0": 0.0}})
    w = s.weights(0.25)
    assert w.pretraining and w.pixel == 1.0 and w.teacher_sum() == 0.0
    # all terms 0: scores 1/0.01 each → uniform, finite
    assert_weights(s.weights(0.75), {"A": {"a0": 1 / 3, "a1": 1 / 3}, "B": {"b0": 1 / 3}})


def test_adaptive_state_roundtrip_json():
    s = ada()
    s.update({"A": {"a0": 0.99, "a1": 0.49}, "B": {"b0": 0.19}})
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"ema": {"A": {"a0": 0.99, "a1": 0.49}, "B": {"b0": 0.19}}, "num_updates": 1}
    s2 = ada()
    s2.load_state_dict(state)
    assert s2.weights(0.5) == s.weights(0.5)
    assert s2.num_updates == 1


def test_adaptive_bad_update_and_state():
    s = ada()
    before = s.state_dict()
    with pytest.raises(ValueError, match="finite"):
        s.update({"A": {"a0": 0.5, "a1": float("nan")}})
    assert s.state_dict() == before  # nothing half-applied
    with pytest.raises(ValueError, match="unknown tap"):
        s.update({"A": {"zz": 0.5}})
    with pytest.raises(ValueError, match="unknown teacher"):
        s.update({"C": {"c0": 0.5}})
    with pytest.raises(ModelError, match="unknown teacher 'C'"):
        s.load_state_dict({"ema": {"C": {"c0": 1.0}}, "num_updates": 1})
    with pytest.raises(ModelError, match="unknown tap 'zz'"):
        s.load_state_dict({"ema": {"A": {"zz": 1.0}}, "num_updates": 1})
    with pytest.raises(ModelError, match="expected keys"):
        s.load_state_dict({})


def test_stateless_schedules_have_the_same_interface():
    s = sched(name="uniform")
    s.update({"A": {"a0": 1.0}})
    assert s.state_dict() == {}
    s.load_state_dict({})
    assert s.weights(0.0).teachers["A"]["a0"] == pytest.approx(1 / 6)


# ---------- config and factory ----------

def test_config_validation_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^sweep.yaml: num_phase: unknown key \(did you mean 'num_phases'\?\)"):
        validate(ScheduleConfig, {"name": "uniform", "num_phase": 3}, source="sweep.yaml")
    with pytest.raises(ConfigError, match="pretrain_fraction"):
        validate(ScheduleConfig, {"pretrain_fraction": 1.0})
    with pytest.raises(ConfigError, match="name"):
        validate(ScheduleConfig, {"name": "cosine"})
    with pytest.raises(ConfigError, match="teacher_weights.A"):
        validate(ScheduleConfig, {"teacher_weights": {"A": -1.0}})
    with pytest.raises(ConfigError, match="ema_momentum"):
        validate(ScheduleConfig, {"ema_momentum": 1.0})
    with pytest.raises(ConfigError, match="num_phases"):
        validate(ScheduleConfig, {"num_phases": 0})


def test_make_schedule_errors():
    with pytest.raises(ConfigError, match=r"^schedule.teacher_weights.C: unknown teacher"):
        make_schedule(ScheduleConfig(teacher_weights={"C": 1.0}), TAPS)
    with pytest.raises(ConfigError, match="all teachers have weight 0"):
        make_schedule(ScheduleConfig(teacher_weights={"A": 0.0, "B": 0.0}), TAPS)
    with pytest.raises(ConfigError, match="taps.B: teacher has no taps"):
        make_schedule(ScheduleConfig(), {"A": ["a0"], "B": []})
    with pytest.raises(ConfigError, match="duplicate"):
        make_schedule(ScheduleConfig(), {"A": ["a0", "a0"]})
    with pytest.raises(ConfigError, match="no teachers"):
        make_schedule(ScheduleConfig(), {})
