"""Trials: Ray Tune + Optuna over transfer runs, one MLflow child run per trial.

Ray Train V2 pattern: each Tune trial is a *function* that creates the teacher shards, builds and
fits a TorchTrainer (:func:`mike_ray.orchestrate.transfer.run_transfer`), then runs the downstream
evaluation and reports the objective. The trial reserves its shards' resources in its placement
group, so an autoscaler sees the teachers' demand; trainer workers reserve their own.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from mike_ray.config import Range, SearchConfig, SweepConfig
from mike_ray.tracking import RunLogger, Tracking
from mike_ray.utils import write_json_atomic



def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


# --- the search space (define-by-run: num_phases only exists for layerwise_progressive) ----------
def _suggest(trial, name: str, dim: Any) -> Any:
    if isinstance(dim, Range):
        if dim.int:
            return trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        return trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
    return trial.suggest_categorical(name, list(dim))


class DefineByRun:
    """An Optuna define-by-run space over the sweep's search dimensions (picklable: Tune saves the
    searcher with the experiment state, which is what ``--resume`` restores)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.search = cfg.search
        self.default_schedule = cfg.transfer.schedule.name

    def __call__(self, trial) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for name in ("teacher_subset", "method", "embed_channels", "schedule", "pretrain_fraction", "lr",
                     "num_heads", "phase1_epochs"):
            dim = getattr(self.search, name)
            if dim is not None:
                out[name] = _suggest(trial, name, dim)
        # num_phases only exists for the layerwise-progressive schedule
        if self.search.num_phases is not None and out.get("schedule", self.default_schedule) == "layerwise_progressive":
            out["num_phases"] = _suggest(trial, "num_phases", self.search.num_phases)
        return out or None


def trial_settings(cfg: SweepConfig, params: dict[str, Any]) -> tuple[str, dict[str, Any], str, list[str]]:
    """A trial's params → (its method, its TransferConfig dict, teacher subset name, teacher names).

    The method is "mike", "pixel" (the baseline) or "control" (no transfer: the untrained encoder,
    which needs no teachers and no subset: subset "-")."""
    method = params.get("method", cfg.method)
    t = cfg.transfer.model_dump()
    t["method"] = "pixel" if method == "control" else method
    t["seed"] = cfg.transfer.seed + int(params.get("__trial_index__", 0) or 0)
    if "embed_channels" in params:
        t["model"]["embed_channels"] = int(params["embed_channels"])
    if "lr" in params:
        t["lr"] = float(params["lr"])
    for key in ("schedule", "pretrain_fraction", "num_phases"):
        if key in params:
            t["schedule"]["name" if key == "schedule" else key] = params[key]
    if method == "control":
        return method, t, "-", []
    subset = params.get("teacher_subset") or next(iter(cfg.teacher_subsets))
    return method, t, subset, cfg.subset(subset)


def _shard_count(cfg: SweepConfig, n_teachers: int) -> int:
    from mike_ray.teachers.shard import shard_count

    p = cfg.resources.placement
    return shard_count(n_teachers, p.teachers_per_shard, p.num_shards)


def _uses_shards(cfg: SweepConfig, methods: list[str]) -> bool:
    """Whether a Tuner's trials (with these methods) need teacher shards."""
    return cfg.resources.placement.mode == "ray" and any(m not in ("pixel", "control", "student") for m in methods)


def trial_resources(cfg: SweepConfig, methods: list[str], n_teachers: int):
    """Placement group of one trial: the driver's bundle + one bundle per teacher shard (when any of
    the Tuner's ``methods`` needs teachers: a Tuner's trials share one resource shape)."""
    from ray.tune import PlacementGroupFactory

    bundles = [{"CPU": max(cfg.resources.trial_cpus, 0.01)}]
    p = cfg.resources.placement
    if _uses_shards(cfg, methods):
        shard = {"CPU": p.cpus_per_shard, **({"GPU": p.gpus_per_shard} if p.gpus_per_shard else {})}
        bundles += [dict(shard) for _ in range(_shard_count(cfg, n_teachers))]
    return PlacementGroupFactory(bundles, strategy="PACK")


