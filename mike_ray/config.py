"""The sweep file: YAML → validated pydantic models, before anything starts.

A sweep file declares the data source, the teacher zoo, the method, fixed settings, the search
space, the Optuna study, resources and the MLflow destination (DESIGN.md "Sweeps"). Unknown keys
and wrong types are :class:`~mike_ray.errors.ConfigError` naming the field path; every section has
full defaults, so a sweep file is a small diff on top of them (DINOv2-style).
"""
from __future__ import annotations

import contextlib
import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mike_ray.config_base import StrictModel, deep_merge, load_yaml, validate
from mike_ray.data.sources import ClassificationData
from mike_ray.data.coco import PrepareConfig
from mike_ray.data.tasks import check_task_table, resolve_table, table_defaults, table_field
from mike_ray.errors import ConfigError
from mike_ray.mike.config import DownstreamConfig, QueryConfig, TeacherEntry, TransferConfig, ZooConfig, query_tasks
from mike_ray.mhgd.config import METHODS as MHGD_METHODS
from mike_ray.mhgd.config import ClassifierZooConfig, MHGDConfig
from mike_ray.resources import PlacementConfig, WorkersConfig


class GenerateConfig(StrictModel):
    """The embedded default: a COCO-format dataset mike_ray draws itself."""

    images: int = Field(1000, ge=10)
    seed: int = Field(0, ge=0)


class DataConfig(StrictModel):
    """Where the COCO-format source is, and how it is cut into task crops."""

    source: Literal["generated", "coco"] = "generated"
    coco_root: str | None = None  # required for source "coco": annotations/instances_<split>.json + images
    splits: list[str] | None = None
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)

    @model_validator(mode="after")
    def _coco_root(self) -> "DataConfig":
        if self.source == "coco":
            if not self.coco_root:
                raise ValueError("data.coco_root is required when data.source is 'coco'")
            ann = Path(self.coco_root) / "annotations"
            if not ann.is_dir():
                raise ValueError(f"data.coco_root: {ann} not found (expected annotations/instances_<split>.json)")
        return self


MIKE_METHODS: tuple[str, ...] = ("mike", "pixel")
"""MIKE-family methods: an autoencoder trained on teacher activations (or on pixels, the baseline)."""
MhgdMethod = Literal["student", "soft_logits", "fsp", "ab", "kdsvd", "mhgd"]


class ClassificationSource(StrictModel):
    """MHGD's classification data: the embedded crops (default) or a published dataset in a local folder."""

    source: Literal["crops", "cifar100", "tiny_imagenet"] = "crops"
    root: str | None = None  # crops: default = the prepared data of ``data``; others: required
    image_size: int | None = Field(32, ge=8)  # crops are prepared at 64; CIFAR-sized by default
    tasks: list[str] | None = None
    limit_train: int | None = Field(None, ge=1)
    limit_val: int | None = Field(None, ge=1)
    augment: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _root(self) -> "ClassificationSource":
        if self.source != "crops":
            if not self.root:
                raise ValueError(f"classification.root is required for source '{self.source}' (nothing is downloaded)")
            if not Path(self.root).is_dir():
                raise ValueError(f"classification.root: {self.root} not found")
        if self.tasks is not None and self.source != "crops":
            raise ValueError(f"classification.tasks: only the 'crops' source has tasks, not {self.source!r}")
        return self

    def resolve(self, prepared_root: str | Path | None) -> ClassificationData:
        """The :class:`ClassificationData` to read (crops default to the sweep's prepared data)."""
        root = self.root or (str(prepared_root) if prepared_root is not None else None)
        if root is None:
            raise ConfigError("classification.root: no prepared crops to default to")
        return ClassificationData(**{**self.model_dump(), "root": root})


