"""The MIKE family: one trial (shards → TorchTrainer → downstream IoU), its baselines, its report.

Ray Train V2 pattern: each Tune trial is a *function* that creates the teacher shards, builds and
fits a TorchTrainer (:func:`mike_ray.orchestrate.transfer.run_transfer`), then runs the downstream
evaluation and reports the objective. The trial reserves its shards' resources in its placement
group, so an autoscaler sees the teachers' demand; trainer workers reserve their own.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from mike_ray.config import SearchConfig, SweepConfig
from mike_ray.mike.config import DownstreamConfig, QueryConfig, TeacherEntry, TransferConfig, query_tasks
from mike_ray.orchestrate.records import (TrialContext, begin_trial, load_records, log_data, log_trained_model,
                                          shown_params)
from mike_ray.tracking import RunLogger, Tracking, system_metrics
from mike_ray.config_base import StrictModel


class MikeSettings(StrictModel):
    """The MIKE slice of a sweep config that a trial needs."""

    transfer: TransferConfig
    downstream: DownstreamConfig
    teachers: dict[str, TeacherEntry] = {}  # the sweep's own teachers, beside the zoo's
    query: QueryConfig = QueryConfig()
    query_root: str | None = None  # a prepared folder/COCO query set (query.source folder/coco)

    def query_tasks(self, teachers: list[str]) -> list[str]:
        """The trial's query tasks (:func:`mike_ray.mike.config.query_tasks`)."""
        return query_tasks(self.query, self.teachers, teachers)


def trial_settings(ctx: TrialContext, params: dict[str, Any]) -> tuple[str, TransferConfig, str, list[str]]:
    """A trial's params → (its method, its TransferConfig, teacher subset name, teacher names).

    The method is "mike", "pixel" (the baseline) or "control" (no transfer: the untrained encoder,
    which needs no teachers and no subset: subset "-")."""
    method = params.get("method", ctx.method)
    t = ctx.settings.transfer.model_dump()
    t["method"] = "pixel" if method == "control" else method
    t["seed"] = ctx.settings.transfer.seed + int(params.get("__trial_index__", 0) or 0)
    if "embed_channels" in params:
        t["model"]["embed_channels"] = int(params["embed_channels"])
    if "lr" in params:
        t["lr"] = float(params["lr"])
    for key in ("schedule", "pretrain_fraction", "num_phases"):
        if key in params:
            t["schedule"]["name" if key == "schedule" else key] = params[key]
    tcfg = TransferConfig.model_validate(t)
    if method == "control":
        return method, tcfg, "-", []
    subset, teachers = ctx.subset(params)
    return method, tcfg, subset, teachers


