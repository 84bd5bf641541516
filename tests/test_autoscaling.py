"""The autoscaler serves the main job: a simulated GPU cluster that scales from zero, loses a node, finishes.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER``: worker "nodes" are local raylets with the
resources their type declares, GPUs as logical resources) runs the autoscaler for real. The worker
node types are read from the shipped ``cluster/aws.yaml`` — same names, same resource shapes, CPUs
scaled down to one per node, min 0 — so a change there that breaks scheduling breaks this test. The
head is CPU-only, as in aws.yaml, with token authentication on.

The user's path: ``ray job submit -- python -m mike_ray.sweep sweeps/teacher_subsets.yaml`` (its
smoke profile: one 3-teacher MIKE trial of three short transfer epochs; the working-dir upload is
tests/test_job_submit.py's). Each teacher shard takes a (logical) GPU and ``teacher_shard: 1`` (only ``teacher_gpu``
nodes have it), the trainer worker ``trainer: 1`` (only ``trainer_gpu``). Trainer workers ask for no
GPU here: Ray Train binds a worker holding a GPU to CUDA (NCCL, a cuda device), which a CPU-only
machine cannot give; shards run on the CPU when CUDA is absent. Asserted from Ray's own state: worker
nodes are launched for the pending trial; once the transfer has checkpointed an epoch, the
``teacher_gpu`` node holding the shards is killed (its raylet SIGKILLed, as a preempted spot instance
vanishes); the autoscaler launches a replacement, the shards restart there, the lost steps are sent
again, and the trial finishes with one MLflow run; every worker node is released after the idle
timeout. What it cost is printed (steps re-sent, seconds).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import check_score_metrics, free_port, head_port_flags
from mike_ray.config import load_sweep

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AWS = ROOT / "cluster" / "aws.yaml"
pytestmark = pytest.mark.slow


def simulated_node_types(path: Path = AWS) -> tuple[dict, dict]:
    """(worker node types, head resources) of a cluster-launcher file, scaled to this machine: every
    worker type keeps its name, GPUs, custom resources and max_workers, gets one CPU and min 0."""
    cfg = yaml.safe_load(path.read_text())
    head = cfg["head_node_type"]
    types = {}
    for name, node in cfg["available_node_types"].items():
        if name == head:
            continue
        types[name] = {"resources": {**node["resources"], "CPU": 1, "object_store_memory": 200 * 2**20},
                       "node_config": {}, "min_workers": 0, "max_workers": int(node["max_workers"])}
    head_resources = dict(cfg["available_node_types"][head]["resources"])
    return types, {**head_resources, "CPU": 1}


def autoscaling_config(types: dict, head: dict, gcs_address: str, idle_minutes: float) -> dict:
    """A fake_multinode autoscaling config (Ray's fake_multi_node/example.yaml, with our types)."""
    return {
        "cluster_name": "mike-ray-sim", "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": 1.0, "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {**types, "ray.head.default": {"resources": head, "node_config": {},
                                                               "max_workers": 0}},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def test_the_simulated_aws_node_types_are_the_shipped_ones() -> None:
    types, head = simulated_node_types()
    assert set(types) == {"teacher_gpu", "trainer_gpu"} and head == {"CPU": 1, "GPU": 0}
    assert types["teacher_gpu"]["resources"]["teacher_shard"] >= 2 and types["teacher_gpu"]["resources"]["GPU"] >= 2
    assert types["trainer_gpu"]["resources"]["trainer"] >= 1


