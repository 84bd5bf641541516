"""The package's import layers (docs/contracts.md): read from the source with ``ast``, every import
counted — also those inside functions — so a lazy import cannot hide a cycle or an upward edge."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mike_ray"

#: low → high; a module may import only from its own layer's package or a lower layer
LAYERS: list[set[str]] = [
    {"errors"},
    {"config_base", "utils"},
    {"metrics", "tracking", "resources"},
    {"data"},
    {"models"},
    {"pool", "report", "zoo"},
    {"mike", "mhgd"},          # the two methods, side by side: neither imports the other
    {"config"},
    {"orchestrate"},
    {"check", "sweep", "random_teachers", "__main__"},
]
#: inside orchestrate, low → high: bookkeeping, runs, trial drivers, the family table, Tuner, sweep driver
ORCHESTRATE: list[set[str]] = [
    {"records", "trainer", "stages"},
    {"transfer", "classify"},
    {"mike_trial", "mhgd_trial"},
    {"family"},
    {"tuning"},
    {"driver"},
]
#: the training loops never import Tune; teachers never see the student
FORBIDDEN = {"mike_ray.mike.train": "ray.tune", "mike_ray.mhgd.train": "ray.tune", "mike_ray.mhgd.worker": "ray.tune",
             "mike_ray.mike.shard": "mike_ray.models.autoencoder", "mike_ray.mhgd.shard": "ray.tune"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` counts ``a`` and ``a.b``)."""
    mod = module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i in mods and i != m} for m, p in mods.items()}


def _layer(mod: str, layers: list[set[str]], depth: int) -> int | None:
    part = mod.split(".")[depth] if len(mod.split(".")) > depth else None
    return next((i for i, names in enumerate(layers) if part in names), None)


def test_every_module_has_a_layer() -> None:
    for mod in graph():
        if mod == "mike_ray":
            continue
        assert _layer(mod, LAYERS, 1) is not None, f"{mod}: add its package to LAYERS"
        if mod.startswith("mike_ray.orchestrate."):
            assert _layer(mod, ORCHESTRATE, 2) is not None, f"{mod}: add it to ORCHESTRATE"


def test_no_upward_or_sideways_imports() -> None:
    bad = []
    for mod, deps in graph().items():
        if mod == "mike_ray":
            continue
        for dep in deps:
            if dep == "mike_ray":
                continue
            a, b = _layer(mod, LAYERS, 1), _layer(dep, LAYERS, 1)
            same_pkg = mod.split(".")[1] == dep.split(".")[1]
            if b > a or (b == a and not same_pkg):
                bad.append(f"{mod} -> {dep}")
            if same_pkg and mod.startswith("mike_ray.orchestrate.") and dep.startswith("mike_ray.orchestrate."):
                a2, b2 = _layer(mod, ORCHESTRATE, 2), _layer(dep, ORCHESTRATE, 2)
                if b2 > a2 or (b2 == a2 and mod.split(".")[2] != dep.split(".")[2]):
                    bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_forbidden_imports() -> None:
    for mod, banned in FORBIDDEN.items():
        path = PKG.parent / (mod.replace(".", "/") + ".py")
        assert not any(i == banned or i.startswith(banned + ".") for i in imports_of(path)), f"{mod} imports {banned}"


def test_no_module_over_600_lines() -> None:
    long = {module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_the_layer_test_sees_a_planted_cycle(tmp_path: Path) -> None:
    """The checks above can fail: a module that imports upward is reported."""
    planted = PKG / "data" / "_planted_upward.py"
    planted.write_text("def f():\n    from mike_ray.orchestrate import driver\n")
    try:
        try:
            test_no_upward_or_sideways_imports()
        except AssertionError as err:
            assert "mike_ray.data._planted_upward -> mike_ray.orchestrate" in str(err)
        else:
            raise AssertionError("an upward import was not reported")
    finally:
        planted.unlink()


def test_configs_and_the_sweep_driver_import_without_torch() -> None:
    """A sweep file is validated (and a bad one refused) before torch is imported: the CLI's one-line
    errors and every Tune trial process that only reads its context skip torch's seconds of imports."""
    import subprocess
    import sys

    code = ("import sys, mike_ray.config, mike_ray.orchestrate.driver, mike_ray.sweep; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_test_the_docs_name_exists() -> None:
    """A doc that tells the user to run ``tests/x.py::test_y`` names a test that is there."""
    import re

    root = PKG.parent
    docs = [*root.glob("docs/*.md"), root / "README.md", *root.glob("cluster/*.md")]
    missing = []
    for doc in docs:
        for path, name in re.findall(r"(tests/test_\w+\.py)::(\w+)", doc.read_text()):
            if not re.search(rf"^def {name}\b", (root / path).read_text() if (root / path).is_file() else "", re.M):
                missing.append(f"{doc.name}: {path}::{name}")
    assert not missing, missing
