"""``python -m mike_ray.data``: the happy path, and bad input → one line naming the file, exit 2."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_data_cli as run_cli
from mike_ray.data.synth import generate_coco


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.fixture
def synth(small_coco: Path) -> Path:
    return small_coco


def test_generate_prepare_inspect(tmp_path: Path) -> None:
    proc = run_cli("generate", "--out", str(tmp_path / "coco"), "--images", "10", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "coco" / "annotations" / "instances_synth.json").is_file()
    (tmp_path / "prep.yaml").write_text("augment_copies: 1\nmin_area: 100\n")
    proc = run_cli("prepare", "--coco-root", str(tmp_path / "coco"), "--out", str(tmp_path / "out"),
                   "--config", str(tmp_path / "prep.yaml"), "--tasks", "DCH", "CTB")
    assert proc.returncode == 0, proc.stderr
    root = Path(proc.stdout.strip().splitlines()[-1])
    man = json.loads((root / "manifest.json").read_text())
    assert root.parent == tmp_path / "out" and man["tasks"] == ["DCH", "CTB"]
    assert man["config"]["augment_copies"] == 1 and man["config"]["min_area"] == 100
    assert set(man["counts"]) == {"train", "val", "test"}
    assert all((root / split / f"{task}.parquet").is_file() for split in man["counts"] for task in man["tasks"])
    proc = run_cli("inspect", str(root))
    assert proc.returncode == 0 and "CTB   bus" in proc.stdout and man["config_key"] in proc.stdout
    header = proc.stdout.splitlines()[1].split()
    assert header == ["task", "class", "train", "val", "test", "inst.train", "inst.val", "inst.test"], header
    totals = proc.stdout.splitlines()[-1].split()
    assert totals[0] == "all" and [int(n) for n in totals[1:]] == \
        [sum(sum(c.values()) for c in man["counts"][s].values()) for s in ("train", "val", "test")]
    assert run_cli("inspect", str(root.parent)).stdout == proc.stdout  # the --out dir lists its datasets


def test_missing_annotation_file(synth: Path, tmp_path: Path) -> None:
    proc = run_cli("prepare", "--coco-root", str(synth), "--out", str(tmp_path), "--splits", "train2017")
    assert_one_line_error(proc, "instances_train2017.json: annotation file not found")


def test_malformed_json(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_x.json").write_text('{"images": [}')
    proc = run_cli("prepare", "--coco-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "instances_x.json: invalid JSON at line 1")


def test_missing_image(synth: Path, tmp_path: Path) -> None:
    import shutil
    root = Path(shutil.copytree(synth, tmp_path / "c"))
    data = json.loads((root / "annotations" / "instances_synth.json").read_text())
    first = min(data["images"], key=lambda i: i["id"])
    (root / "synth" / first["file_name"]).unlink()
    proc = run_cli("prepare", "--coco-root", str(root), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, f"{first['file_name']}: image file not found (image id {first['id']}")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_unknown_category(synth: Path, tmp_path: Path) -> None:
    import shutil
    root = Path(shutil.copytree(synth, tmp_path / "c"))
    path = root / "annotations" / "instances_synth.json"
    data = json.loads(path.read_text())
    data["categories"] = [c for c in data["categories"] if c["name"] != "stop sign"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 13]
    path.write_text(json.dumps(data))
    proc = run_cli("prepare", "--coco-root", str(root), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "instances_synth.json: categories: no category named 'stop sign' (task BTS)")
    data["annotations"][0]["category_id"] = 12  # an id COCO never used
    path.write_text(json.dumps(data))
    proc = run_cli("prepare", "--coco-root", str(root), "--out", str(tmp_path / "o"), "--tasks", "DCH")
    first_id = data["annotations"][0]["id"]
    assert_one_line_error(proc, f"instances_synth.json: annotations[0] (id {first_id}).category_id: "
                                "unknown category id 12")


def test_bad_config_and_tasks(synth: Path, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("augment_copie: 2\n")
    proc = run_cli("prepare", "--coco-root", str(synth), "--out", str(tmp_path), "--config", str(tmp_path / "p.yaml"))
    assert_one_line_error(proc, "p.yaml: augment_copie: unknown key (did you mean 'augment_copies'?)")
    (tmp_path / "p.yaml").write_text("val_fraction: 0.5\ntest_fraction: 0.5\n")
    proc = run_cli("prepare", "--coco-root", str(synth), "--out", str(tmp_path), "--config", str(tmp_path / "p.yaml"))
    assert_one_line_error(proc, "p.yaml: val_fraction + test_fraction: must be < 1")
    proc = run_cli("prepare", "--coco-root", str(synth), "--out", str(tmp_path), "--tasks", "DCH", "DOG")
    assert_one_line_error(proc, "--tasks: tasks: unknown task code 'DOG'")
    proc = run_cli("inspect", str(tmp_path))
    assert_one_line_error(proc, "manifest.json: manifest not found")


def test_regenerating_with_another_seed_replaces_images_and_annotations_together(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    first = json.loads(generate_coco(root, n_images=4, seed=1).read_text())
    second = json.loads(generate_coco(root, n_images=2, seed=2).read_text())
    assert [i["file_name"] for i in second["images"]] == sorted(p.name for p in (root / "synth").iterdir())
    assert first["annotations"] != second["annotations"]
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "synth"]  # no temporary left behind
