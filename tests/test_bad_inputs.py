"""The bad-input catalogue (tests/bad_inputs/, issue 6 item 3): COCO files, images, shards, manifests, checkpoints.

For every entry of ``make_bad_inputs.CATALOGUE``:

(a) the library function that reads such a file raises the expected typed exception, with a
    one-line message that contains the path and names the field/problem;
(b) ``python -m mike_ray.check`` rejects it: exit 2, one ``error:`` line on stderr containing the
    path, no traceback (all entries in one ``--each`` process, a few more as single-path runs).

And the pipeline: ``python -m mike_ray.data prepare`` on a COCO root with a malformed annotation file,
a bad image or a missing one exits 2 with one line and leaves nothing under ``--out`` that a later
run could take for a finished dataset (no manifest, no temporary build directory); a later run on
the repaired input builds the dataset. Sweep files have their own catalogue (test_sweep_config.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mike_ray.check import check_path
from mike_ray.data.__main__ import main as data_main
from mike_ray.data.coco import PrepareConfig, check_coco_root, load_coco, read_image
from mike_ray.data.shards import MANIFEST, check_dataset, prepare_dataset, read_manifest, read_shard
from mike_ray.data.synth import generate_coco
from mike_ray.errors import MikeRayError
from mike_ray.mike.train import load_checkpoint
from mike_ray.models import build_model, load_weights
from mike_ray.models.registry import load_torch_file
from mike_ray.mike.zoo import load_teacher

REPO = Path(__file__).resolve().parents[1]
BAD_DIR = REPO / "tests" / "bad_inputs"

_spec = importlib.util.spec_from_file_location("make_bad_inputs", BAD_DIR / "make_bad_inputs.py")
mbi = importlib.util.module_from_spec(_spec)
sys.modules["make_bad_inputs"] = mbi  # dataclasses look their module up by name
_spec.loader.exec_module(mbi)
CATALOGUE: list = mbi.CATALOGUE
IDS = [f"{e.fmt}/{e.name}" for e in CATALOGUE]

# the library function behind each entry's `api` name: what a run calls on such a file
API: dict[str, Callable[[Path], object]] = {
    "load_coco": load_coco,
    "read_image": read_image,
    "check_coco_root": check_coco_root,
    "read_shard": lambda p: read_shard(p, 64),
    "read_manifest": read_manifest,
    "check_dataset": check_dataset,
    "load_torch_file": load_torch_file,
    "load_weights": lambda p: load_weights(build_model(mbi.TEACHER_MODEL), p),
    "load_checkpoint": load_checkpoint,
    "load_teacher": load_teacher,
}
MINIMUM = {"coco": 6, "images": 4, "shards": 5, "manifests": 5, "checkpoints": 4}


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line of a failed run (asserts there is nothing else on stderr)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", stderr
    return lines[0]


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """The generated (binary / dataset-derived) entries, written once per session."""
    return mbi.make(tmp_path_factory.mktemp("bad_inputs") / "gen")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small real COCO-layout dataset (8 generated images) that the prepare tests damage copies of."""
    root = tmp_path_factory.mktemp("synth")
    generate_coco(root, n_images=8, seed=0)
    return root


# --------------------------------------------------------------------------- the catalogue itself

def test_catalogue_size_and_consistency() -> None:
    counts = {fmt: sum(e.fmt == fmt for e in CATALOGUE) for fmt in mbi.FORMATS}
    assert sum(counts.values()) >= 25, counts
    assert all(counts[f] >= n for f, n in MINIMUM.items()), counts
    assert len(set(IDS)) == len(IDS)
    assert all(e.api in API and e.error in ("DataError", "ModelError", "ConfigError") for e in CATALOGUE)
    # every committed file belongs to an entry, and every committed entry exists
    tops = {(e.fmt, e.name.split("/")[0]) for e in CATALOGUE if not e.generated}
    for fmt in mbi.FORMATS:
        on_disk = {(fmt, p.name) for p in (BAD_DIR / fmt).iterdir()} if (BAD_DIR / fmt).is_dir() else set()
        assert on_disk == {t for t in tops if t[0] == fmt}, fmt
    readme = (BAD_DIR / "README.md").read_text()
    missing = [i for i in IDS if f"`{i}`" not in readme]
    assert not missing, f"README.md does not list {missing} (python tests/bad_inputs/make_bad_inputs.py --readme)"


