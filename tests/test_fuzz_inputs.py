"""Property test: inputs nobody wrote by hand. Valid sweep files, COCO annotation files and manifests
are mutated at random (a value replaced by any JSON/YAML value, a key dropped, an unknown key added);
every outcome must be a success or a one-line ``MikeRayError`` (which the CLIs turn into exit 2) —
never another exception. A COCO file the validator accepts is also decoded by pycocotools and cropped
(where a malformed value would crash the C code), so "accepted" has to mean "usable".

Budget: 100 examples per reader, derandomized (the same inputs every run, ~15 s); set
MIKE_RAY_FUZZ_EXAMPLES=2000 for a longer random search (hypothesis' database replays failures).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mike_ray.config import load_sweep
from mike_ray.data.coco import PrepareConfig, load_coco, task_mask
from mike_ray.data.synth import generate_coco
from mike_ray.data.tasks import resolve_task_categories
from mike_ray.errors import MikeRayError

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=int(os.environ.get("MIKE_RAY_FUZZ_EXAMPLES", 100)), deadline=None,
                    derandomize=not os.environ.get("MIKE_RAY_FUZZ_EXAMPLES"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# any value a careless or hostile file could hold where another was expected
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**63, 2**64, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "..", "/", "all", "a:b", "segmenter", "DCH", "nan", "1e309", "\x00", "é" * 300]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in ``tree`` (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, base: Any) -> Any:
    """``base`` with 1–3 random mutations."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(tree)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = tree
        for p in path[:-1]:
            parent = parent[p]
        kind = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if kind == "replace":
            parent[path[-1]] = draw(VALUES)
        elif kind == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return tree


def assert_success_or_one_line(fn) -> Any:
    try:
        return fn()
    except MikeRayError as err:
        msg = str(err)
        assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
        return None


# --- sweep files --------------------------------------------------------------------------------------

SWEEP = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())


@SETTINGS
@given(tree=mutated(SWEEP))
def test_mutated_sweep_files_load_or_fail_in_one_line(tmp_path_factory, tree) -> None:
    path = tmp_path_factory.mktemp("sweep") / "s.yaml"
    try:
        text = yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        return  # not representable as YAML: not a file anyone can write
    path.write_text(text, encoding="utf-8")
    for profile in (None, "smoke"):
        assert_success_or_one_line(lambda: load_sweep(path, profile=profile))


# --- COCO annotation files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco_base(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("coco")
    ann = generate_coco(root, n_images=3, seed=1)
    return root, json.loads(ann.read_text())


@SETTINGS
@given(data=st.data())
def test_mutated_coco_files_load_and_decode_or_fail_in_one_line(coco_base, tmp_path_factory, data) -> None:
    root, base = coco_base
    tree = data.draw(mutated(base))
    path = tmp_path_factory.mktemp("ann") / "instances_synth.json"
    path.write_text(json.dumps(tree))
    coco = assert_success_or_one_line(lambda: load_coco(path))
    if coco is None:
        return
    # accepted: pycocotools must be able to decode every annotation of every task's categories
    for task in PrepareConfig().tasks:
        cats = assert_success_or_one_line(lambda: tuple(resolve_task_categories(coco, task, str(path))))
        if cats is None:
            continue
        for img_id, anns in coco.imgToAnns.items():
            if anns:
                assert_success_or_one_line(lambda: task_mask(coco, anns, cats, str(path)))


# --- manifests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest_base(tiny_prepared) -> dict:
    return json.loads((tiny_prepared / "manifest.json").read_text())


@SETTINGS
@given(data=st.data())
def test_mutated_manifests_read_or_fail_in_one_line(manifest_base, tmp_path_factory, data) -> None:
    from mike_ray.data.shards import read_manifest

    tree = data.draw(mutated(manifest_base))
    path = tmp_path_factory.mktemp("man") / "manifest.json"
    path.write_text(json.dumps(tree))
    assert_success_or_one_line(lambda: read_manifest(path))
