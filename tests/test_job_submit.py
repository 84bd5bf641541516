"""`ray job submit --working-dir .` of the bring-your-own smoke sweep to a local head (token auth on).

This is the user's main-job path: `ray start --head`, then `ray job submit --working-dir . -- …`, with
the entrypoint the header of sweeps/bring_your_own.yaml gives for its smoke profile: random-weight
state dicts for the three torchvision teachers written first (`python -m mike_ray.random_teachers`),
then the sweep. What this test adds is the job path (working-dir upload, token authentication, the
job's exit status and log) and teachers mike_ray did not train (heterogeneous torchvision models, a
task of the sweep's own `tasks:` table) in one run: each sweep here costs a Ray start, a zoo and a
trial's worth of processes, so the two share one. The teacher_subsets main job runs through the job
API in tests/test_autoscaling.py, on a simulated autoscaling cluster.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import check_score_metrics, free_port, head_port_flags
from mike_ray.config import load_sweep

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def test_ray_job_submit_uploads_and_runs_the_bring_your_own_smoke_sweep_on_a_local_head(tmp_path: Path) -> None:
    import mlflow

    gcs, dash = free_port(), free_port()
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
                             *head_port_flags(),
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

        # the smoke entrypoint of sweeps/bring_your_own.yaml's header; its weights paths are relative,
        # written and read in the job's unpacked working dir; results go to an absolute output
        sweep = "sweeps/bring_your_own.yaml --profile smoke"
        submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", "sh", "-c",
                  f"python -m mike_ray.random_teachers {sweep} && python -m mike_ray.sweep {sweep} "
                  f"--set output={out} --set study.control=false"]
        deadline = time.time() + 120
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            # the job API answers before the head's dashboard agent can take jobs: try again then
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout.lower()
        assert "sweep 'byo-smoke'" in job.stdout and "MLflow store" in job.stdout
        assert "FAILED" not in job.stdout, job.stdout[-3000:]
    finally:
        # the job has ended and its driver wrote everything; `ray start --block` handles SIGTERM by
        # waiting ~30 s on its children, so the head's process group is killed outright
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # the MIKE trial trained against all three own teachers (each has train and val loss terms, none
    # a constant 0.0) and its downstream scores were logged
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mike_ray-smoke").experiment_id
    runs = client.search_runs([exp], "tags.`mike_ray.method` = 'mike' and tags.`mike_ray.stage` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    m, params = runs[0].data.metrics, runs[0].data.params
    assert params["teachers"] == "seg_lraspp,seg_deeplab,cls_resnet18" and params["query_tasks"] == "PHB,DCH,VEH"
    for name in ("seg_lraspp", "seg_deeplab", "cls_resnet18"):
        train = [v for k, v in m.items() if k.startswith(f"loss/teacher/{name}/")]
        val = [v for k, v in m.items() if k.startswith(f"loss/val/teacher/{name}/")]
        assert train and val and all(v > 0 for v in train + val), (name, sorted(m))
    # VEH, a task of the sweep's own table, four classes: its zoo teacher and decoder have four maps
    assert "iou/val/DCH" in m and "iou/test/VEH" in m
    (zoo_dir,) = (out / "zoo").iterdir()
    check_score_metrics(m, zoo_dir, load_sweep(ROOT / "sweeps" / "bring_your_own.yaml", profile="smoke").downstream.tasks)
    (record,) = (out / "sweeps" / "byo-smoke" / "trials").glob("*.json")
    assert json.loads(record.read_text())["status"] == "finished"