def test_generation_is_deterministic(generated: Path, tmp_path: Path) -> None:
    again = mbi.make(tmp_path / "gen")
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (generated / rel).read_bytes() == (again / rel).read_bytes(), rel


# --------------------------------------------------------------------------- (a) the API

@pytest.mark.parametrize("entry", CATALOGUE, ids=IDS)
def test_api_raises_typed_one_line_error(entry, generated: Path) -> None:
    path = entry.path(generated)
    for call in (API[entry.api], check_path):  # the reader itself, and the check CLI's dispatcher
        with pytest.raises(MikeRayError) as exc:
            call(path)
        assert type(exc.value).__name__ == entry.error, (call, exc.value)
        msg = str(exc.value)
        assert "\n" not in msg and str(path) in msg, msg
        assert entry.needle in msg, f"{entry.needle!r} not in {msg!r}"


# --------------------------------------------------------------------------- (b) the CLI

def test_check_cli_each_rejects_every_entry(generated: Path) -> None:
    paths = [str(e.path(generated)) for e in CATALOGUE]
    proc = run("mike_ray.check", "--each", *paths)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(CATALOGUE), proc.stderr
    for entry, path, line in zip(CATALOGUE, paths, lines):
        assert line.startswith(f"error: {path}"), line
        assert entry.needle in line, (entry.needle, line)