class Range(StrictModel):
    """A numeric search range (Optuna suggest_float/suggest_int)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    int: bool = False

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self


Choice = list[Any]


class SearchConfig(StrictModel):
    """Search dimensions. A list is a categorical choice, a mapping a numeric range; unset → fixed."""

    teacher_subset: list[str] | None = None  # names from ``teacher_subsets``
    embed_channels: list[int] | Range | None = None
    schedule: list[Literal["uniform", "last_layer", "layerwise_progressive", "adaptive"]] | None = None
    pretrain_fraction: list[float] | Range | None = None
    num_phases: list[int] | None = None  # layerwise_progressive only (define-by-run)
    lr: list[float] | Range | None = None  # transfer.lr (MIKE) or mhgd.lr (MHGD)
    # MHGD family
    method: list[MhgdMethod] | None = None  # table 1: the methods side by side
    num_heads: list[int] | Range | None = None  # table 4: 1, 2, 4, 8, 16
    phase1_epochs: list[int] | Range | None = None

    MIKE_ONLY: ClassVar[tuple[str, ...]] = ("embed_channels", "schedule", "pretrain_fraction", "num_phases")
    # searched settings that change the autoencoder itself: every baseline and control is run for
    # each of their values, so a MIKE encoder is compared with one of the same size
    MODEL_DIMS: ClassVar[tuple[str, ...]] = ("embed_channels",)
    MHGD_ONLY: ClassVar[tuple[str, ...]] = ("method", "num_heads", "phase1_epochs")

    @field_validator("embed_channels")
    @classmethod
    def _embed(cls, v):
        vals = v if isinstance(v, list) else ([v.low, v.high] if v is not None else [])
        for c in vals:
            if not (1 <= c <= 64) or int(c) != c:
                raise ValueError(f"embedding channels must be integers in 1..64, got {c}")
        if isinstance(v, list) and not v:
            raise ValueError("empty choice list")
        return v

    @field_validator("teacher_subset", "schedule", "pretrain_fraction", "num_phases", "lr", "method", "num_heads",
                     "phase1_epochs")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty choice list")
        return v


class SchedulerConfig(StrictModel):
    """Early stopping of search trials that are clearly behind (Tune's ASHA, on per-epoch metrics).

    Each trial reports ``metric`` after every epoch (default: the transfer's ``loss/val/teacher``,
    teacher loss on the val query split, lower is better); at epochs ``grace_period``,
    ``grace_period·reduction_factor``, … a trial below the top ``1/reduction_factor`` of the trials
    that reached that epoch is stopped. Its run is kept, marked ``stopped early``, without a score.
    Baselines and controls are never stopped.
    """

    name: Literal["asha"] = "asha"
    metric: str | None = None  # default: loss/val/teacher (min); MIKE sweeps only for now
    mode: Literal["min", "max"] | None = None  # required with a metric of your own
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class StudyConfig(StrictModel):
    """The Optuna study run by Tune."""

    objective: str = "score/mean_norm_iou"  # MHGD sweeps: "acc/best" unless set
    direction: Literal["max", "min"] = "max"
    trials: int = Field(4, ge=1)
    concurrency: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, lt=2**32 - 1000)  # Optuna's sampler takes 0 ≤ seed < 2³²; trials add their index
    repeats: int = Field(1, ge=1)  # seeds per configuration; summaries give mean ± std
    # MIKE: a pixel-MSE autoencoder per subset × seed × searched model setting (matched to the MIKE
    # trials of the same model); MHGD: the student alone per seed
    baselines: bool = True
    # MIKE: a control per seed × searched model setting — the same downstream evaluation on a frozen
    # *untrained* encoder, the floor that tells a working transfer from a broken one
    control: bool = True
    # "optuna": Tune + OptunaSearch, ``trials`` samples; "grid": every combination of the search's
    # choice lists (× repeats), e.g. the paper's tables (every method, every head count)
    algorithm: Literal["optuna", "grid"] = "optuna"
    # stop search trials that are clearly behind after a few epochs (none: every trial runs to the end)
    scheduler: SchedulerConfig | None = None


class ResourcesConfig(StrictModel):
    """Where work runs: teacher shards, trainer workers, the trial driver, downstream tasks."""

    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    trial_cpus: float = Field(0.0, ge=0)  # the trial driver only waits on others
    trial_on_head: bool = True  # else Train's controller (and its detached coordinator) can pin a GPU node
    ray_address: str | None = None  # None: $RAY_ADDRESS or a new local instance
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a new local instance


class MlflowConfig(StrictModel):
    """MLflow destination (default: a sqlite store under ``output``)."""

    tracking_uri: str | None = None
    experiment: str = "mike_ray"
    # CPU, GPU and memory of each trial's machine as system/... metrics (MLflow's monitor, every 10 s)
    system_metrics: bool = False

    #: tracking-store schemes MLflow serves (a plain path is a local file store)
    SCHEMES: ClassVar[tuple[str, ...]] = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql",
                                          "databricks", "databricks-uc")

    @field_validator("tracking_uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be empty (leave it out for the store under output)")
        scheme = v.split(":", 1)[0].split("+", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", v) else ""
        if scheme and scheme not in cls.SCHEMES:
            close = difflib.get_close_matches(scheme, cls.SCHEMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"scheme '{scheme}' is not an MLflow tracking store{hint}; use one of "
                             f"{', '.join(cls.SCHEMES)} or a path")
        return v


class SweepConfig(StrictModel):
    """A whole sweep file."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    output: str = "outputs"
    # MIKE: the task table, task code → COCO category names (≥ 1 per task; ids in this order); the
    # default of every task list below and the prepared data's table. None: the paper's 11 tasks.
    tasks: dict[str, list[str]] | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    zoo: ZooConfig = Field(default_factory=ZooConfig)
    method: Literal["mike", "pixel", "student", "soft_logits", "fsp", "ab", "kdsvd", "mhgd"] = "mike"
    # MIKE: networks trained elsewhere, by name, beside the zoo's (which are named by their task code)
    teachers: dict[str, TeacherEntry] = Field(default_factory=dict)
    query: QueryConfig = Field(default_factory=QueryConfig)
    teacher_subsets: dict[str, list[str] | Literal["all"]] = Field(default_factory=lambda: {"all": "all"})
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    # MHGD family (method student … mhgd): classification data, classifier teachers, the student's run
    classification: ClassificationSource = Field(default_factory=ClassificationSource)
    classifier_zoo: ClassifierZooConfig = Field(default_factory=ClassifierZooConfig)
    mhgd: MHGDConfig = Field(default_factory=MHGDConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    # named diffs on top of this file (e.g. "smoke": the same sweep, tiny); applied by --profile
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def model_validate(cls, obj: Any, *, strict: bool | None = None, from_attributes: bool | None = None,
                       context: Any | None = None, **kwargs: Any) -> "SweepConfig":
        """Validate a sweep; task codes anywhere in it are checked against its ``tasks:`` table (passed
        to every nested validator as the validation context, :func:`mike_ray.data.tasks.table_of`)."""
        if context is None and isinstance(obj, dict) and obj.get("tasks") is not None:
            with contextlib.suppress(ConfigError):  # a bad table: its field validator reports it, with its path
                context = {"tasks": check_task_table(obj["tasks"])}
        return super().model_validate(obj, strict=strict, from_attributes=from_attributes, context=context,
                                      **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _task_table_defaults(cls, data: Any) -> Any:
        return table_defaults(data)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        return table_field(v, "tasks")

    @property
    def task_table(self) -> dict[str, tuple[str, ...]]:
        """The sweep's task table (code → class names, id order): ``tasks:``, or the paper's 11."""
        return resolve_table(self.tasks)

    @field_validator("teacher_subsets")
    @classmethod
    def _subsets(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("at least one teacher subset is required")
        for name, teachers in v.items():
            if teachers != "all" and not teachers:
                raise ValueError(f"subset '{name}' is empty")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if set(v) <= {"."}:
            raise ValueError(f"'{v}' would name a folder outside the sweep's output; use letters or digits")
        return v

    def _check_models(self) -> None:
        """Build every model the sweep will build (untrained, once, on the CPU: milliseconds), so an
        unknown arch or option is a one-line error here, not inside a Ray worker."""
        from mike_ray.errors import ModelError
        from mike_ray.models import build_model

        if self.family == "mike":
            specs = [("zoo.model", {**self.zoo.model, "num_classes": 3})]
            dims = self.search.embed_channels if isinstance(self.search.embed_channels, list) else [None]
            specs += [("transfer.model", {**self.transfer.model, **({"embed_channels": int(c)} if c else {})})
                      for c in dims]
            specs += [(f"teachers.{name}.model", entry.model) for name, entry in self.teachers.items()]
        else:
            specs = [(f"classifier_zoo.teachers.{k}", v) for k, v in self.classifier_zoo.teachers.items()]
            specs.append(("mhgd.student", self.mhgd.student))
        for where, spec in specs:
            try:
                build_model(spec, name=where, imports="any")  # the sweep file being run names them
            except ModelError as err:
                raise ValueError(str(err).replace(f"model '{where}': ", f"{where}: ", 1)) from None

    @property
    def family(self) -> str:
        """"mike" (autoencoder + downstream IoU) or "mhgd" (classifier student + accuracy)."""
        return "mike" if self.method in MIKE_METHODS else "mhgd"

    @model_validator(mode="after")
    def _cross(self) -> "SweepConfig":
        self._check_scheduler()
        if self.family == "mhgd":
            if self.tasks is not None:
                raise ValueError(f"tasks: a task table is for MIKE sweeps; method '{self.method}' classifies the "
                                 f"crops of the paper's 33 classes (leave tasks: out)")
            self._check_mhgd()
            self._check_models()
            return self
        for name in SearchConfig.MHGD_ONLY:
            if getattr(self.search, name) is not None:
                raise ValueError(f"search.{name}: only for MHGD-family methods ({', '.join(MHGD_METHODS)}), "
                                 f"not method '{self.method}'")
        self._check_own_teachers()
        self._check_table_on_generated_data()
        for name, teachers in self.teacher_subsets.items():
            bad = [t for t in self.subset(name) if t not in self.task_table and t not in self.teachers]
            if bad:
                raise ValueError(f"teacher_subsets.{name}: unknown teacher '{bad[0]}' (known: "
                                 f"{', '.join([*self.teachers, *self.task_table])})")
        self._check_grid()
        if self.study.baselines or self.study.control:
            for name in SearchConfig.MODEL_DIMS:
                if isinstance(getattr(self.search, name), Range):
                    raise ValueError(f"search.{name}: baselines and controls are matched to each searched model "
                                     f"value, so give a list of choices (or set study.baselines and "
                                     f"study.control to false)")
        zoo = set(self.zoo.tasks)
        for name, teachers in self.teacher_subsets.items():
            missing = [t for t in self.subset(name) if t not in zoo and t not in self.teachers]
            if missing:
                raise ValueError(f"teacher_subsets.{name}: teacher '{missing[0]}' is not in zoo.tasks")
            prepared = set(self.data.prepare.tasks)
            unprepared = [t for t in self.subset(name) if t not in self.teachers and t not in prepared]
            if unprepared:
                raise ValueError(f"teacher_subsets.{name}: task '{unprepared[0]}' is not in data.prepare.tasks")
            self._check_query(name)
        for name in self.search.teacher_subset or []:
            if name not in self.teacher_subsets:
                raise ValueError(f"search.teacher_subset: '{name}' is not a key of teacher_subsets")
        missing = [t for t in self.downstream.tasks if t not in self.data.prepare.tasks]
        if missing:
            raise ValueError(f"downstream.tasks: '{missing[0]}' is not in data.prepare.tasks")
        self._check_search_values()
        self._check_models()
        return self

    def _check_table_on_generated_data(self) -> None:
        """A ``tasks:`` table on the generated data names categories it draws (a COCO source's files
        are checked when the data is prepared)."""
        from mike_ray.data.synth import check_drawn

        if self.tasks is not None and self.data.source == "generated":
            check_drawn(self.tasks)

    def _check_own_teachers(self) -> None:
        """``teachers:`` entries: names that make metric paths, no clash with a zoo teacher's task
        code, and tasks the prepared data has (the weights are checked by ``check_teachers``)."""
        for name, entry in self.teachers.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) <= {"."}:
                raise ValueError(f"teachers.{name}: a teacher's name is part of metric paths: use letters, digits, "
                                 f"'_', '-', '.'")
            if name in self.task_table:
                raise ValueError(f"teachers.{name}: '{name}' names the zoo's teacher of task {name}; choose "
                                 f"another name")
            if entry.task is not None and entry.task not in self.data.prepare.tasks:
                raise ValueError(f"teachers.{name}.task: '{entry.task}' is not in data.prepare.tasks")
        for t in self.query.tasks or []:
            if t not in self.data.prepare.tasks:
                raise ValueError(f"query.tasks: '{t}' is not in data.prepare.tasks")

    def query_tasks(self, teachers: list[str]) -> list[str]:
        """The query tasks of a trial with these teachers (:func:`mike_ray.mike.config.query_tasks`)."""
        return query_tasks(self.query, self.teachers, teachers)

    def _check_query(self, subset: str) -> None:
        teachers = self.subset(subset)
        if not self.query.labelled():  # a folder or COCO query set: rows without a task
            if self.transfer.masking:
                for t in teachers:
                    task = self.teachers[t].task if t in self.teachers else t
                    if task is not None:
                        where = f"teachers.{t}.task" if t in self.teachers else f"teacher_subsets.{subset}"
                        raise ValueError(f"{where}: teacher '{t}' is masked to task '{task}', but a "
                                         f"{self.query.source} query set carries no task labels, so it would "
                                         f"never score a row: leave its task out or set transfer.masking: false")
            return
        query = self.query_tasks(teachers)
        if not query:
            raise ValueError(f"query.tasks: required: no teacher of subset '{subset}' has a task to draw the "
                             f"query set from")
        if self.transfer.masking:
            for t in teachers:
                task = self.teachers[t].task if t in self.teachers else t
                if task is not None and task not in query:
                    where = f"teachers.{t}.task" if t in self.teachers else f"teacher_subsets.{subset}"
                    raise ValueError(f"{where}: task '{task}' is not in query.tasks, so teacher '{t}' would never "
                                     f"score a row under transfer.masking")

    def _check_scheduler(self) -> None:
        """``study.scheduler``: MIKE only; a per-epoch metric the transfer reports, and one that is
        comparable between the trials it ranks."""
        sched = self.study.scheduler
        if sched is None:
            return
        if self.family != "mike":
            raise ValueError("study.scheduler: MIKE sweeps only for now (an MHGD trial's per-epoch reports "
                             "include its phase-1 epochs, so its methods are not on one time axis)")
        if sched.metric is None:
            sched = sched.model_copy(update={"metric": "loss/val/teacher", "mode": sched.mode or "min"})
        elif sched.mode is None:
            raise ValueError(f"study.scheduler.mode: required with metric {sched.metric!r} (min or max)")
        if not sched.metric.startswith("loss/"):
            raise ValueError(f"study.scheduler.metric: {sched.metric!r} is not reported every epoch; use a "
                             f"transfer loss (loss/val/teacher, loss/val/pixel_mse, loss/train/total, …)")
        subsets = self.search.teacher_subset or []
        parts = sched.metric.split("/")
        if ("teacher" in parts or parts[-1] == "total") and len(subsets) > 1:
            raise ValueError(f"study.scheduler.metric: {sched.metric} sums other teachers in each of the searched "
                             f"teacher subsets ({', '.join(subsets)}), so its values do not rank them; search "
                             f"one subset or use loss/val/pixel_mse")
        self.study.scheduler = sched

    def _check_grid(self) -> None:
        if self.study.algorithm != "grid":
            return
        for name, dim in self.search:
            if isinstance(dim, Range):
                raise ValueError(f"search.{name}: study.algorithm 'grid' needs a list of choices, not a range")

    def _check_mhgd(self) -> None:
        """MHGD sweeps: subsets name classifier teachers; only MHGD search dimensions; one worker."""
        for name in ("teachers", "query"):
            if name in self.model_fields_set:
                raise ValueError(f"{name}: only for MIKE sweeps (MHGD's teachers are classifier_zoo.teachers)")
        for name in SearchConfig.MIKE_ONLY:
            if getattr(self.search, name) is not None:
                raise ValueError(f"search.{name}: only for MIKE sweeps (method 'mike'), not method '{self.method}'")
        for key in ("method", "teacher", "teacher_epochs"):
            if key in self.mhgd.model_fields_set:
                where = {"method": "the top-level 'method' (or search.method)",
                         "teacher": "classifier_zoo.teachers", "teacher_epochs": "classifier_zoo.train.epochs"}[key]
                raise ValueError(f"mhgd.{key}: set {where} instead")
        known = list(self.classifier_zoo.teachers)
        for name in self.teacher_subsets:
            bad = [t for t in self.subset(name) if t not in known]
            if bad:
                raise ValueError(f"teacher_subsets.{name}: '{bad[0]}' is not in classifier_zoo.teachers "
                                 f"(has: {', '.join(known)})")
        for name in self.search.teacher_subset or []:
            if name not in self.teacher_subsets:
                raise ValueError(f"search.teacher_subset: '{name}' is not a key of teacher_subsets")
        if self.resources.workers.num_workers != 1:
            raise ValueError("resources.workers.num_workers: MHGD trains on one worker (its graphs relate the "
                             "samples of one batch)")
        if "objective" not in self.study.model_fields_set:
            self.study.objective = "acc/best"
        self._check_grid()
        # every value a search dimension can take must make a valid MHGD run
        base = self.mhgd.model_dump()
        base["method"] = self.method
        for name in ("method", "lr", "num_heads", "phase1_epochs"):
            dim = getattr(self.search, name)
            if dim is None:
                continue
            for v in ([dim.low, dim.high] if isinstance(dim, Range) else dim):
                try:
                    MHGDConfig.model_validate({**base, name: int(v) if name in ("num_heads", "phase1_epochs") else v})
                except ValidationError as err:
                    why = err.errors()[0].get("msg", "invalid value")
                    raise ValueError(f"search.{name}: {v!r} is not a valid mhgd.{name} ({why})") from None

    def resolved(self) -> dict[str, Any]:
        """The resolved config as JSON-able data (what runs log, and what a trial re-validates):
        ``mhgd.method/teacher/teacher_epochs`` are left out, they come from elsewhere in the file."""
        return self.model_dump(mode="json", exclude={"mhgd": {"method", "teacher", "teacher_epochs"}})

    def mhgd_run(self, params: dict[str, Any] | None = None) -> MHGDConfig:
        """The :class:`MHGDConfig` of one trial: ``mhgd`` + method + a trial's searched values."""
        params = params or {}
        d = self.mhgd.model_dump()
        d["method"] = params.get("method", self.method)
        for key in ("lr", "num_heads", "phase1_epochs"):
            if key in params:
                d[key] = params[key]
        return MHGDConfig.model_validate(d)

    def _check_search_values(self) -> None:
        """Every value a search dimension can take (each choice; a range's ends) must be valid for
        the transfer field it sets, so a bad one fails here rather than in a trial."""
        targets = {"lr": ("lr",), "pretrain_fraction": ("schedule", "pretrain_fraction"),
                   "num_phases": ("schedule", "num_phases")}
        for name, keys in targets.items():
            dim = getattr(self.search, name)
            if dim is None:
                continue
            for v in ([dim.low, dim.high] if isinstance(dim, Range) else dim):
                t = self.transfer.model_dump()
                node = t
                for k in keys[:-1]:
                    node = node[k]
                node[keys[-1]] = v
                try:
                    TransferConfig.model_validate(t)
                except ValidationError as err:
                    why = err.errors()[0].get("msg", "invalid value")
                    raise ValueError(f"search.{name}: {v!r} is not a valid transfer.{'.'.join(keys)} "
                                     f"({why})") from None

    def subset(self, name: str) -> list[str]:
        """Teacher names of a subset. "all": every ``teachers:`` entry when there are any (the zoo
        then only provides the downstream reference), else every zoo teacher."""
        t = self.teacher_subsets[name]
        if t == "all":
            if self.family != "mike":
                return list(self.classifier_zoo.teachers)
            return list(self.teachers) if self.teachers else list(self.zoo.tasks)
        return list(t)

    def output_dir(self) -> Path:
        return Path(self.output).resolve()


def load_sweep(path: str | Path, overrides: list[str] | None = None, profile: str | None = None) -> SweepConfig:
    """Load and validate a sweep file.

    ``profile`` merges ``profiles.<name>`` from the same file; ``overrides`` are
    ``dotted.key=yaml_value`` strings applied last.
    """
    import yaml

    from mike_ray.config_base import check_yaml_shape

    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (got {type(raw).__name__})")
    if profile is not None:
        profiles = raw.get("profiles") or {}
        if not isinstance(profiles, dict):
            raise ConfigError(f"{path}: profiles: must be a mapping of profile name → settings ("
                              f"got {type(profiles).__name__})")
        if profile not in profiles:
            raise ConfigError(f"{path}: profiles: no profile '{profile}' (has: {', '.join(profiles) or 'none'})")
        if not isinstance(profiles[profile], dict):
            raise ConfigError(f"{path}: profiles.{profile}: must be a mapping")
        raw = deep_merge(raw, profiles[profile])
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a mapping")
        try:
            node[parts[-1]] = check_yaml_shape(yaml.safe_load(value), f"--set {key}")
        except yaml.YAMLError as err:
            why = getattr(err, "problem", None) or err
            raise ConfigError(f"--set {key}: invalid YAML value {value!r}: {why}") from None
        except RecursionError:
            raise ConfigError(f"--set {key}: nested too deeply") from None
    check_yaml_shape(raw, f"{path} with --set")
    return validate(SweepConfig, raw, source=str(path))
