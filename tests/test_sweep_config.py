"""Sweep files: every malformed one is a one-line ``error: ...`` and exit 2, every valid one loads.

The catalogue lives in ``tests/bad_inputs/sweeps/*.yaml``; each file's first line is
``# expect: <substring of the error>``. Config validation only: nothing here starts Ray.

Each bad file is checked in-process twice (``load_sweep`` raises :class:`ConfigError`;
``mike_ray.sweep.main`` exits 2 with one stderr line). A few representative ones also go through
``python -m mike_ray.sweep`` in a subprocess (~1–2 s each, for the imports).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mike_ray.config import SweepConfig, load_sweep
from mike_ray.errors import ConfigError
from mike_ray.sweep import main

REPO = Path(__file__).resolve().parents[1]
BAD_DIR = Path(__file__).parent / "bad_inputs" / "sweeps"
BAD = sorted(BAD_DIR.glob("*.yaml"))
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
# one per kind of failure: key typo (did-you-mean), YAML syntax, a validator's own message
SUBPROCESS_BAD = ["unknown_top_level_key.yaml", "invalid_yaml_syntax.yaml", "range_low_ge_high.yaml"]

MINIMAL = """\
name: minimal
teacher_subsets: {pair: [DCH, CTB]}
study: {trials: 3}
search:
  teacher_subset: [pair]
  lr: {low: 0.001, high: 0.01, log: true}
