"""MikeShard: frozen teachers in their own process, returning loss and ∂loss/∂x̄.

Teachers are frozen, so ∂L/∂θ_AE = (∂L/∂x̄)·(∂x̄/∂θ_AE): a shard needs only x, x̄ and the batch's
task ids, returns the loss and the gradient with respect to x̄, and the student finishes
backpropagation locally (DESIGN.md "A MIKE step"). Shards never see the student.

A shard holding several teachers runs each on its own rows and accumulates their gradients. Teachers
of one architecture are stacked (:mod:`mike_ray.models.stacked`): those with as many rows in a batch
run as one grouped forward of at most B rows, the others one after another, so the graph alive at a
time is never larger than one full-batch teacher's: a shard's memory does not grow with its teacher
count, and 100 one-row teachers cost one launch instead of 100. The same :class:`MikeShard` class
runs in-process (``placement.mode = "local"``) for debugging and for the exactness test, or as a Ray
actor per shard (``"ray"``).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from mike_ray.errors import ModelError, TrainingError, one_line
from mike_ray.mike.loss import per_sample_term, teacher_loss
from mike_ray.models.stacked import StackedModels, signature
from mike_ray.pool import ShardPool, describe_plan, forward_flops, partition, start_shard_actors
from mike_ray.resources import PlacementConfig
from mike_ray.utils import limit_threads, resolve_device


@dataclass(frozen=True)
class TeacherRef:
    """How a shard finds one teacher, and its task for masking: a stored zoo teacher (``path``, its
    folder) or a ``teachers:`` entry of the sweep file (``entry``, its resolved fields as plain data;
    ``path`` is then its weights file).

    ``task_id`` is the index of the teacher's task (query masking keeps only those samples);
    ``None`` turns masking off for this teacher: it scores every row.
    """

    name: str
    path: str
    task_id: int | None = None
    taps: tuple[str, ...] | None = None  # None: the taps stored with the teacher
    # import-path archs the running sweep file names: the only ones the stored record may use
    imports: tuple[str, ...] = ()
    entry: Mapping[str, object] | None = None  # a teachers: entry (TeacherEntry as JSON data)


@dataclass
class ShardOutput:
    """One shard's answer for one step.

    loss: this shard's part of the step loss, Σ_n share_n · Σ_l w_l^n · term (float; mike/loss.py).
    terms: measurements over each teacher's own samples: ``{"<teacher>/<tap>": unweighted tap term
        (masked mean)}`` and ``{"<teacher>": Σ_l w_l · term}``; a teacher that did no work has none.
    grad: ∂loss/∂x̄, same shape/dtype as x̄ (B×3×H×W), on the shard's device (CPU for a Ray actor).
    counts: rows of each weighted teacher's task in the batch (0: the teacher did no work).
    """

    loss: float
    terms: dict[str, float]
    grad: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)  # samples of each teacher's task in the batch
    seconds: float = 0.0


class MikeShard:
    """One or more frozen teachers on one device.

    Args:
        teachers: the teachers this shard serves.
        device: "auto" | "cpu" | "cuda[:i]".
        threads: torch intra-op threads for this process (Ray's OMP default follows the actor's CPU
            count); None leaves the process setting alone (in-process shards).
        bf16: run teacher forwards under bf16 autocast on the shard's device (the loss stays float32).
        dtype: parameter dtype of the teachers (float64 for exactness tests).
        host_outputs: return the gradient on the CPU (a Ray actor's answer crosses processes); an
            in-process shard keeps it on its device, so a local GPU step makes no host round trip.
        group_rows: teachers of one architecture with at most this many rows in a batch run as one
            grouped forward (``PlacementConfig.group_rows``; 0: never).
    """

    def __init__(self, teachers: Sequence[TeacherRef], device: str = "auto", threads: int | None = 1,
                 bf16: bool = False, dtype: torch.dtype = torch.float32, host_outputs: bool = False,
                 group_rows: int = 4) -> None:
        from mike_ray.models.taps import TappedModel
        from mike_ray.mike.teachers import load_entry
        from mike_ray.mike.zoo import load_teacher

        limit_threads(threads)
        self.device = resolve_device(device)
        self.bf16 = bool(bf16)  # autocast to bf16 on the shard's device (CUDA, or CPU for tests)
        self.dtype = dtype
        self.host_outputs = host_outputs
        self.group_rows = group_rows
        self.teachers: dict[str, tuple[TeacherRef, torch.nn.Module]] = {}
        specs: dict[str, str] = {}
        for ref in teachers:
            if ref.entry is not None:  # your own teacher: input mapping → model → output, tapped
                tapped = load_entry(ref.name, ref.entry, self.device, ref.imports).to(dtype)
                # the weights (file, key, prefix) and task do not change the forward
                specs[ref.name] = repr(sorted((k, v) for k, v in ref.entry.items()
                                              if k not in ("weights", "weights_key", "strip_prefix", "task")))
                self.teachers[ref.name] = (ref, tapped)
                continue
            model, rec = load_teacher(Path(ref.path), self.device, ref.imports)
            # the seed only initialises: two teachers differing in it alone run the same forward
            specs[ref.name] = repr(sorted((k, v) for k, v in rec.model.items() if k != "seed"))
            taps = list(ref.taps) if ref.taps else list(rec.taps)
            tapped = TappedModel(model.to(dtype), taps).eval().requires_grad_(False)
            self.teachers[ref.name] = (ref, tapped)
        self._taps = {name: list(t.paths) for name, (_, t) in self.teachers.items()}
        # teachers of one architecture (same modules, tensors and taps) are stacked, so that a step
        # runs the ones with rows in the batch as one grouped forward instead of one each
        self._stacks: dict[str, tuple[StackedModels, int]] = {}  # teacher → (its stack, its index there)
        by_sig: dict[tuple, list[str]] = {}
        for name, (_, tapped) in self.teachers.items():
            key = (specs[name], signature(tapped), tuple(self._taps[name]))
            by_sig.setdefault(key, []).append(name)
        for names in by_sig.values():
            if len(names) > 1:
                stack = StackedModels([self.teachers[n][1] for n in names])
                if _stack_runs_its_members(stack, [self.teachers[n][1] for n in names], dtype, self.device):
                    self._stacks.update({n: (stack, i) for i, n in enumerate(names)})

    def taps(self) -> dict[str, list[str]]:
        """Teacher name → its ordered tap paths."""
        return self._taps

    def step(self, x: torch.Tensor, xbar: torch.Tensor, task_ids: torch.Tensor,
             weights: Mapping[str, Mapping[str, float]], masking: bool = True,
             need_grad: bool = True) -> ShardOutput:
        """Loss of this shard's teachers and its gradient w.r.t. x̄ (zeros when ``need_grad`` is False).

        Args:
            x: B×3×H×W originals. xbar: B×3×H×W reconstructions (values, no graph needed).
            task_ids: B int64, the task of each sample (for query masking).
            weights: teacher → tap → w (teachers or taps missing or 0 are skipped).
            masking: each teacher scores only its own task's samples (paper §4.1).

        Under masking a teacher runs on its own rows only (``x[idx]``, ``x̄[idx]``) and its gradient
        is scattered back into those rows; a teacher with no rows in the batch does no work. Teachers
        are in eval mode (no batch statistics), so this equals the full-batch computation, and rows
        of other tasks (even NaN ones) never reach a teacher's loss or gradient. The loss follows the
        share rule of :mod:`mike_ray.mike.loss`: ``Σ_n (#rows_n / B) · Σ_l w_l^n · masked mean``.

        A teacher's forwards stop after its deepest tap with a nonzero weight (the tap contract's
        early exit), so a layerwise schedule's early phases cost only the layers up to their tap.

        Under ``bf16`` the teacher forwards run in bf16 autocast; the tap terms and their gradient are
        computed in float32 on the float activations (the squared tanh difference of nearly equal
        activations is what bf16 rounds away). Values are read back once per step, not per teacher.
        """
        t0 = time.perf_counter()
        x = x.to(self.device, self.dtype)
        xbar = xbar.to(self.device, self.dtype)
        batch = int(x.shape[0])
        grad = torch.zeros_like(xbar)
        # rows per task on the host (task ids come from the loader there): no device sync for them
        rows = {t: i.to(self.device, non_blocking=True) for t, i in _rows_per_task(task_ids.cpu()).items()} \
            if masking else {}
        out: dict[str, list[tuple[str, torch.Tensor]]] = {}  # teacher → its (key, value) terms, read back once
        counts: dict[str, int] = {}
        run = _Step(x, xbar, grad, batch, need_grad, self.bf16,
                    torch.float32 if self.dtype in (torch.float16, torch.bfloat16) or self.bf16 else self.dtype)

        # --- which teachers work, on which rows, up to which tap -----------------------------------
        jobs: dict[tuple, list[tuple[str, torch.Tensor | None, dict[str, float]]]] = {}
        for name, (ref, tapped) in self.teachers.items():
            w = {tap: float(weights.get(name, {}).get(tap, 0.0)) for tap in self._taps[name]}
            if not any(w.values()):
                continue  # e.g. pixel pretraining, or a teacher outside this phase: no forward at all
            idx = rows.get(ref.task_id) if masking and ref.task_id is not None else None
            if masking and ref.task_id is not None and idx is None:
                counts[name] = 0  # none of its task's samples in this batch: nothing to compute
                continue
            n = batch if idx is None else int(idx.shape[0])
            counts[name] = n
            # teachers of one stack with as many rows and the same weighted taps run as one group
            stack = self._stacks.get(name, (None, 0))[0] if n <= self.group_rows else None
            key = (id(stack), n, tuple(v != 0.0 for v in w.values())) if stack is not None else (name,)
            jobs.setdefault(key, []).append((name, idx, w))

        # --- run them: a group as one grouped forward (≤ one batch of rows), the rest one by one ----
        for group in jobs.values():
            size = max(1, batch // counts[group[0][0]])  # a group's graph holds ≤ B rows, like one teacher's
            for start in range(0, len(group), size):
                chunk = group[start:start + size]
                if len(chunk) == 1:
                    name, idx, w = chunk[0]
                    out[name] = run.one(name, self.teachers[name][1], idx, w)
                else:
                    out.update(self._group(run, chunk))

        # the one host sync of a step: every term and the gradient's finiteness, read back together
        keys = [k for name in self.teachers if name in out for k, _ in out[name]]
        values = [v for name in self.teachers if name in out for _, v in out[name]]
        if values:
            values.append(torch.isfinite(grad).all().to(values[0].dtype))
        read = torch.stack([v.to(torch.float64) for v in values]).tolist() if values else []
        grad_finite = bool(read.pop()) if read else True
        terms = dict(zip(keys, read))
        for name, value in terms.items():
            if not math.isfinite(value):
                raise TrainingError(f"teacher '{name}': non-finite loss {value}")
        if need_grad and not grad_finite:
            raise TrainingError(f"teacher shard ({', '.join(self.teachers)}): non-finite gradient w.r.t. x̄")
        total = math.fsum(terms[n] * counts[n] / batch for n in counts if counts[n] and n in terms)
        return ShardOutput(total, terms, grad.cpu() if self.host_outputs else grad, counts,
                           time.perf_counter() - t0)

    def _group(self, run: _Step, chunk: list[tuple[str, torch.Tensor, dict[str, float]]]
               ) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """A chunk of one stack's teachers as one grouped forward; a model that vmap cannot run
        (data-dependent control flow, an op without a batching rule) is run one teacher at a time from
        then on — the same values, only slower."""
        stack = self._stacks[chunk[0][0]][0]
        try:
            return run.group(stack, [self._stacks[name][1] for name, _, _ in chunk], chunk)
        except RuntimeError as err:
            warnings.warn(f"teachers {', '.join(n for n, _, _ in chunk)}: cannot run as one grouped forward "
                          f"({one_line(str(err))[:200]}); running them one at a time")
            for name in [n for n, (s, _) in list(self._stacks.items()) if s is stack]:
                self._stacks.pop(name, None)  # a concurrent step (another DDP worker) may do the same
            return {name: run.one(name, self.teachers[name][1], idx, w) for name, idx, w in chunk}

    def peak_rss_mb(self) -> float:
        """Peak resident memory of this process (MB), for the memory benchmark."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def ping(self) -> bool:
        return True


@dataclass
class _Step:
    """One step's inputs and gradient accumulator, shared by the two ways a shard runs teachers:
    one teacher at a time (:meth:`one`) and a group of stacked teachers as one forward (:meth:`group`).
    Both return a teacher's ``(key, value)`` terms as tensors, so the step reads them back once."""

    x: torch.Tensor
    xbar: torch.Tensor
    grad: torch.Tensor
    batch: int
    need_grad: bool
    bf16: bool
    loss_dtype: torch.dtype

    def one(self, name: str, tapped: torch.nn.Module, idx: torch.Tensor | None,
            w: dict[str, float]) -> list[tuple[str, torch.Tensor]]:
        """Teacher ``name`` on rows ``idx`` (None: the whole batch) with tap weights ``w``."""
        xs = self.x if idx is None else self.x.index_select(0, idx)
        xb = (self.xbar if idx is None else self.xbar.index_select(0, idx)).detach().requires_grad_(self.need_grad)
        n = int(xs.shape[0])
        # early exit: the forward stops at the deepest tap that carries weight (exact)
        upto = next(tap for tap in reversed(list(w)) if w[tap])
        with torch.autocast(self.x.device.type, torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():  # activations of x need no graph
                feats_x = tapped(xs, upto=upto)
            with torch.set_grad_enabled(self.need_grad):
                feats_xb = tapped(xb, upto=upto)
        with torch.set_grad_enabled(self.need_grad):
            feats_x = {k: v.to(self.loss_dtype) for k, v in feats_x.items()}
            feats_xb = {k: v.to(self.loss_dtype) for k, v in feats_xb.items()}
            mask = torch.ones(n, dtype=torch.bool, device=self.x.device)
            loss, tap_terms = teacher_loss(feats_x, feats_xb, w, mask, share=n / self.batch)
        if self.need_grad and loss.requires_grad:
            # frees this teacher's graph before the next teacher runs
            (g,) = torch.autograd.grad(loss, xb)
            if idx is None:
                self.grad += g.to(self.grad.dtype)
            else:
                self.grad.index_add_(0, idx, g.to(self.grad.dtype))
        # the teacher's weighted loss over its own samples (no share), then its unweighted tap terms
        return [(name, loss.detach() * (self.batch / n))] + \
            [(f"{name}/{tap}", term.unweighted) for tap, term in tap_terms.items()]

    def group(self, stack: StackedModels, sel: list[int],
              chunk: list[tuple[str, torch.Tensor, dict[str, float]]]) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """Teachers ``chunk`` — ``(name, rows, tap weights)``, as many rows each and the same weighted
        taps — as one grouped forward of ``stack`` (its members ``sel``): G×n rows at once. The same
        sums as :meth:`one` per teacher (``mike/loss.py``: masked mean of the per-sample mean squared
        tanh difference, weighted, × the teacher's share n/B), and its gradient scattered likewise."""
        g_count, n = len(chunk), int(chunk[0][1].shape[0])
        rows = torch.cat([idx for _, idx, _ in chunk])  # G·n, teacher-major
        shape = (g_count, n, *self.x.shape[1:])
        xs = self.x.index_select(0, rows).reshape(shape)
        xb = self.xbar.index_select(0, rows).reshape(shape).detach().requires_grad_(self.need_grad)
        weighted = [tap for tap, v in chunk[0][2].items() if v]
        wt = torch.tensor([[w[tap] for tap in weighted] for _, _, w in chunk], dtype=self.loss_dtype,
                          device=self.x.device)  # G×L
        members = stack.select(torch.tensor(sel, device=self.x.device))  # their weights, gathered once
        with torch.autocast(self.x.device.type, torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():
                feats_x = stack.forward(members, xs, upto=weighted[-1])
            with torch.set_grad_enabled(self.need_grad):
                feats_xb = stack.forward(members, xb, upto=weighted[-1])
        with torch.set_grad_enabled(self.need_grad):
            # each tap's per-sample term over the G·n rows (mike/loss.py), then each teacher's mean: G×L
            term = torch.stack([per_sample_term(feats_x[tap].flatten(0, 1).to(self.loss_dtype),
                                                feats_xb[tap].flatten(0, 1).to(self.loss_dtype)
                                                ).reshape(g_count, n).mean(dim=1) for tap in weighted], dim=1)
            per_teacher = (term * wt).sum(dim=1)  # G: Σ_l w_l · term
            loss = (per_teacher * (n / self.batch)).sum()
        if self.need_grad and loss.requires_grad:
            (g,) = torch.autograd.grad(loss, xb)
            self.grad.index_add_(0, rows, g.reshape(-1, *self.x.shape[1:]).to(self.grad.dtype))
        term, per_teacher = term.detach(), per_teacher.detach()
        return {name: [(name, per_teacher[i])] + [(f"{name}/{tap}", term[i, j]) for j, tap in enumerate(weighted)]
                for i, (name, _, _) in enumerate(chunk)}


def _stack_runs_its_members(stack: StackedModels, members: list[torch.nn.Module], dtype: torch.dtype,
                            device: torch.device, size: int = 64) -> bool:
    """Whether the grouped forward gives a member other than the template its own values, on one
    random image: a model whose traced graph reads a parameter directly (a ViT's class token, a
    ConvNeXt's layer scale) keeps the template's there, and a model vmap cannot run raises. Either
    way its teachers run one at a time (warned), never with another teacher's weights."""
    k = len(members) - 1
    x = torch.rand(1, 1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        with torch.no_grad():
            got = stack.forward(stack.select(torch.tensor([k], device=device)), x)
            want = members[k](x[0])
        ok = all(torch.allclose(got[t][0], want[t], rtol=1e-4, atol=1e-6) for t in want)
    except Exception as err:  # noqa: BLE001 - any failure means: do not group these teachers
        warnings.warn(f"teachers of one architecture cannot run as one grouped forward "
                      f"({one_line(str(err))[:200]}); running them one at a time")
        return False
    if not ok:
        warnings.warn("teachers of one architecture give other values as one grouped forward (a parameter "
                      "read outside its module); running them one at a time")
    return ok


def _rows_per_task(task_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Task id → the (sorted) row indices of that task in the batch; absent tasks are not keys.

    One stable sort and one bincount read back (a single host sync), instead of a mask and a count
    per teacher."""
    if task_ids.numel() == 0:
        return {}
    if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be a 1-D integer tensor, got {task_ids.dtype} {tuple(task_ids.shape)}")
    order = torch.argsort(task_ids, stable=True)
    ids, counts = torch.unique_consecutive(task_ids[order], return_counts=True)
    out, start = {}, 0
    for t, c in zip(ids.tolist(), counts.tolist()):
        out[int(t)] = order[start:start + c]
        start += c
    return out


def expected_work(teachers: Sequence[TeacherRef], shares: Mapping[int, float] | None = None) -> list[float]:
    """Each teacher's expected work per step under masking: its task's share of the query rows
    (``shares``: task id → fraction; missing or None → equal shares over the teachers' tasks) × its
    forward FLOPs per sample (from its stored model spec). A teacher without a task (unmasked) sees
    every row: share 1."""
    from mike_ray.mike.teachers import entry_flops
    from mike_ray.mike.zoo import read_teacher

    tasks = {t.task_id for t in teachers if t.task_id is not None}
    if not shares:
        shares = {t: 1.0 / len(tasks) for t in tasks} if tasks else {}
    flops: dict[str, float] = {}
    out = []
    for t in teachers:
        spec = dict(t.entry) if t.entry is not None else read_teacher(Path(t.path)).model
        key = repr(sorted(spec.items()))
        if key not in flops:
            flops[key] = entry_flops(t.name, spec, imports=t.imports) if t.entry is not None else \
                forward_flops(spec, imports=t.imports)
        out.append((1.0 if t.task_id is None else float(shares.get(t.task_id, 0.0))) * flops[key])
    return out


@dataclass
class StepResult:
    """Summed answer of all shards: loss, terms, ∂loss/∂x̄; ``retries`` counts re-sent shard calls."""

    loss: float
    terms: dict[str, float]
    grad: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    shard_seconds: list[float] = field(default_factory=list)


class MikeShardPool(ShardPool):
    """All shards of one run, local or as Ray actors; :meth:`step` fans out and sums gradients.

    Actor handles are serialisable: a trial driver creates the group once and every trainer worker
    calls the same shards (teachers are not duplicated per worker).
    """

    def __init__(self, teachers: Sequence[TeacherRef], placement: PlacementConfig,
                 dtype: torch.dtype = torch.float32, placement_group: object | None = None,
                 first_bundle: int = 0, shares: Mapping[int, float] | None = None,
                 concurrency: int = 1) -> None:
        """``placement_group``: a Ray placement group whose bundles ``first_bundle``, +1, … hold the
        shards (a Tune trial reserves them, so the autoscaler sees the teachers' demand).
        ``shares``: task id → its fraction of the query rows, for ``teachers_per_shard: auto``
        (default: equal). ``concurrency``: how many callers (DDP workers) a shard actor serves at
        once — each call runs in its own thread of the actor, so one worker's step does not wait
        for another's."""
        if not teachers:
            raise ModelError("teachers: at least one teacher is required")
        self.placement = placement
        self.dtype = dtype
        self.work = expected_work(teachers, shares) if placement.teachers_per_shard == "auto" else None
        self.groups = partition(teachers, placement.teachers_per_shard, self.work, placement.num_shards)
        self.plan = describe_plan(self.groups, self.work, [t.name for t in teachers])
        self.retries = 0
        if placement.mode == "local":
            # in-process: the caller's thread setting stays as it is
            self.shards = [MikeShard(g, placement.device, None, placement.bf16, dtype, False, placement.group_rows)
                           for g in self.groups]
            self._taps = {k: v for s in self.shards for k, v in s.taps().items()}
        else:
            import ray

            self.shards = start_shard_actors(MikeShard, [(g, placement.device, placement.threads, placement.bf16,
                                                             dtype, True, placement.group_rows) for g in self.groups],
                                             placement, placement_group, first_bundle, concurrency)
            # not waited for here: the actors load their teachers while the caller starts its trainer
            # (a trial's shards and its Train workers start side by side); the first taps() waits
            self._taps = None

    def taps(self) -> dict[str, list[str]]:
        """Teacher name → ordered tap paths, over all shards (the first call waits until every
        shard actor has loaded its teachers; a shard that cannot start raises here)."""
        if self._taps is None:
            import ray

            taps: dict[str, list[str]] = {}
            for t in ray.get([s.taps.remote() for s in self.shards]):
                taps.update(t)
            self._taps = taps
        return dict(self._taps)

    def step(self, x: torch.Tensor, xbar: torch.Tensor, task_ids: torch.Tensor,
             weights: Mapping[str, Mapping[str, float]], masking: bool = True,
             need_grad: bool = True) -> StepResult:
        """Every shard's loss and gradient for this batch, summed. Shards run in parallel (Ray)."""
        xbar = xbar.detach()
        outs = self.call("step", x, xbar, task_ids, weights, masking, need_grad)
        grad = outs[0].grad.to(xbar.dtype)
        for o in outs[1:]:
            grad = grad + o.grad.to(xbar.dtype)
        terms: dict[str, float] = {}
        counts: dict[str, int] = {}
        for o in outs:
            terms.update(o.terms)
            counts.update(o.counts)
        return StepResult(sum(o.loss for o in outs), terms, grad.to(xbar.device), counts, self.retries,
                          [o.seconds for o in outs])


