"""Downstream evaluation (paper §4.2): freeze the encoder, retrain the decoder as a segmenter.

For each task the autoencoder's decoder is retrained (from its trained weights, or re-initialised)
to output the task's mask (one map per class) from the frozen embedding, trained on the task's train split.
It is scored on two held-out splits (by image id): **val**, which selects configurations (the Tune
objective, "best per subset"), and **test**, which the summary table, the radar charts and
docs/results.md report. Each score is IoU and IoU ÷ that task's teacher IoU on the same split
("normalised IoU"). Tasks run in parallel as Ray tasks.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from mike_ray.metrics import IoUMeter, segmentation_loss
from mike_ray.mike.config import DownstreamConfig
from mike_ray.utils import limit_threads, resolve_device, seed_everything


def _embed(encoder: torch.nn.Module, loader, device, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen encoder → (z: N×C×h×w, mask: N×k×H×W, the task's k classes), computed once (the
    encoder never changes)."""
    zs, ms = [], []
    with torch.no_grad():
        for batch in loader:
            zs.append(encoder(batch["image"].to(device)).cpu())
            ms.append(batch["mask"][:, :k])
    if not zs:  # a split without rows for this task (scored NaN, never an error)
        size = loader.dataset.manifest.image_size
        return encoder(torch.zeros(1, 3, size, size, device=device)).cpu()[:0], torch.zeros(0, k, size, size)
    return torch.cat(zs), torch.cat(ms)


def train_downstream(task: str, model_spec: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                     data_root: str | Path, cfg: DownstreamConfig) -> dict[str, Any]:
    """Retrain the decoder on ``task``'s train masks with the encoder frozen; score val and test.

    Returns ``{"task", "iou", "iou_per_class" (val), "test_iou", "test_iou_per_class", "test_rows",
    "seconds"}``; the test values are NaN when the task has no test rows.
    """
    from mike_ray.data.loaders import ShardDataset, make_loader
    from mike_ray.data.shards import read_manifest
    from mike_ray.models import build_model

    limit_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    man = read_manifest(data_root)
    k = len(man.classes(task))  # the task's classes: the decoder's output maps
    gen = seed_everything(cfg.seed + 1000 * man.task_id(task))
    ae = build_model(dict(model_spec), imports="any")  # the sweep's transfer.model
    ae.load_state_dict(dict(state))
    ae.to(device)
    if cfg.reinit_decoder:
        ae.reset_decoder(cfg.seed)
    ae.set_out_channels(k, cfg.seed)  # a task of other than 3 classes: a new output conv
    ae.encoder.eval().requires_grad_(False)

    train_dl = make_loader(ShardDataset(data_root, "train", [task], limit=cfg.max_train_samples, seed=cfg.seed),
                           256, shuffle=False)
    z_train, m_train = _embed(ae.encoder, train_dl, device, k)
    held_out = {split: _embed(ae.encoder, make_loader(ShardDataset(data_root, split, [task]), 256, shuffle=False),
                              device, k) for split in ("val", "test")}

    # the decoder now outputs mask logits instead of an RGB image (same topology, paper §4.2)
    params = [p for p in ae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    n = len(z_train)
    for _ in range(cfg.epochs):
        ae.decoder.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits = ae.decode(z_train[idx].to(device))
            loss = segmentation_loss(logits, m_train[idx].to(device), cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    ae.decoder.eval()
    out: dict[str, Any] = {"task": task}
    for split, (z, m) in held_out.items():
        meter = IoUMeter(k)
        with torch.no_grad():
            for i in range(0, len(z), 256):
                meter.update(ae.decode(z[i:i + 256].to(device)), m[i:i + 256].to(device))
        key = "" if split == "val" else "test_"
        empty = len(z) == 0
        out[f"{key}iou"] = math.nan if empty else meter.mean()
        out[f"{key}iou_per_class"] = [math.nan] * k if empty else meter.per_class()
    out["test_rows"] = len(held_out["test"][0])
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate_downstream(model_spec: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        data_root: str | Path, cfg: DownstreamConfig,
                        teacher_iou: Mapping[str, Mapping[str, float]],
                        scheduling_strategy: Any = None) -> dict[str, dict[str, float]]:
    """Every task of ``cfg`` in parallel as Ray tasks →
    ``{task: {"iou", "teacher_iou", "norm_iou", "test_iou", "teacher_test_iou", "test_norm_iou", ...}}``.

    ``teacher_iou``: task → ``{"val": mIoU, "test": mIoU}`` of the task's teacher. A normalised IoU is
    NaN when the teacher's IoU on that split is unknown or 0, or the split has no rows for the task.
    ``scheduling_strategy``: where the tasks go (a trial driver passes its placement group's,
    :func:`mike_ray.pool.bundle_strategy`); None: Ray's default. Requires ``ray.init``.
    """
    import ray

    state_ref = ray.put({k: v.detach().cpu() for k, v in state.items()})
    remote = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=1,
                        scheduling_strategy=scheduling_strategy)(train_downstream)
    refs = [remote.remote(t, dict(model_spec), state_ref, str(data_root), cfg) for t in cfg.tasks]
    out: dict[str, dict[str, float]] = {}
    for res in ray.get(refs):
        t = res["task"]
        row = {"seconds": res["seconds"], "test_rows": res["test_rows"]}
        for split, key in (("val", ""), ("test", "test_")):
            tiou = float(teacher_iou.get(t, {}).get(split, math.nan))
            iou = res[f"{key}iou"]
            row[f"{key}iou"] = iou
            row[f"teacher_{key}iou"] = tiou
            row[f"{key}norm_iou"] = iou / tiou if tiou and not math.isnan(tiou) else math.nan
        out[t] = row
    return out


def norm_iou_mean(results: Mapping[str, Mapping[str, float]], split: str = "val") -> tuple[float, int]:
    """Mean normalised IoU over the tasks on ``split`` ("val": the sweep objective; "test": reports),
    and how many tasks it averages: a task without a score (NaN) is left out *and counted*, so a
    report can print "k of n tasks" instead of hiding it."""
    key = "norm_iou" if split == "val" else f"{split}_norm_iou"
    vals = [r[key] for r in results.values() if not math.isnan(r.get(key, math.nan))]
    return (sum(vals) / len(vals) if vals else math.nan), len(vals)


def mean_norm_iou(results: Mapping[str, Mapping[str, float]]) -> float:
    """The sweep objective: mean normalised val IoU over the tasks that have one (:func:`norm_iou_mean`)."""
    return norm_iou_mean(results, "val")[0]
