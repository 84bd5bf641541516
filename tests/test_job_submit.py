"""`ray job submit` of a smoke sweep to a local head started here (token authentication on).

This is the user's main-job path: `ray start --head`, then `ray job submit --working-dir . --
python -m mike_ray.sweep …`. It runs sweeps/teacher_subsets.yaml's smoke profile (the paper's study,
tiny, on generated data) with its three-teacher subset and a three-teacher zoo: what this test adds is
the job path (working-dir upload, token authentication, the job's exit status and log), not more
teachers — mixed batches over several teachers and shards are tested in process (tests/test_mike_step.py,
tests/test_shards.py) and in the resumed sweep of tests/test_sweep_e2e.py. The eleven-teacher subset
cost another ~45 s here (an 11-teacher zoo, two shards) and took no other code path.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import check_score_metrics
from mike_ray.config import load_sweep

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_smoke_sweep_on_a_local_head(tmp_path: Path) -> None:
    import mlflow

    gcs, dash = _free_port(), _free_port()
    # the job's `python` is the head's: this interpreter's environment
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    # Ray's socket paths must stay under 107 bytes: pytest's tmp_path is too deep for them
    ray_tmp = tempfile.mkdtemp(prefix="mr-head-", dir="/tmp")
    # --block keeps the head's processes children of this one, so the test stops exactly what it
    # started (`ray stop` would stop every Ray instance of the user, the test session's included)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             # fixed default ports may be held by another Ray on this machine (the test
                             # session's own): take free ones for every agent the job API needs
                             *(f"--{name}={_free_port()}" for name in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                 "ray-client-server-port", "runtime-env-agent-port", "metrics-export-port")),
                             f"--temp-dir={ray_tmp}"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = tmp_path / "out"
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, \
                "the Ray head did not come up: " + (tmp_path / "head.log").read_text()[-1500:]
            time.sleep(1)
        # without the token the job API refuses
        denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                env={**env, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True)
        assert denied.returncode != 0

        submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                  "python", "-m", "mike_ray.sweep", "sweeps/teacher_subsets.yaml", "--profile", "smoke",
                  "--set", f"output={out}", "--set", "study.trials=1", "--set", "study.baselines=false", "--set", "study.control=false",
                  "--set", "search.teacher_subset=[three]", "--set", "zoo.tasks=[CTB, DCH, PCS]",
                  "--set", "teacher_subsets={three: [CTB, DCH, PCS]}"]
        deadline = time.time() + 120
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            # the job API answers before the head's dashboard agent can take jobs: try again then
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout.lower()
        assert "sweep 'teacher_subsets-smoke'" in job.stdout and "MLflow store" in job.stdout
    finally:
        # the job has ended and its driver wrote everything; `ray start --block` handles SIGTERM by
        # waiting ~30 s on its children, so the head's process group is killed outright
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mike_ray-smoke").experiment_id
    runs = client.search_runs([exp], "tags.`mike_ray.stage` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["teacher_subset"] == "three"
    assert sorted(runs[0].data.params["teachers"].split(",")) == ["CTB", "DCH", "PCS"]
    (zoo_dir,) = (out / "zoo").iterdir()
    check_score_metrics(runs[0].data.metrics, zoo_dir, load_sweep(ROOT / "sweeps" / "teacher_subsets.yaml",
                                                                  profile="smoke").downstream.tasks)