@pytest.mark.parametrize("fmt", mbi.FORMATS)
def test_check_cli_single_path_exits_2_with_one_line(fmt: str, generated: Path) -> None:
    # the first entry of each format, without --each: exactly one stderr line
    entry = next(e for e in CATALOGUE if e.fmt == fmt)
    path = entry.path(generated)
    proc = run("mike_ray.check", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert str(path) in line and entry.needle in line


def test_check_cli_accepts_valid_inputs_and_stops_at_the_first_bad_one(synth_root: Path, tmp_path: Path,
                                                                       generated: Path) -> None:
    from mike_ray.models import save_weights

    ds = prepare_dataset(PrepareConfig(tasks=["DCH"], augment_copies=0), synth_root, tmp_path / "prepared")
    img = next((synth_root / "synth").glob("*.jpg"))
    save_weights(build_model(mbi.TEACHER_MODEL), tmp_path / "w.pt")
    (tmp_path / "sweep.yaml").write_text("name: minimal\nteacher_subsets: {pair: [DCH, CTB]}\nstudy: {trials: 3}\n")
    good = [synth_root / "annotations" / "instances_synth.json", synth_root, img, ds, ds / MANIFEST,
            ds / "train" / "DCH.parquet", tmp_path / "w.pt", tmp_path / "sweep.yaml"]
    proc = run("mike_ray.check", *map(str, good))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    kinds = [ln.split(" (")[1].split(",")[0] for ln in proc.stdout.splitlines()]
    assert kinds == ["coco", "coco-root", "image", "dataset", "manifest", "shard", "weights", "sweep"], proc.stdout
    assert "content hash verified" in proc.stdout.splitlines()[4]  # a dataset's manifest: the dataset is checked
    # without --each the first bad path ends the run: the good one before it is reported, not the one after;
    # --model fits the weights against a spec
    bad = CATALOGUE[0].path(generated)
    proc = run("mike_ray.check", str(tmp_path / "w.pt"), str(bad), str(ds), "--model", json.dumps(mbi.TEACHER_MODEL))
    assert proc.returncode == 2
    assert proc.stdout.startswith(f"ok: {tmp_path / 'w.pt'} (weights, 118 tensors, fit --model")
    assert str(ds) not in proc.stdout and str(bad) in one_error_line(proc.stderr)


# --------------------------------------------------------------------------- nothing partial

def assert_nothing_left(out: Path) -> None:
    """No manifest anywhere, no (hidden) build directory: nothing a later run could take as finished."""
    if out.exists():
        assert not list(out.rglob(MANIFEST)), list(out.rglob("*"))
        assert list(out.iterdir()) == [], list(out.iterdir())


def _damaged_copy(synth_root: Path, dst: Path, bad_image: Path) -> list[Path]:
    """Copy the COCO root and overwrite the later half of its images (by id) with ``bad_image``'s bytes,
    so preparation fails after it has written crops of the first half. Returns the damaged files."""
    root = Path(shutil.copytree(synth_root, dst))
    images = sorted(json.loads((root / "annotations" / "instances_synth.json").read_text())["images"],
                    key=lambda i: i["id"])
    damaged = [root / "synth" / i["file_name"] for i in images[len(images) // 2:]]
    for path in damaged:
        path.write_bytes(bad_image.read_bytes())
    return damaged


COCO_ENTRIES = [e for e in CATALOGUE if e.fmt == "coco"]
IMAGE_FILES = [e for e in CATALOGUE if e.kind == "image"]
COCO_ROOTS = [e for e in CATALOGUE if e.kind == "coco-root"]


@pytest.mark.parametrize("entry", COCO_ENTRIES, ids=[e.name for e in COCO_ENTRIES])
def test_prepare_rejects_malformed_annotation_file(entry, tmp_path: Path, capsys) -> None:
    (tmp_path / "c" / "annotations").mkdir(parents=True)
    ann = tmp_path / "c" / "annotations" / "instances_bad.json"
    shutil.copy(entry.path(BAD_DIR), ann)
    with pytest.raises(SystemExit) as exc:
        data_main(["prepare", "--coco-root", str(tmp_path / "c"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(ann) in line and entry.needle in line, line
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("entry", IMAGE_FILES, ids=[e.name for e in IMAGE_FILES])
def test_prepare_fails_midway_on_a_bad_image_and_leaves_nothing(entry, synth_root: Path, tmp_path: Path,
                                                                generated: Path) -> None:
    damaged = _damaged_copy(synth_root, tmp_path / "c", entry.path(generated))
    done: list[int] = []
    with pytest.raises(MikeRayError) as exc:
        prepare_dataset(PrepareConfig(augment_copies=0), tmp_path / "c", tmp_path / "out",
                        progress=lambda n, total: done.append(n))
    msg = str(exc.value)
    assert type(exc.value).__name__ == entry.error and entry.needle in msg, msg
    assert any(str(p) in msg for p in damaged), msg
    assert done, "preparation should have written crops of the good images before the bad one"
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("entry", COCO_ROOTS, ids=[e.name for e in COCO_ROOTS])
def test_prepare_rejects_bad_coco_root(entry, tmp_path: Path, generated: Path, capsys) -> None:
    root = entry.path(generated)
    with pytest.raises(SystemExit) as exc:
        data_main(["prepare", "--coco-root", str(root), "--out", str(tmp_path / "out"), "--tasks", "DCH"])
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(root) in line and entry.needle in line, line
    assert_nothing_left(tmp_path / "out")


def test_prepare_cli_subprocess_bad_image_then_repaired(synth_root: Path, tmp_path: Path, generated: Path) -> None:
    """The real command: one line, exit 2, nothing left; after the repair a normal run builds the dataset."""
    damaged = _damaged_copy(synth_root, tmp_path / "c", generated / "images" / "truncated.jpg")
    args = ("prepare", "--coco-root", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--tasks", "DCH", "CTB")
    proc = run("mike_ray.data", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert "cannot read image" in line and any(str(p) in line for p in damaged), line
    assert_nothing_left(tmp_path / "out")
    for path in damaged:  # repair
        shutil.copy(synth_root / "synth" / path.name, path)
    proc = run("mike_ray.data", *args)
    assert proc.returncode == 0, proc.stderr
    ds = Path(proc.stdout.strip().splitlines()[-1])
    assert (ds / MANIFEST).is_file() and [p.name for p in (tmp_path / "out").iterdir()] == [ds.name]
    assert check_path(ds)[0] == "dataset"

