"""Shared fixtures: one thread, one local Ray instance per test session, tiny generated data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Determinism and fairness on a 2-core machine: one intra-op thread everywhere in the test process.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's usage-stats prompt and the metrics exporter are noise in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train V2's controller acts on its worker group every 2 s by default: each state change of a fit
# (scheduled, running, finished, a dead worker seen) waits for that tick. Measured here on a no-op
# TorchTrainer fit: 18–23 s at 2 s, 13–16 s at 0.25 s; the suite runs ~20 fits. Set before Ray starts,
# so the raylet (and every actor it starts: the controllers) inherits it; users keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


REPO = Path(__file__).resolve().parents[1]


def run_data_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m mike_ray.data ARGS`` in a subprocess (one thread), output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mike_ray.data", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture(scope="session")
def small_coco(tmp_path_factory) -> Path:
    """A generated COCO root of 12 images (seed 4) that the data-CLI tests read, never write."""
    from mike_ray.data.synth import generate_coco

    root = tmp_path_factory.mktemp("small_coco")
    generate_coco(root, n_images=12, seed=4)
    return root


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray instance (2 logical CPUs) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        # the dashboard serves the State API with which Ray Train's placement-group cleaner sees that a
        # stopped trial's controller is gone and frees its workers' CPUs (as `python -m mike_ray.sweep`)
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 # Train's preemption watcher (one actor per fit, polling for node drain notices) has
                 # nothing to watch on one local node; the autoscaling test's cluster keeps it
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    yield ray
    # shut down only what this session started (never `ray stop`)
    ray.shutdown()


# --- two processes (pytest-xdist, `make test` runs `-n 2 --dist loadgroup`) ---------------------------
# Every test on the session's Ray instance runs in one worker process (xdist group "ray"), so there is
# one local Ray per test session as before; the other worker meanwhile runs everything else — the tests
# that start their own Ray head (job submit, the autoscaling cluster) first, then the fast ones. Ray
# tests leave ~25% of the two cores idle (process start-up, polling), which the second worker fills.
RAY_GROUP = "ray"


def _uses_session_ray(item: pytest.Item) -> bool:
    return "ray_local" in getattr(item, "fixturenames", ()) or item.get_closest_marker("ray_session") is not None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    grouped = {item for item in items if _uses_session_ray(item)}
    for item in grouped:
        item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
    # the long poles first: the Ray group (xdist sends it as one unit), then the slow tests that start
    # their own Ray, then the rest in file order (a stable sort keeps it)
    items.sort(key=lambda it: 0 if it in grouped else 1 if it.get_closest_marker("slow") else 2)


def pytest_configure(config: pytest.Config) -> None:
    # pytest 9.2 keeps node ids where pytest-xdist 3.8 cannot suffix them, so `--dist loadgroup` silently
    # spreads the Ray tests over both workers: two Ray instances on two cores, which hangs
    if config.getoption("dist", "no") == "loadgroup" and pytest.version_tuple >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup: install the "
                                f"versions pyproject.toml pins (make setup)")


@pytest.fixture(autouse=True)
def _session_ray_only_where_declared(request: pytest.FixtureRequest):
    """A test that starts the in-process Ray without asking for ``ray_local`` (or the ``ray_session``
    marker) would start a second Ray in the other xdist worker: fail it, naming the fix."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized() and not _uses_session_ray(request.node):
        pytest.fail("this test started Ray in-process without the ray_local fixture or the ray_session marker")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at this moment."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_port_flags() -> list[str]:
    """``ray start --head`` flags giving every agent the job API needs a free port: the fixed defaults
    may be held by another Ray on this machine (the test session's own)."""
    return [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "ray-client-server-port", "runtime-env-agent-port",
                                                   "metrics-export-port")]


TINY_TASKS = ["DCH", "CTB", "PHB"]
TINY_SEGMENTER = {"arch": "segmenter", "width": 4, "depth": 7, "expand_ratio": 2.0, "stem_stride": 2,
                  "num_downsamples": 2}