# --- one trial --------------------------------------------------------------------------------------
def trial_fn(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: shards → TorchTrainer.fit → downstream evaluation → report the objective."""
    import ray
    import ray.tune
    import torch

    from mike_ray.mike.downstream import DownstreamConfig, evaluate_downstream, norm_iou_mean
    from mike_ray.mike.train import TransferConfig
    from mike_ray.models import build_model
    from mike_ray.models.registry import import_archs
    from mike_ray.orchestrate.transfer import query_shares, run_transfer, teacher_refs
    from mike_ray.teachers.shard import ShardGroup
    from mike_ray.teachers.zoo import read_zoo
    from mike_ray.utils import seed_everything

    import time

    t_start = time.perf_counter()
    cfg = SweepConfig.model_validate(ctx["sweep"])
    tracking = Tracking(**ctx["tracking"])
    params = {k: v for k, v in config.items()}
    method, tdict, subset, teachers = trial_settings(cfg, params)
    tcfg = TransferConfig.model_validate(tdict)
    trial_id = ray.tune.get_context().get_trial_id()
    sweep_dir = Path(ctx["sweep_dir"])
    done = sweep_dir / "trials" / f"{trial_id}.json"
    if done.is_file():
        # finished before the driver died (Tune had not yet saved that): report, do not re-run
        ray.tune.report(_final_metrics(json.loads(done.read_text())))
        return
    zoo = read_zoo(Path(ctx["zoo_dir"]))
    query = [zoo[t].task for t in teachers]  # the query data: the teachers' own tasks (paper §4.1)

    run = _trial_run(tracking, ctx["parent_id"], trial_id, cfg.name, {
        "mike_ray.teacher_subset": subset, "mike_ray.method": method,
        "mike_ray.seed": str(tcfg.seed)})
    run.params({"trial": {k: v for k, v in params.items() if not k.startswith("__")},
                "transfer": tcfg.model_dump(mode="json"), "teachers": ",".join(teachers) or "-",
                "teacher_subset": subset, "downstream": cfg.downstream.model_dump(mode="json")})
    base = {"trial_id": trial_id, "family": "mike", "method": method, "subset": subset, "teachers": teachers,
            "params": {k: v for k, v in params.items() if not k.startswith("__")}, "seed": tcfg.seed,
            "model": tcfg.model, "mlflow_run_id": run.run_id}
    try:
        res = None
        if method == "control":
            # --- control: no transfer at all; the encoder stays as initialised with this seed ---
            seed_everything(tcfg.seed)
            state = build_model(tcfg.model, imports="any").state_dict()
        else:
            # --- transfer: shards in this trial's placement group, workers in Train's own -------
            shards = None
            if tcfg.method == "mike":
                refs = teacher_refs(Path(ctx["zoo_dir"]), teachers, import_archs(cfg.model_dump(mode="json")))
                pg = ray.util.get_current_placement_group()
                auto = cfg.resources.placement.teachers_per_shard == "auto"
                shards = ShardGroup(refs, cfg.resources.placement, placement_group=pg, first_bundle=1,
                                    shares=query_shares(ctx["data_root"], query) if auto else None,
                                    concurrency=cfg.resources.workers.num_workers)
                run.params({"shards": shards.plan.replace("\n", " | ")})
            try:
                res = run_transfer(tcfg, [], ctx["data_root"], query, cfg.resources.placement,
                                   cfg.resources.workers, sweep_dir / "runs", trial_id, shards=shards)
            finally:
                if shards is not None:
                    shards.shutdown()
            for h in res.history:
                run.metrics({k: v for k, v in h.items() if k not in ("epoch",)}, step=int(h["epoch"]))
            run.tags({"mike_ray.checkpoint": res.checkpoint_path})
            state = res.state

        # --- downstream: freeze the encoder, retrain the decoder per task; score val and test -----
        dcfg = DownstreamConfig.model_validate({**cfg.downstream.model_dump(), "seed": tcfg.seed})
        teacher_iou = {rec.task: rec.reference_iou() for rec in zoo.values()}
        down = evaluate_downstream(tcfg.model, state, ctx["data_root"], dcfg, teacher_iou)
        (score, n_val), (test_score, n_test) = norm_iou_mean(down, "val"), norm_iou_mean(down, "test")
        record = {**base, "status": "finished", "score": score, "score_tasks": n_val,
                  "test_score": test_score, "test_tasks": n_test, "downstream": down,
                  "checkpoint": res.checkpoint_path if res else None, "retries": res.retries if res else 0,
                  "transfer_seconds": sum(h.get("time/epoch_seconds", 0.0) for h in res.history) if res else 0.0,
                  "downstream_seconds": max((d.get("seconds", 0.0) for d in down.values()), default=0.0),
                  "trial_seconds": time.perf_counter() - t_start}
        _trial_artifacts(run, sweep_dir, record, res, tcfg, ctx["data_root"], query)
        _finish_trial(run, done, record, _final_metrics(record))
    except BaseException as err:
        _fail_trial(run, sweep_dir, base, err)
        raise


def _finish_trial(run: RunLogger, done: Path, record: dict[str, Any], final: dict[str, float]) -> None:
    """A trial's last steps, in this order: final metrics, MLflow run FINISHED, the trial record
    (its presence means "complete": a resumed sweep skips the trial), then the report to Tune."""
    import ray.tune

    run.metrics({k: v for k, v in final.items() if not (isinstance(v, float) and math.isnan(v))})
    run.client.set_terminated(run.run_id, status="FINISHED")
    write_json_atomic(done, record)
    ray.tune.report(final)


def _fail_trial(run: RunLogger, sweep_dir: Path, base: dict[str, Any], err: BaseException) -> None:
    """A trial that raised: its MLflow run ends FAILED with the one-line reason as a tag, and a
    ``trials/failed/<id>.json`` record keeps it in the sweep's summary. Tune marks the trial ERROR
    with the same message; the sweep goes on with the other trials."""
    from mike_ray.errors import MikeRayError, one_line

    reason = one_line(str(err)) if isinstance(err, MikeRayError) else f"{type(err).__name__}: {one_line(str(err))}"
    try:
        run.tags({"mike_ray.status": "failed", "mike_ray.failure_reason": reason[:5000]})
        run.client.set_terminated(run.run_id, status="FAILED")
        write_json_atomic(sweep_dir / "trials" / "failed" / f"{base['trial_id']}.json",
                          {**base, "status": "failed", "reason": reason})
    except Exception:  # noqa: BLE001 - never hide the trial's own error behind a logging one
        pass


def _final_metrics(record: dict[str, Any]) -> dict[str, float]:
    """What a finished trial reports to Tune (and logs to MLflow): the objective (val), the test
    score the reports use, and per-task IoU on both splits."""
    down = record["downstream"]
    out = {"score/mean_norm_iou": record["score"], "score/test/mean_norm_iou": record.get("test_score", math.nan),
           "score/test/tasks": float(record.get("test_tasks", 0)),
           "score/mean_iou": _nanmean([d["iou"] for d in down.values()]),
           "shard/retries_total": record.get("retries", 0)}
    for t, d in down.items():
        out.update({f"norm_iou/val/{t}": d["norm_iou"], f"iou/val/{t}": d["iou"],
                    f"norm_iou/test/{t}": d.get("test_norm_iou", math.nan), f"iou/test/{t}": d.get("test_iou", math.nan)})
    return out


def _trial_run(tracking: Tracking, parent_id: str, trial_id: str, sweep: str, tags: dict[str, str]) -> RunLogger:
    """The trial's MLflow child run; a resumed trial re-opens its run instead of adding one."""
    import mlflow

    client = mlflow.MlflowClient(tracking.uri)
    exp = tracking.experiment_id()
    found = client.search_runs([exp], filter_string=f"tags.`mike_ray.trial_id` = '{trial_id}' and "
                                                    f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return RunLogger(client, found[0].info.run_id)
    run = client.create_run(exp, run_name=f"trial-{trial_id}", tags={
        "mlflow.parentRunId": parent_id, "mike_ray.trial_id": trial_id, "mike_ray.sweep": sweep,
        "mike_ray.stage": "trial", **tags})
    return RunLogger(client, run.info.run_id)


def _trial_artifacts(run: RunLogger, sweep_dir: Path, record: dict, res, tcfg, data_root, query) -> None:
    """Radar chart on the test split (vs the matched pixel baseline when known), layerwise loss,
    reconstruction grid."""
    import tempfile

    import torch

    from mike_ray.data.loaders import ShardDataset
    from mike_ray.models import build_model
    from mike_ray.report.plots import layerwise_loss, radar_chart, recon_grid

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        series = {f"{record['method']} ({record['subset']})": _test_spokes(record)}
        base = _baseline_record(sweep_dir, record["subset"], record["seed"], record["model"])
        if base is not None and record["method"] == "mike":
            series[f"pixel baseline ({record['subset']})"] = _test_spokes(base)
        run.artifact(radar_chart(series, d / "radar.png", "normalised test IoU per downstream task"), "plots")
        if record["method"] == "mike":
            run.artifact(layerwise_loss(res.history, "loss/val/teacher", d / "layerwise_loss.png",
                                        "layerwise val loss (unweighted)"), "plots")
        if res is not None:
            model = build_model(tcfg.model, imports="any")
            model.load_state_dict(res.state)
            model.eval()
            val = ShardDataset(data_root, "val", query, limit=8)
            x = val.__getitems__(list(range(len(val))))["image"]
            with torch.no_grad():
                xbar = model(x)
            run.artifact(recon_grid(x.numpy(), xbar.numpy(), d / "reconstructions.png"), "plots")
        run.dict_artifact(record, "trial.json")


def _test_spokes(record: dict) -> dict[str, float]:
    return {t: v.get("test_norm_iou", math.nan) for t, v in record["downstream"].items()}


def _baseline_record(sweep_dir: Path, subset: str, seed: int, model: dict) -> dict | None:
    """The pixel baseline of the same subset, seed and autoencoder settings (the matched pair)."""
    for p in sorted((sweep_dir / "trials").glob("*.json")):
        rec = json.loads(p.read_text())
        if rec["method"] == "pixel" and rec["subset"] == subset and rec["seed"] == seed and rec.get("model") == model:
            return rec
    return None


# --- the Tuners ---------------------------------------------------------------------------------------
def _tuner(cfg: SweepConfig, trainable, name: str, storage: Path, tune_config, param_space, resume: bool):
    import ray.tune

    path = storage / name
    if resume and ray.tune.Tuner.can_restore(str(path)):
        # finished trials are kept; interrupted and errored ones run again (re-opening their MLflow run)
        return ray.tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    return ray.tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                          run_config=ray.tune.RunConfig(name=name, storage_path=str(storage),
                                                        failure_config=ray.tune.FailureConfig(max_failures=0),
                                                        verbose=1))


def run_trials(cfg: SweepConfig, data_root: Path, zoo_dir: Path, tracking: Tracking, parent_id: str,
               resume: bool = False) -> list[dict[str, Any]]:
    """Pixel baselines (one per teacher subset and seed), then the Optuna study; returns trial records."""
    import ray.tune
    from ray.tune.search import ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    sweep_dir = cfg.output_dir() / "sweeps" / cfg.name
    if sweep_dir.exists() and not resume:
        # a new run of the same sweep: keep the previous one's files beside it, start clean
        import time

        sweep_dir.rename(sweep_dir.with_name(f"{cfg.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
    storage = sweep_dir / "tune"
    ctx = {"sweep": cfg.resolved(), "tracking": tracking.__dict__, "parent_id": parent_id,
           "sweep_dir": str(sweep_dir)}
    if cfg.family == "mike":
        ctx.update(data_root=str(data_root), zoo_dir=str(zoo_dir))
        fn = trial_fn
    else:
        from mike_ray.orchestrate.mhgd_trial import mhgd_trial_fn

        ctx.update(classification=cfg.classification.resolve(data_root).model_dump(mode="json"),
                   classifier_zoo_dir=str(zoo_dir))
        fn = mhgd_trial_fn
    study = cfg.study
    n_max = max(len(cfg.subset(s)) for s in cfg.teacher_subsets)
    seeds = ray.tune.grid_search(list(range(study.repeats)))

    # --- baselines: MIKE → a pixel autoencoder per searched subset × seed × model setting (matched
    # to the MIKE trials of the same model) and a control (untrained encoder) per seed × model
    # setting; MHGD → the student alone per seed
    base_method = "pixel" if cfg.family == "mike" else "student"
    searched_methods = list(cfg.search.method or [cfg.method])
    model_dims = {name: ray.tune.grid_search(list(dim)) for name in SearchConfig.MODEL_DIMS
                  if (dim := getattr(cfg.search, name, None)) is not None} if cfg.family == "mike" else {}
    if study.baselines and base_method not in searched_methods:
        space: dict[str, Any] = {"method": base_method, "__trial_index__": seeds, **model_dims}
        if cfg.family == "mike":
            space["teacher_subset"] = ray.tune.grid_search(list(cfg.search.teacher_subset or
                                                                [next(iter(cfg.teacher_subsets))]))
        trainable = ray.tune.with_resources(ray.tune.with_parameters(fn, ctx=ctx),
                                            trial_resources(cfg, [base_method], 0))
        tuner = _tuner(cfg, trainable, "baselines", storage,
                       ray.tune.TuneConfig(max_concurrent_trials=study.concurrency), space, resume)
        _check(tuner.fit(), "baselines")
    if cfg.family == "mike" and study.control:
        trainable = ray.tune.with_resources(ray.tune.with_parameters(fn, ctx=ctx),
                                            trial_resources(cfg, ["control"], 0))
        tuner = _tuner(cfg, trainable, "controls", storage,
                       ray.tune.TuneConfig(max_concurrent_trials=study.concurrency),
                       {"method": "control", "__trial_index__": seeds, **model_dims}, resume)
        _check(tuner.fit(), "controls")

    # --- the search: every combination (grid) or an Optuna study -------------------------------------
    trainable = ray.tune.with_resources(ray.tune.with_parameters(fn, ctx=ctx),
                                        trial_resources(cfg, searched_methods, n_max))
    if study.algorithm == "grid":
        space = {name: ray.tune.grid_search(list(dim)) for name, dim in cfg.search if dim is not None}
        space["__trial_index__"] = seeds
        tune_config = ray.tune.TuneConfig(max_concurrent_trials=study.concurrency)
    else:
        searcher = OptunaSearch(space=DefineByRun(cfg), metric=study.objective, mode=study.direction,
                                seed=study.seed)
        if study.repeats > 1:
            searcher = Repeater(searcher, repeat=study.repeats, set_index=True)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=study.concurrency)
        space = {}
        tune_config = ray.tune.TuneConfig(search_alg=searcher, num_samples=study.trials * study.repeats)
    tuner = _tuner(cfg, trainable, "search", storage, tune_config, space, resume)
    _check(tuner.fit(), "search")
    return load_records(sweep_dir)


def _check(grid, what: str) -> None:
    """Errored trials do not stop the sweep; they are listed with their reason."""
    from mike_ray.orchestrate.transfer import _find_cause

    for r in grid:
        if r.error is not None:
            cause = _find_cause(r.error)
            lines = [ln.strip() for ln in str(r.error).splitlines() if ln.strip()]
            why = str(cause) if cause is not None else (lines[-1] if lines else type(r.error).__name__)
            print(f"warning: a {what} trial failed: {why[:300]}")


def load_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished trial's record (written atomically at the end of the trial)."""
    return [json.loads(p.read_text()) for p in sorted((Path(sweep_dir) / "trials").glob("*.json"))]


def load_failed(sweep_dir: Path) -> list[dict[str, Any]]:
    """Records of trials that raised (status "failed", reason), minus those finished by a later resume."""
    done = {p.stem for p in (Path(sweep_dir) / "trials").glob("*.json")}
    return [json.loads(p.read_text()) for p in sorted((Path(sweep_dir) / "trials" / "failed").glob("*.json"))
            if p.stem not in done]