# --- one trial --------------------------------------------------------------------------------------
def mike_trial_fn(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: shards → TorchTrainer.fit → downstream evaluation → report the objective."""
    import ray

    from mike_ray.data.shards import read_manifest
    from mike_ray.mike.downstream import evaluate_downstream, norm_iou_mean
    from mike_ray.mike.shard import MikeShardPool
    from mike_ray.mike.zoo import read_zoo
    from mike_ray.models import build_model
    from mike_ray.orchestrate.transfer import query_shares, run_transfer, teacher_refs
    from mike_ray.pool import bundle_strategy
    from mike_ray.utils import seed_everything

    t_start = time.perf_counter()
    params = dict(config)
    method, tcfg, subset, teachers = trial_settings(ctx, params)
    zoo = read_zoo(ctx.zoo_dir)
    # the query data: query.tasks, or the teachers' own tasks (paper §4.1), or a folder/COCO query set
    query = ctx.settings.query_tasks(teachers)
    query_root = Path(ctx.settings.query_root) if ctx.settings.query_root else ctx.data_root
    trial = begin_trial(ctx, params, family="mike", method=method, subset=subset, teachers=teachers,
                        seed=tcfg.seed, report=final_metrics, model=tcfg.model)
    if trial is None:  # finished before the driver died: its stored result was re-reported
        return
    trial_id, run = trial.trial_id, trial.run
    run.params({"trial": shown_params(params), "transfer": tcfg.model_dump(mode="json"),
                "teachers": ",".join(teachers) or "-", "teacher_subset": subset, "query_tasks": ",".join(query) or "-",
                "downstream": ctx.settings.downstream.model_dump(mode="json")})
    with trial.failing(), system_metrics(run, ctx.system_metrics):
        # --- what the trial reads, as MLflow dataset inputs (the UI's Dataset column) --------------
        if method != "control":
            log_data(run, query_root, "train", query, "query/train")
            log_data(run, query_root, "val", query, "query/validation")
        log_data(run, ctx.data_root, "train", ctx.settings.downstream.tasks, "downstream/train")
        log_data(run, ctx.data_root, "test", ctx.settings.downstream.tasks, "downstream/test")
        res = None
        if method == "control":
            # --- control: no transfer at all; the encoder stays as initialised with this seed ---
            seed_everything(tcfg.seed)
            state = build_model(tcfg.model, imports="any").state_dict()
        else:
            # --- transfer: shards in this trial's placement group, workers in Train's own -------
            shards = None
            if tcfg.method == "mike":
                refs = teacher_refs(ctx.zoo_dir, teachers, ctx.import_archs, ctx.settings.teachers,
                                    read_manifest(ctx.data_root).table)
                auto = ctx.placement.teachers_per_shard == "auto"
                shards = MikeShardPool(refs, ctx.placement, placement_group=ray.util.get_current_placement_group(),
                                    first_bundle=1, shares=query_shares(ctx.data_root, query) if auto and query else None,
                                    concurrency=ctx.workers.num_workers)
                run.params({"shards": shards.plan.replace("\n", " | ")})
            try:
                res = run_transfer(tcfg, [], query_root, query, ctx.placement, ctx.workers,
                                   ctx.sweep_dir / "runs", trial_id, shards=shards, report_epochs=ctx.report_epochs)
            finally:
                if shards is not None:
                    shards.shutdown()
            for h in res.history:
                run.metrics({k: v for k, v in h.items() if k not in ("epoch",)}, step=int(h["epoch"]))
            run.tags({"mike_ray.checkpoint": res.checkpoint_path})
            state = res.state

        # --- downstream: freeze the encoder, retrain the decoder per task; score val and test -----
        dcfg = ctx.settings.downstream.model_copy(update={"seed": tcfg.seed})
        teacher_iou = {rec.task: rec.reference_iou() for rec in zoo.values()}
        down = evaluate_downstream(tcfg.model, state, ctx.data_root, dcfg, teacher_iou,
                                   bundle_strategy(dcfg.cpus_per_task, dcfg.gpus_per_task))
        (score, n_val), (test_score, n_test) = norm_iou_mean(down, "val"), norm_iou_mean(down, "test")
        record = {**trial.base, "status": "finished", "score": score, "score_tasks": n_val,
                  "test_score": test_score, "test_tasks": n_test, "downstream": down,
                  "checkpoint": res.checkpoint_path if res else None, "retries": res.retries if res else 0,
                  "transfer_seconds": sum(h.get("time/epoch_seconds", 0.0) for h in res.history) if res else 0.0,
                  "downstream_seconds": max((d.get("seconds", 0.0) for d in down.values()), default=0.0),
                  "trial_seconds": time.perf_counter() - t_start}
        _trial_artifacts(run, ctx, record, res, tcfg, query_root, query)
        # --- the encoder as an MLflow model, its final metrics linked to it ------------------------
        model_id = log_trained_model(run, tcfg.model, state, read_manifest(ctx.data_root).image_size, "encoder")
        trial.finish(record, final_metrics(record), model_id)


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def final_metrics(record: dict[str, Any]) -> dict[str, float]:
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


def _trial_artifacts(run: RunLogger, ctx: TrialContext, record: dict, res, tcfg: TransferConfig,
                     query_root: Path, query: list[str]) -> None:
    """Radar chart on the test split (vs the matched pixel baseline when known), layerwise loss,
    reconstruction grid."""
    import tempfile

    import torch

    from mike_ray.data.query import open_query
    from mike_ray.models import build_model
    from mike_ray.report.plots import layerwise_loss, radar_chart, recon_grid

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        series = {f"{record['method']} ({record['subset']})": _test_spokes(record)}
        base = _baseline_record(ctx.sweep_dir, record["subset"], record["seed"], record["model"])
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
            val = open_query(query_root, "val", query, limit=8)
            x = val.__getitems__(list(range(len(val))))["image"]
            with torch.no_grad():
                xbar = model(x)
            run.artifact(recon_grid(x.numpy(), xbar.numpy(), d / "reconstructions.png"), "plots")
        run.dict_artifact(record, "trial.json")


def _test_spokes(record: dict) -> dict[str, float]:
    return {t: v.get("test_norm_iou", math.nan) for t, v in record["downstream"].items()}


def _baseline_record(sweep_dir: Path, subset: str, seed: int, model: dict) -> dict | None:
    """The pixel baseline of the same subset, seed and autoencoder settings (the matched pair)."""
    for rec in load_records(sweep_dir):
        if rec["method"] == "pixel" and rec["subset"] == subset and rec["seed"] == seed and rec.get("model") == model:
            return rec
    return None


def list_teachers(cfg: SweepConfig, sweep_file: str | Path) -> list:
    """Every MIKE teacher the sweep's subsets name, as ``--dry-run`` lists them: a ``teachers:``
    entry is built, its weights loaded and one dummy query batch run through it (a misfit is a
    one-line error naming the sweep file, the teacher and the field); a zoo teacher is described by
    the zoo's model spec (it may not be trained yet)."""
    from mike_ray.errors import ModelError

    if cfg.family != "mike" or cfg.method == "pixel":
        return []
    from mike_ray.mike.teachers import check_teachers, describe_zoo_teacher

    named = list(dict.fromkeys(t for s in cfg.teacher_subsets for t in cfg.subset(s)))
    try:
        own = {t.name: t for t in check_teachers({n: cfg.teachers[n] for n in named if n in cfg.teachers},
                                                 cfg.data.prepare.image_size)}
    except ModelError as err:
        raise ModelError(f"{sweep_file}: {err}") from None
    zoo = {n: describe_zoo_teacher(n, {**cfg.zoo.model, "num_classes": len(cfg.task_table[n])}, cfg.zoo.taps, "zoo")
           for n in named if n not in cfg.teachers}
    return [own.get(n) or zoo[n] for n in named]


# --- the family: what the sweep driver and the Tuner ask of MIKE ------------------------------------
class MikeFamily:
    """MIKE (autoencoder + downstream IoU): see :class:`mike_ray.orchestrate.family.Family`."""

    name = "mike"
    baseline = "pixel"
    teacherless = frozenset({"pixel", "control"})
    trial_fn = staticmethod(mike_trial_fn)

    def stages(self, cfg: SweepConfig, out: Path, tracking: Tracking, parent_id: str) -> tuple[Path, Path]:
        from mike_ray.orchestrate.stages import ensure_data, ensure_query, ensure_zoo

        data_root = ensure_data(cfg.data, out)
        ensure_query(cfg.query, cfg.data.prepare.image_size, out)  # a folder/COCO query set, if any
        return data_root, ensure_zoo(cfg.zoo, data_root, out, tracking, parent_id)

    def settings(self, cfg: SweepConfig, data_root: Path | None) -> MikeSettings:
        from mike_ray.orchestrate.stages import ensure_query

        query_root = ensure_query(cfg.query, cfg.data.prepare.image_size, cfg.output_dir())
        return MikeSettings(transfer=cfg.transfer, downstream=cfg.downstream, teachers=cfg.teachers, query=cfg.query,
                            query_root=str(query_root) if query_root else None)

    def extra_studies(self, cfg: SweepConfig, seeds: Any) -> list[tuple[str, list[str], dict[str, Any]]]:
        """Pixel baselines per searched subset × seed × model setting (matched to the MIKE trials of
        the same model) and a control (untrained encoder) per seed × model setting."""
        import ray.tune

        model_dims = {name: ray.tune.grid_search(list(dim)) for name in SearchConfig.MODEL_DIMS
                      if (dim := getattr(cfg.search, name, None)) is not None}
        out = []
        if cfg.study.baselines and "pixel" not in (cfg.search.method or [cfg.method]):
            subsets = list(cfg.search.teacher_subset or [next(iter(cfg.teacher_subsets))])
            out.append(("baselines", ["pixel"], {"method": "pixel", "__trial_index__": seeds, **model_dims,
                                                 "teacher_subset": ray.tune.grid_search(subsets)}))
        if cfg.study.control:
            out.append(("controls", ["control"], {"method": "control", "__trial_index__": seeds, **model_dims}))
        return out

    def teacher_table(self, zoo_dir: Path) -> dict[str, dict[str, float]]:
        from mike_ray.mike.zoo import read_zoo

        return {name: {"val_miou": rec.val_miou, "test_miou": rec.test_miou, "untrained_miou": rec.untrained_miou,
                       "chance_miou": rec.chance_miou} for name, rec in read_zoo(zoo_dir).items()}

    def plan_lines(self, cfg: SweepConfig) -> list[str]:
        s = cfg.study
        models = math.prod(len(getattr(cfg.search, n) or [None]) for n in SearchConfig.MODEL_DIMS)
        lines = []
        if s.baselines and "pixel" not in (cfg.search.method or [cfg.method]):
            subsets = cfg.search.teacher_subset or [next(iter(cfg.teacher_subsets))]
            lines.append(f"  + {len(subsets) * s.repeats * models} pixel baseline(s): one per searched teacher "
                         f"subset, seed and autoencoder setting ({', '.join(SearchConfig.MODEL_DIMS)})")
        if s.control:
            lines.append(f"  + {s.repeats * models} control(s): an untrained frozen encoder per seed and "
                         f"autoencoder setting")
        if cfg.method == "mike" and cfg.resources.placement.teachers_per_shard == "auto":
            lines += _shard_plan(cfg)
        return lines

    def report_lines(self, summary: Any) -> list[str]:
        from mike_ray.report.tables import trial_table

        lines = []
        if summary.teachers:
            lines.append("  teachers (val mIoU | test mIoU | untrained | chance):")
            for name, t in summary.teachers.items():
                weak = any(not m > t["chance_miou"] for m in (t["val_miou"], t["test_miou"]))
                lines.append(f"    {name:4s} {t['val_miou']:.3f} | {t['test_miou']:.3f} | {t['untrained_miou']:.3f} "
                             f"| {t['chance_miou']:.3f}" + ("   not above chance: its task is not normalised (—)"
                                                             if weak else ""))
        if summary.trials:
            lines.append(trial_table(summary.trials))
        return lines

    def log_summary(self, client: Any, parent_id: str, summary: Any) -> None:
        """The trial table and the combined radar chart (paper fig. 4) on the parent run."""
        import tempfile

        from mike_ray.report.plots import radar_chart
        from mike_ray.report.tables import best_per_subset, summarize, to_json, trial_table, verdict

        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "trials.txt").write_text(trial_table(summary.trials) + "\n")
            (d / "trials.json").write_text(to_json(summary.trials))
            client.log_artifact(parent_id, str(d / "trials.txt"))
            client.log_artifact(parent_id, str(d / "trials.json"))
            series = {}
            for subset, rows in best_per_subset(summary.trials).items():
                if "best" in rows:
                    series[f"MIKE {subset}"] = rows["best"]["per_task"]
                if "baseline" in rows:
                    series[f"pixel {subset}"] = rows["baseline"]["per_task"]
            if series:
                client.log_artifact(parent_id, str(radar_chart(series, d / "radar_best_per_subset.png",
                                                               "best encoder per teacher subset (on val) vs its "
                                                               "pixel baseline: normalised test IoU")), "plots")
        rows = summarize(summary.trials)
        mike = [r for r in rows if r["method"] == "mike" and r["mean"] == r["mean"]]
        if mike:  # the configuration chosen on val, and its test score
            best = max(mike, key=lambda r: r["mean"])
            client.log_metric(parent_id, "score/best_mean_norm_iou", best["mean"])
            if best["test_mean"] == best["test_mean"]:
                client.log_metric(parent_id, "score/test/best_mean_norm_iou", best["test_mean"])
        client.set_tag(parent_id, "mike_ray.verdict", verdict(rows)[:5000])