def _alive_workers(dashboard: str, env: dict, include_head: bool = False) -> list[dict]:
    """Ray's own view: the alive worker nodes, each with its ``node_id`` and ``resources_total``, from
    the State API (what `ray list nodes` reads; one HTTP call, not a CLI process per poll)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=1000&detail=1",
                                 headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as err:
        if include_head:
            return []  # the head's dashboard is not serving yet
        raise AssertionError(f"the State API did not answer: {err}") from None
    nodes = ((body.get("data") or {}).get("result") or {}).get("result") or []
    return [n for n in nodes if n.get("state") == "ALIVE" and (include_head or not n.get("is_head_node"))]


def test_an_autoscaling_cluster_serves_a_sweep_loses_a_node_and_releases_its_nodes(tmp_path) -> None:
    import mlflow

    types, head = simulated_node_types()
    port, dash = free_port(), free_port()
    from ray._private.services import get_node_ip_address

    address = f"{get_node_ip_address()}:{port}"  # where the provider's simulated nodes find the GCS
    dashboard = f"http://127.0.0.1:{dash}"
    conf = tmp_path / "autoscaling.json"
    conf.write_text(json.dumps(autoscaling_config(types, head, address, idle_minutes=0.1)))
    ray_tmp = tempfile.mkdtemp(prefix="mr-as-", dir="/tmp")  # socket paths must stay short
    # token authentication on, as in cluster/aws.yaml: the simulated nodes inherit it from the head
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    # a lost node is noticed after ~2 s instead of ~30 s (GCS health checks), as a cloud would within seconds
    system = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
              "health_check_failure_threshold": 2}
    headp = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                              f"--autoscaling-config={conf}", f"--num-cpus={head['CPU']}", f"--num-gpus={head['GPU']}",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                              *head_port_flags(),
                              f"--system-config={json.dumps(system)}", f"--temp-dir={ray_tmp}"],
                             env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=ROOT)  # the job's entrypoint runs here
    out = tmp_path / "out"
    seen: dict = {"launched": [], "killed": None}
    try:
        deadline = time.time() + 90
        while not _alive_workers(dashboard, env, include_head=True):
            assert headp.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-1500:]
            time.sleep(1)
        assert _alive_workers(dashboard, env) == []  # scale from zero

        # without the token the job API refuses
        denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard],
                                env={**env, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True, text=True)
        assert denied.returncode != 0

        # the user's main job: `ray job submit -- python -m mike_ray.sweep sweeps/teacher_subsets.yaml` (its
        # smoke profile, one 3-teacher trial). Without --working-dir (tests/test_job_submit.py covers the
        # upload): the simulated nodes share one disk, and a node's runtime-env agent deletes the job's
        # unpacked working dir there when its own reference ends — which cannot happen on real nodes
        submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
                  "python", "-m", "mike_ray.sweep", "sweeps/teacher_subsets.yaml", "--profile", "smoke",
                  "--set", f"output={out}", "--set", "study.trials=1", "--set", "study.baselines=false",
                  "--set", "study.control=false", "--set", "search.teacher_subset=[three]",
                  "--set", "zoo.tasks=[CTB, DCH, PCS]", "--set", "teacher_subsets={three: [CTB, DCH, PCS]}",
                  "--set", "transfer.epochs=3", "--set", "transfer.batch_size=8",
                  "--set", "resources.placement={mode: ray, teachers_per_shard: auto, num_shards: 2, "
                           "cpus_per_shard: 0.5, gpus_per_shard: 1, resources: {teacher_shard: 1}, threads: 1, "
                           "restart_timeout_s: 180}",
                  "--set", "resources.workers={num_workers: 1, cpus_per_worker: 0.5, resources: {trainer: 1}}"]
        t0 = time.time()
        while True:
            proc = subprocess.Popen(submit, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
            reader.start()
            time.sleep(3)
            # the job API answers before the head's dashboard agent can take jobs: try again then
            if proc.poll() is None or "No available agent" not in "".join(lines) or time.time() - t0 > 120:
                break
            reader.join(5)

        # --- the trial's demand launches worker nodes; once the transfer has written its first
        # checkpoint (an epoch done, the next one running on the shards), the teacher node is killed
        runs = out / "sweeps" / "teacher_subsets-smoke" / "runs"
        last_poll, teacher = 0.0, []
        while proc.poll() is None and time.time() - t0 < 600:
            if time.time() - last_poll > 1:  # Ray's view of the nodes
                last_poll = time.time()
                alive = _alive_workers(dashboard, env)
                for n in alive:
                    if n["node_id"] not in [w["node_id"] for w in seen["launched"]]:
                        seen["launched"].append({**n, "t": time.time() - t0})
                teacher = [n["node_id"] for n in alive if n["resources_total"].get("teacher_shard")]
            if seen["killed"] is None and list(runs.glob("*/checkpoint_*")):
                assert teacher, "a transfer ran without a teacher_gpu node"
                seen["killed"] = {"node": teacher[0], "t": time.time() - t0}
                _kill_node(teacher[0])
            time.sleep(0.2)
        proc.wait(timeout=60)
        reader.join(5)
        log = "".join(lines)
        assert proc.returncode == 0 and "succeeded" in log.lower(), log[-4000:]
        assert "sweep 'teacher_subsets-smoke'" in log and "MLflow store" in log
        finished_t = time.time() - t0

        # --- the nodes go away after the idle timeout -----------------------------------------------
        deadline = time.time() + 120
        while _alive_workers(dashboard, env) and time.time() < deadline:
            time.sleep(2)
        released_t = time.time() - t0
        left = _alive_workers(dashboard, env)
        if left:
            held = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", dashboard, "--filter",
                                   "state=ALIVE"], env=env, capture_output=True, text=True).stdout
            pgs = subprocess.run([str(BIN / "ray"), "list", "placement-groups", "--address", dashboard],
                                 env=env, capture_output=True, text=True).stdout
            print(f"\nlaunched {[(n['node_id'][-5:], round(n['t'])) for n in seen['launched']]}, killed {seen['killed']}"
                  f"\nleft {[(n['node_id'][-5:], n['resources_total']) for n in left]}\n{held[-3000:]}\n{pgs[-3000:]}"
                  f"\n{log[-3000:]}")
        assert left == [], "worker nodes still up after the idle timeout"
    finally:
        os.killpg(headp.pid, signal.SIGKILL)
        headp.wait(30)
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)

    kinds = [("teacher_gpu" if n["resources_total"].get("teacher_shard") else "trainer_gpu") for n in seen["launched"]]
    assert seen["killed"] is not None, f"the teacher node never came up: {seen['launched']}"
    assert kinds.count("teacher_gpu") >= 2 and kinds.count("trainer_gpu") >= 1, kinds  # replaced after the loss
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mike_ray-smoke").experiment_id
    runs = client.search_runs([exp], "tags.`mike_ray.stage` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    assert sorted(runs[0].data.params["teachers"].split(",")) == ["CTB", "DCH", "PCS"]
    (zoo_dir,) = (out / "zoo").iterdir()
    check_score_metrics(runs[0].data.metrics, zoo_dir, load_sweep(ROOT / "sweeps" / "teacher_subsets.yaml",
                                                                  profile="smoke").downstream.tasks)
    retries = runs[0].data.metrics.get("shard/retries_total", 0.0)
    # the loss hit the running transfer: shard steps were sent again once the shards were back
    assert retries >= 1, runs[0].data.metrics
    print(f"\nautoscaling: nodes launched at {[round(n['t']) for n in seen['launched']]} s ({kinds}); "
          f"teacher node killed at {seen['killed']['t']:.0f} s; sweep done at {finished_t:.0f} s; "
          f"shard steps re-sent {retries:.0f}; worker nodes released at {released_t:.0f} s")


def _kill_node(node_id: str) -> None:
    """SIGKILL the raylet of a simulated node (and what it started): the node is gone at once."""
    out = subprocess.run(["pgrep", "-f", f"node[-_]id={node_id}"],
                         capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
