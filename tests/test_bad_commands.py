"""The command-line half of the bad-input catalogue (issue 12, classes 6 and 7): tests/bad_inputs/commands.yaml.

Every ``cli`` entry is a ``python -m mike_ray.data`` command line that must end in one ``error:`` line and
exit 2 without writing its output; every ``reuse`` entry damages a finished prepared dataset and runs a
command that must notice it (rebuild it to the same content, or refuse with one line naming the file).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_data_cli
from mike_ray.data.shards import MANIFEST, read_manifest, validate_dataset

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = yaml.safe_load((REPO / "tests" / "bad_inputs" / "commands.yaml").read_text())
ENTRIES = [(cls, e) for cls in ("cli", "reuse") for e in CATALOGUE[cls]]
TASKS = ["DCH", "CTB"]


@pytest.fixture
def synth(small_coco: Path) -> Path:
    return small_coco


@pytest.fixture(scope="module")
def prepared(small_coco: Path, tmp_path_factory) -> Path:
    proc = run_data_cli("prepare", "--coco-root", str(small_coco), "--out", str(tmp_path_factory.mktemp("prep")),
                        "--tasks", *TASKS)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_catalogue_is_well_formed() -> None:
    names = [e["name"] for _, e in ENTRIES]
    assert len(names) == len(set(names)), "duplicate entry names"
    assert len(CATALOGUE["cli"]) >= 3 and len(CATALOGUE["reuse"]) >= 3
    for cls, e in ENTRIES:
        assert set(e) <= {"name", "what", "argv", "error", "rebuilt", "write", "damage"}, e
        assert e.get("what") and e.get("argv"), e
        assert ("error" in e) != ("rebuilt" in e), f"{e['name']}: exactly one of error / rebuilt"
        assert cls == "reuse" or "damage" not in e, e["name"]


@pytest.mark.parametrize("cls,entry", ENTRIES, ids=[e["name"] for _, e in ENTRIES])
def test_command_entry(cls: str, entry: dict, synth: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    own = out / prepared.name
    shutil.copytree(prepared, own)
    (tmp_path / "file").write_text("x")
    subst = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "file"), "{synth}": str(synth),
             "{prepared}": str(own), "{out}": str(out)}

    def fill(s: str) -> str:
        for key, value in subst.items():
            s = s.replace(key, value)
        return s

    for path, text in entry.get("write", {}).items():
        Path(fill(path)).write_text(text)
    for op, arg in entry.get("damage", {}).items():
        if op == "truncate":
            p = Path(fill(arg))
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif op == "delete":
            Path(fill(arg)).unlink()
        elif op == "copy":
            shutil.copyfile(fill(arg[0]), fill(arg[1]))
        else:
            raise AssertionError(f"{entry['name']}: unknown damage {op!r}")
    before = read_manifest(prepared).content_hash

    proc = run_data_cli(*[fill(a) for a in entry["argv"]])

    assert "Traceback" not in proc.stderr, proc.stderr
    if "error" in entry:
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert fill(entry["error"]) in lines[0], (entry["error"], lines[0])
        o = tmp_path / "o"
        assert not o.exists() or not any(o.iterdir()), f"wrote {list(o.rglob('*'))[:3]} before failing"
        assert (tmp_path / "file").read_text() == "x"
    else:
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip().splitlines()[-1]) == own
        validate_dataset(own)  # raises if the damage survived
        assert (own / MANIFEST).is_file() and read_manifest(own).content_hash == before
        assert sorted(p.name for p in out.iterdir()) == [own.name], "a temporary was left beside the dataset"