"""


def expected(path: Path) -> str:
    """The ``# expect: ...`` substring on the file's first line (read as bytes: one file is not UTF-8)."""
    first = path.read_bytes().split(b"\n", 1)[0].decode("utf-8")
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <substring>'"
    return first.removeprefix("# expect: ").strip()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "mike_ray.sweep", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def main_exit(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``mike_ray.sweep.main`` in-process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def base_sweep(tmp_path) -> Path:
    p = tmp_path / "base.yaml"
    p.write_text(MINIMAL)
    return p


def _needs_absent_files(path: Path) -> bool:
    """A shipped sweep on real COCO whose coco_root is not on this machine (its smoke profile still
    runs), or on the user's own checkpoints, absent here (tests/test_own_teachers.py dry-runs its
    smoke profile after writing random ones)."""
    raw = yaml.safe_load(path.read_text()) or {}
    data = raw.get("data") or {}
    if any(not (REPO / t.get("weights", "")).is_file() for t in (raw.get("teachers") or {}).values()):
        return True
    return data.get("source") == "coco" and not (Path(data.get("coco_root") or "/nonexistent") / "annotations").is_dir()


def valid_sweeps(tmp_path_factory) -> list[Path]:
    runnable = [p for p in SWEEPS if not _needs_absent_files(p)]
    if runnable:
        return runnable
    p = tmp_path_factory.mktemp("sweeps") / "minimal.yaml"
    p.write_text(MINIMAL)
    return [p]


# --- the catalogue itself ------------------------------------------------------------------------
def test_catalogue_is_complete():
    assert len(BAD) >= 14, [p.name for p in BAD]
    subs = [expected(p) for p in BAD]
    assert all(subs), "every file needs a non-empty '# expect:'"
    assert len(set(subs)) == len(subs), "two files expect the same error: one of them tests nothing new"
    for name in SUBPROCESS_BAD:
        assert (BAD_DIR / name).is_file(), name


# --- (a) every malformed file: ConfigError in-process, exit 2 + one line from main ------------------
@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_load_sweep_rejects(path: Path):
    with pytest.raises(ConfigError) as exc:
        load_sweep(path)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert expected(path) in msg, f"{path.name}: {expected(path)!r} not in {msg!r}"
    assert path.name in msg, msg  # names the file (field errors name the field path too: see '# expect')


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_main_exits_2_with_one_line(path: Path, capsys):
    code, out, err = main_exit(capsys, str(path), "--dry-run")
    assert code == 2
    assert out == ""
    assert_one_error_line(err, path.name, expected(path))


@pytest.mark.parametrize("name", SUBPROCESS_BAD)
def test_cli_subprocess_rejects(name: str):
    path = BAD_DIR / name
    proc = run_cli(str(path), "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, path.name, expected(path))


def test_missing_sweep_file(tmp_path, capsys):
    code, _, err = main_exit(capsys, str(tmp_path / "nope.yaml"), "--dry-run")
    assert code == 2
    assert_one_error_line(err, "nope.yaml: file not found")


# --- (b) valid files load, and --dry-run prints the plan -------------------------------------------
def test_valid_sweeps_load(tmp_path_factory):
    for path in valid_sweeps(tmp_path_factory) + [p for p in SWEEPS if _needs_absent_files(p)]:
        if _needs_absent_files(path) and "teachers" in (yaml.safe_load(path.read_text()) or {}):
            assert isinstance(load_sweep(path), SweepConfig)  # weights are checked by --dry-run and the run
        elif _needs_absent_files(path):
            with pytest.raises(ConfigError, match="data.coco_root: .* not found"):
                load_sweep(path)  # real COCO is not here: a clear one-line error naming the field
        else:
            assert isinstance(load_sweep(path), SweepConfig)
        raw = yaml.safe_load(path.read_text()) or {}
        for profile in raw.get("profiles") or {}:  # every named profile of a shipped sweep must load too
            assert isinstance(load_sweep(path, profile=profile), SweepConfig), f"{path.name} --profile {profile}"


def test_valid_sweeps_dry_run_in_process(tmp_path_factory, capsys):
    for path in valid_sweeps(tmp_path_factory):
        assert main([str(path), "--dry-run"]) == 0
        out, err = capsys.readouterr()
        assert "plan: " in out and ("Optuna trial(s)" in out or "plan: grid of" in out), out
        assert "Traceback" not in err


def test_valid_sweep_dry_run_subprocess(tmp_path_factory):
    path = valid_sweeps(tmp_path_factory)[0]
    proc = run_cli(str(path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cfg = load_sweep(path)
    head = (f"plan: {cfg.study.trials} Optuna trial(s)" if cfg.study.algorithm == "optuna" else
            f"plan: grid of {math.prod(len(v) for _, v in cfg.search if v is not None)} configuration(s)")
    assert head in proc.stdout, proc.stdout
    assert f'"name": "{cfg.name}"' in proc.stdout  # the resolved config is printed too


def test_minimal_sweep_resolves_defaults(base_sweep):
    cfg = load_sweep(base_sweep)
    assert cfg.study.trials == 3 and cfg.subset("pair") == ["DCH", "CTB"]
    assert cfg.search.lr.low == 0.001 and cfg.search.lr.log
    assert cfg.transfer.schedule.name == "uniform"  # untouched sections take their defaults


# --- (c) --set overrides --------------------------------------------------------------------------
def test_set_overrides(base_sweep):
    cfg = load_sweep(base_sweep, ["study.trials=7", "transfer.schedule.name=adaptive",
                                  "search.embed_channels=[2, 4]", "mlflow.experiment=x",
                                  "search.lr={low: 0.0001, high: 0.1}"])
    assert cfg.study.trials == 7
    assert cfg.transfer.schedule.name == "adaptive"
    assert cfg.search.embed_channels == [2, 4]
    assert cfg.mlflow.experiment == "x"
    assert cfg.search.lr.low == 0.0001 and not cfg.search.lr.log  # a mapping value replaces, not merges
    assert cfg.name == "minimal"  # everything else as in the file


def test_set_later_wins_and_shows_in_plan(base_sweep, capsys):
    assert main([str(base_sweep), "--dry-run", "--set", "study.trials=2", "--set", "study.trials=5"]) == 0
    out, _ = capsys.readouterr()
    assert "plan: 5 Optuna trial(s)" in out


BAD_SETS = [
    ("study.trials", "--set 'study.trials': expected KEY=VALUE"),
    ("study.trials=many", "base.yaml: study.trials: Input should be a valid integer"),
    ("study.trails=2", "base.yaml: study.trails: unknown key (did you mean 'trials'?)"),
    ("study.trials.x=1", "--set study.trials.x: 'trials' is not a mapping"),
    ("study.trials=[1", "--set study.trials: invalid YAML value '[1'"),
    ("=3", "--set '=3': empty key"),
    ("study..trials=3", "--set 'study..trials=3': empty key"),
    ("search.lr={low: 1, high: 0.1}", "base.yaml: search.lr: low (1.0) must be < high (0.1)"),
    ("search.teacher_subset=[pair, trio]", "search.teacher_subset: 'trio' is not a key of teacher_subsets"),
    ("name=" + "[" * 200 + "]" * 200, "--set name: nested more than 64 levels deep"),
    ("study=&a [*a]", "--set study: nested more than 64 levels deep"),  # a list that contains itself
]


@pytest.mark.parametrize("profiles", ["3", "[smoke]", "smoke"])
def test_profiles_that_are_not_a_mapping_are_one_line(tmp_path, capsys, profiles):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nprofiles: {profiles}\n")
    code, out, err = main_exit(capsys, str(path), "--dry-run", "--profile", "smoke")
    assert code == 2 and out == ""
    assert_one_error_line(err, "p.yaml: profiles: must be a mapping of profile name → settings (got ")


@pytest.mark.parametrize("item,needle", BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_bad_set_is_one_line(base_sweep, capsys, item, needle):
    with pytest.raises(ConfigError) as exc:
        load_sweep(base_sweep, [item])
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    code, out, err = main_exit(capsys, str(base_sweep), "--dry-run", "--set", item)
    assert code == 2 and out == ""
    assert_one_error_line(err, needle)


def test_bad_set_subprocess(base_sweep):
    proc = run_cli(str(base_sweep), "--dry-run", "--set", "study.trials=-1")
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "base.yaml: study.trials: Input should be greater than or equal to 1")


# --- (d) did-you-mean -----------------------------------------------------------------------------
DID_YOU_MEAN = [
    ("studdy: {trials: 2}", "studdy", "study"),
    ("teacher_subset: {a: [DCH]}", "teacher_subset", "teacher_subsets"),
    ("transfer: {epoch: 2}", "transfer.epoch", "epochs"),
    ("transfer: {schedule: {pretrain_frac: 0.1}}", "transfer.schedule.pretrain_frac", "pretrain_fraction"),
    ("resources: {workers: {num_worker: 2}}", "resources.workers.num_worker", "num_workers"),
    ("data: {prepare: {image_sise: 32}}", "data.prepare.image_sise", "image_size"),
    ("zoo: {tsks: [DCH]}", "zoo.tsks", "tasks"),
    ("search: {embed_channels: {low: 1, high: 4, int: true, stp: 1}}", "search.embed_channels.stp", "step"),
]


@pytest.mark.parametrize("text,path,suggestion", DID_YOU_MEAN, ids=[p for _, p, _ in DID_YOU_MEAN])
def test_did_you_mean(tmp_path, text, path, suggestion):
    f = tmp_path / "typo.yaml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_sweep(f)
    assert str(exc.value) == f"{f}: {path}: unknown key (did you mean '{suggestion}'?)"


def test_unknown_key_without_a_close_match_lists_allowed(tmp_path):
    f = tmp_path / "far.yaml"
    f.write_text("study: {zzzzzz: 1}\n")
    with pytest.raises(ConfigError, match=r"study\.zzzzzz: unknown key \(allowed: objective, direction, trials"):
        load_sweep(f)


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_output_that_cannot_hold_results_fails_before_ray_starts(base_sweep, tmp_path, dry_run) -> None:
    """A file where the output folder should be, or a folder under a file: one line, exit 2 — and
    (without --dry-run) before Ray starts (its banner would be on stderr)."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for output, needle in ((blocker, "is a file, not a folder"), (blocker / "sub", "not writable")):
        if dry_run and output != blocker:
            continue  # --dry-run creates nothing, so it cannot tell a folder under a file
        args = [str(base_sweep), "--set", f"output={output}"] + (["--dry-run"] if dry_run else [])
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, f"output: {output}", needle)
    assert blocker.read_text() == "not a folder"