TINY_AE = {"arch": "autoencoder", "width": 4, "depth": 3, "expand_ratio": 2.0, "stem_stride": 2,
           "num_downsamples": 2, "embed_channels": 2}


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A real generated COCO-format dataset (60 images), prepared into Parquet shards for 3 tasks."""
    from mike_ray.data.coco import PrepareConfig
    from mike_ray.data.shards import prepare_dataset
    from mike_ray.data.synth import generate_coco

    coco = tmp_path_factory.mktemp("coco")
    generate_coco(coco, n_images=60, seed=0)
    cfg = PrepareConfig(tasks=TINY_TASKS, augment_copies=1)
    return prepare_dataset(cfg, coco, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def tiny_zoo(tiny_prepared, ray_local, tmp_path_factory) -> Path:
    """Three tiny teachers trained for one epoch as real Ray tasks (stored like any zoo)."""
    from mike_ray.mike.zoo import ZooConfig, build_zoo

    cfg = ZooConfig(tasks=TINY_TASKS, model=TINY_SEGMENTER, cpus_per_teacher=0.5,
                    train={"epochs": 1, "max_train_samples": 64, "batch_size": 32})
    return build_zoo(cfg, tiny_prepared, tmp_path_factory.mktemp("out"), progress=False)


# --- fault injection ---------------------------------------------------------------------------------
# Faults are real: SIGKILL of a Ray process, found by the title Ray gives it ("ray::<Class>" while an
# actor idles, "ray::<Class>.<method>" while it runs a call). Only this session's Ray processes (those
# descending from this test process) are touched, never another Ray on the machine.
def session_processes(title_prefix: str) -> list[int]:
    """Pids of this session's processes whose title starts with ``title_prefix``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(cmdline.parent.name)
        if title.startswith(title_prefix) and _descends_from(pid, os.getpid()):
            pids.append(pid)
    return pids


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint folder names that Ray Train has *registered* for ``run_dir`` (its snapshot lists them,
    so they are complete), oldest first."""
    import json

    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return [c["checkpoint_dir_name"] for c in snap["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def kill_processes(title_prefix: str, seen: dict, key: str, first_only: bool = False) -> bool:
    """SIGKILL this session's processes titled ``title_prefix…``; appends their pids to ``seen[key]``."""
    import signal

    pids = session_processes(title_prefix)[:1] if first_only else session_processes(title_prefix)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        seen.setdefault(key, []).append(pid)
    return bool(seen.get(key))


def kill_train_worker_after_first_checkpoint(run_dir: Path, ckpt_file: str, keep: Path, seen: dict) -> None:
    """Thread body: once Ray Train has registered a checkpoint of ``run_dir``, copy that checkpoint's
    ``ckpt_file`` to ``keep`` (Train may rotate it away), then SIGKILL this session's ``RayTrainWorker``
    processes. Records ``seen["killed"]`` (pids) and ``seen["checkpoint"]``."""
    import shutil
    import time

    deadline = time.time() + 240
    while time.time() < deadline:
        listed = registered_checkpoints(run_dir)
        if listed:
            shutil.copy(run_dir / listed[-1] / ckpt_file, keep)
            seen["checkpoint"] = keep
            if kill_processes("ray::RayTrainWorker", seen, "killed"):
                return
        time.sleep(0.05)


def _descends_from(pid: int, root: int) -> bool:
    """Whether process ``pid`` is a descendant of ``root`` (Linux /proc)."""
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4 (ppid), after the parenthesised name
        if pid == root:
            return True
    return False


# --- what a finished MIKE trial logs -----------------------------------------------------------------
def check_score_metrics(metrics: dict[str, float], zoo_dir: Path, tasks: list[str]) -> None:
    """A trial's final scores as its zoo implies them: raw IoU where the split has rows; a normalised IoU
    exactly where the task's teacher is above chance on that split (``TeacherRecord.reference_iou``;
    smoke teachers trained for one epoch often are not), and the mean whenever one task has it."""
    import math

    from mike_ray.mike.zoo import read_zoo

    ref = {r.task: r.reference_iou() for r in read_zoo(zoo_dir).values()}
    assert "score/mean_iou" in metrics and any(f"iou/val/{t}" in metrics for t in tasks), sorted(metrics)
    for split, mean in (("val", "score/mean_norm_iou"), ("test", "score/test/mean_norm_iou")):
        have = {t for t in tasks if f"norm_iou/{split}/{t}" in metrics}
        want = {t for t in tasks if not math.isnan(ref[t][split]) and f"iou/{split}/{t}" in metrics}
        assert have == want, (split, have, want)
        assert (mean in metrics) == bool(want), (mean, want)