def _shard_plan(cfg: SweepConfig) -> list[str]:
    """``teachers_per_shard: auto``: each searched subset's shards, balanced by expected work (the
    zoo's model FLOPs × its task's share; shares are taken as equal here — the trial balances on the
    prepared data's actual counts and logs its plan as the ``shards`` parameter)."""
    from mike_ray.pool import describe_plan, forward_flops, partition

    p = cfg.resources.placement
    lines = [f"  shards (teachers_per_shard: auto, num_shards {p.num_shards}; expected work = forward "
             f"FLOPs × task share, shares assumed equal):"]
    from mike_ray.mike.teachers import entry_flops

    flops: dict[str, float] = {}
    for name in cfg.search.teacher_subset or [next(iter(cfg.teacher_subsets))]:
        teachers = cfg.subset(name)
        tasks = cfg.query_tasks(teachers)
        work = []
        for t in teachers:
            if t not in flops:  # the sweep's own specs
                flops[t] = entry_flops(t, cfg.teachers[t]) if t in cfg.teachers else \
                    forward_flops({**cfg.zoo.model, "num_classes": len(cfg.task_table[t])}, imports="any")
            own = cfg.teachers[t].task if t in cfg.teachers else t
            work.append(flops[t] * (1.0 if own is None or not cfg.transfer.masking else 1.0 / len(tasks)))
        plan = describe_plan(partition(teachers, "auto", work, p.num_shards), work, teachers)
        lines += [f"    {name}: " + plan.replace("\n", " | ")]
    return lines
