"""Your own teachers: torchvision networks mike_ray did not write, loaded from state-dict files.

Three heterogeneous teachers — ``lraspp_mobilenet_v3_large`` and ``deeplabv3_mobilenet_v3_large``
(dict outputs) and a ``resnet18`` classifier, all ImageNet-normalised, the classifier also resized —
with weights saved from randomly initialised models (BatchNorm statistics perturbed, so the eval-mode
forward is not the identity a fresh BN would be). The shard's ∂loss/∂x̄ must equal plain autograd
through the normalisation and the models, in float64. Every misfit of a ``teachers:`` entry is a
one-line error naming the teacher and the field, before Ray starts.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mike_ray.data.tasks import TASK_CODES
from mike_ray.errors import ModelError
from mike_ray.mike.config import IMAGENET_MEAN, IMAGENET_STD, TeacherEntry
from mike_ray.mike.shard import MikeShardPool
from mike_ray.mike.teachers import check_teachers
from mike_ray.models import build_model
from mike_ray.models.taps import TappedModel
from mike_ray.orchestrate.transfer import teacher_refs
from mike_ray.resources import PlacementConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "bring_your_own.yaml"

# name → (spec, taps, output, task, resize, how the file stores the state dict)
TEACHERS = {
    "lraspp": ({"arch": "lraspp_mobilenet_v3_large", "num_classes": 4}, ["backbone.2", "backbone.4", "output"], "out",
               "PHB", None, {"weights_key": "state_dict", "strip_prefix": "module."}),
    "deeplab": ({"arch": "deeplabv3_mobilenet_v3_large", "num_classes": 4}, ["backbone.3", "classifier.0"], "out",
                "DCH", None, {}),
    "resnet": ({"arch": "resnet18", "num_classes": 7}, ["layer1", "layer3", "fc"], None, None, 80,
               {"weights_key": "model"}),
}


def _random_state(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised model's state dict, its BatchNorm running statistics perturbed."""
    model = build_model({**spec, "seed": seed})
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> tuple[dict[str, TeacherEntry], dict[str, dict]]:
    """The three teachers' entries and their plain state dicts (for the reference computation)."""
    d = tmp_path_factory.mktemp("own_teachers")
    entries, states = {}, {}
    for i, (name, (spec, taps, output, task, size, layout)) in enumerate(TEACHERS.items()):
        state = states[name] = _random_state(spec, i)
        stored = {layout.get("strip_prefix", "") + k: v for k, v in state.items()}
        torch.save({layout["weights_key"]: stored} if "weights_key" in layout else stored, d / f"{name}.pt")
        entries[name] = TeacherEntry(model=spec, weights=str(d / f"{name}.pt"), taps=taps, output=output, task=task,
                                     input={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": size}, **layout)
    return entries, states


def _reference_loss(states: dict, x: torch.Tensor, xbar: torch.Tensor, task_ids: torch.Tensor,
                    weights: dict[str, dict[str, float]]) -> torch.Tensor:
    """Eq. 1 over the batch written out plainly: each model built and loaded here (no TeacherNet),
    the resize and ImageNet normalisation as explicit ops, taps by forward hooks, outputs by key."""
    total = torch.zeros((), dtype=xbar.dtype)
    mean = torch.tensor(IMAGENET_MEAN, dtype=xbar.dtype).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=xbar.dtype).reshape(1, 3, 1, 1)
    for name, (spec, taps, output, task, size, _) in TEACHERS.items():
        model = build_model(spec).double().eval()
        model.load_state_dict(states[name])
        module_taps = [t for t in taps if t != "output"]
        tapped = TappedModel(model, module_taps, method="hooks").eval()

        def feats(img: torch.Tensor) -> dict[str, torch.Tensor]:
            if size is not None:
                img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
            img = (img - mean) / std
            out = dict(tapped(img))
            if "output" in taps:
                out["output"] = model(img)[output]
            return out

        fx, fxb = feats(x), feats(xbar)
        own = (task_ids == TASK_CODES.index(task)).to(xbar.dtype) if task else torch.ones(len(x), dtype=xbar.dtype)
        for tap, w in weights[name].items():
            per_sample = (torch.tanh(fx[tap].detach()) - torch.tanh(fxb[tap])).pow(2).flatten(1).mean(1)
            total = total + w * (per_sample * own).sum() / len(x)
    return total


@pytest.mark.parametrize("mode", ["local", pytest.param("ray", marks=pytest.mark.ray_session)])
def test_heterogeneous_teachers_give_the_exact_gradient_through_their_input_mapping(own, mode, request) -> None:
    """The shard step (each masked teacher on its own rows, the classifier on every row, normalisation
    and resize inside autograd) equals plain autograd of eq. 1, loss and ∂/∂x̄, in float64."""
    entries, states = own
    if mode == "ray":
        request.getfixturevalue("ray_local")
    refs = teacher_refs(Path("/nonexistent-zoo"), list(entries), entries=entries)
    assert [r.task_id for r in refs] == [TASK_CODES.index("PHB"), TASK_CODES.index("DCH"), None]
    placement = PlacementConfig(mode=mode, teachers_per_shard=2, cpus_per_shard=0.5, device="cpu")
    pool = MikeShardPool(refs, placement, dtype=torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(6, 3, 64, 64, generator=g, dtype=torch.float64)
        xbar = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        task_ids = torch.tensor([TASK_CODES.index(t) for t in ["PHB", "DCH", "CTB", "PHB", "DCH", "CTB"]])
        taps = pool.taps()
        assert taps == {n: TEACHERS[n][1] for n in TEACHERS}  # the user's own paths, "output" included
        weights = {n: {t: 0.5 + 0.25 * k for k, t in enumerate(ts)} for n, ts in taps.items()}

        res = pool.step(x, xbar, task_ids, weights, masking=True)

        leaf = xbar.clone().requires_grad_(True)
        expected = _reference_loss(states, x, leaf, task_ids, weights)
        (grad,) = torch.autograd.grad(expected, leaf)
        assert res.counts == {"lraspp": 2, "deeplab": 2, "resnet": 6}  # the classifier has no task: every row
        assert abs(res.loss - expected.item()) <= 1e-10 * abs(expected.item())
        assert float(grad.abs().max()) > 0  # not vacuous
        err = float((res.grad - grad).abs().max() / grad.abs().max())
        assert err < 1e-10, err
        # rows of CTB reach only the classifier: its gradient is the only one there
        assert float(res.grad[[2, 5]].abs().max()) > 0
        assert all(res.terms[f"{n}/{t}"] > 0 for n, ts in taps.items() for t in ts)
    finally:
        pool.shutdown()


# --- misfits: one line, the teacher and the field ----------------------------------------------------
def _entry(own, name: str, **change) -> dict[str, TeacherEntry]:
    entries, _ = own
    return {name: entries[name].model_copy(update=change)}


def _write(tmp_path: Path, obj, name: str = "w.pt") -> str:
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("case, field, says", [
    ("missing_file", "weights", "weights file not found"),
    ("not_a_state_dict", "weights", "not a state dict"),
    ("wrong_key", "weights_key", "'weights' is not a key"),
    ("no_key_given", "weights", "set weights_key to one of: state_dict"),
    ("prefix_not_stripped", "weights", "set strip_prefix: 'module.'"),
    ("wrong_prefix", "strip_prefix", "no key of"),
    ("wrong_shape", "weights", "has shape"),
    ("unknown_tap", "taps", "unknown tap 'backbone.99'"),
    ("wrong_output_key", "output", "'logits' is not an output of the model (keys: 'out')"),
    ("dict_output_tapped", "output", "the model returns a OrderedDict: name the one to tap"),
    ("input_channels", "input", "cannot take the query images"),
    ("too_small_after_resize", "input", "cannot take the query images (3×64×64, resized to 8×8)"),
])
def test_a_teacher_that_does_not_fit_is_one_line_naming_it_and_the_field(own, tmp_path, case, field, says) -> None:
    entries, states = own
    lr = states["lraspp"]
    change = {
        "missing_file": ("lraspp", {"weights": str(tmp_path / "none.pt")}),
        "not_a_state_dict": ("deeplab", {"weights": _write(tmp_path, [torch.zeros(1)])}),
        "wrong_key": ("lraspp", {"weights_key": "weights"}),
        "no_key_given": ("lraspp", {"weights_key": None}),
        "prefix_not_stripped": ("lraspp", {"strip_prefix": None}),
        "wrong_prefix": ("lraspp", {"strip_prefix": "model."}),
        "wrong_shape": ("lraspp", {"model": {"arch": "lraspp_mobilenet_v3_large", "num_classes": 5}}),
        "unknown_tap": ("lraspp", {"taps": ["backbone.99"]}),
        "wrong_output_key": ("lraspp", {"output": "logits"}),
        "dict_output_tapped": ("lraspp", {"output": None}),
        "input_channels": ("gray", {}),
        "too_small_after_resize": ("small", {}),
    }[case]
    name, update = change
    if name == "gray":  # a model that takes 1-channel images, from an import path in the sweep file
        conv = torch.nn.Conv2d(1, 2, 3)
        entry = TeacherEntry(model={"arch": "torch.nn:Conv2d", "kwargs": {"in_channels": 1, "out_channels": 2,
                                                                         "kernel_size": 3}},
                             weights=_write(tmp_path, conv.state_dict()), taps=["output"])
        bad = {"gray": entry}
    elif name == "small":  # squeezenet's first layers shrink 8×8 to nothing
        net = build_model({"arch": "squeezenet1_0", "num_classes": 5})
        bad = {"small": TeacherEntry(model={"arch": "squeezenet1_0", "num_classes": 5}, taps="features.*",
                                     weights=_write(tmp_path, net.state_dict()), input={"size": 8})}
    else:
        if "input" in update:
            update["input"] = entries[name].input.model_copy(update=update["input"])
        bad = _entry(own, name, **update)
    del lr
    with pytest.raises(ModelError) as err:
        check_teachers(bad)
    msg = str(err.value)
    assert msg.startswith(f"teachers.{name}.{field}: "), msg
    assert says in msg, msg
    assert "\n" not in msg and len(msg) < 400, msg


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS="")


def test_dry_run_lists_each_teacher_and_a_misfit_stops_before_ray(tmp_path) -> None:
    """``random_teachers`` writes the smoke profile's state dicts; ``--dry-run`` then lists every
    teacher (architecture, parameters, task, taps); a broken one is one line, exit 2, no Ray."""
    py = [sys.executable, "-m"]
    written = subprocess.run(py + ["mike_ray.random_teachers", str(SWEEP), "--profile", "smoke"], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    assert written.stdout.count("written ") == 3
    again = subprocess.run(py + ["mike_ray.random_teachers", str(SWEEP), "--profile", "smoke"], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.stdout.count("kept ") == 3  # never overwritten

    dry = subprocess.run(py + ["mike_ray.sweep", str(SWEEP), "--profile", "smoke", "--dry-run"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    listing = dry.stdout[dry.stdout.index("teachers (architecture"):].splitlines()[1:]
    expect = {"seg_lraspp": ("lraspp_mobilenet_v3_large", "task PHB", "backbone.2, backbone.4, backbone.7, "
                                                                      "backbone.12, output"),
              "seg_deeplab": ("deeplabv3_mobilenet_v3_large", "task DCH", "classifier.0"),
              "cls_resnet18": ("resnet18, 11.18 M parameters", "every row", "layer1, layer2, layer3, layer4")}
    assert len(listing) == 3, listing
    for line, (name, parts) in zip(listing, expect.items()):
        assert line.strip().startswith(f"{name}: "), line
        assert all(p in line for p in parts), line

    # a tap that does not exist: one line naming the sweep file, the teacher and the field; Ray never started
    bad = subprocess.run(py + ["mike_ray.sweep", str(SWEEP), "--profile", "smoke",
                               "--set", "teachers.seg_deeplab.taps=[backbone.3, backbone.77]"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert f"{SWEEP}: teachers.seg_deeplab.taps: " in bad.stderr and "backbone.77" in bad.stderr, bad.stderr
    assert "Ray" not in bad.stdout + bad.stderr and not (tmp_path / "outputs" / "mlflow.db").exists()


def test_sweep_file_checks_of_own_teachers(tmp_path) -> None:
    """Checks that need no weights: names, tasks, the query set, subsets naming entries."""
    from mike_ray.config import load_sweep
    from mike_ray.errors import ConfigError

    def load(*sets: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_sweep(SWEEP, [f"output={tmp_path}", *sets], profile="smoke")
        return str(err.value)

    cfg = load_sweep(SWEEP, [f"output={tmp_path}"], profile="smoke")
    assert cfg.subset("all_three") == ["seg_lraspp", "seg_deeplab", "cls_resnet18"]  # "all": the entries
    assert cfg.query_tasks(cfg.subset("all_three")) == ["PHB", "DCH", "VEH"]
    assert "teachers.seg_lraspp.task: unknown task 'XYZ'" in load("teachers.seg_lraspp.task=XYZ")
    assert "teachers.DCH: 'DCH' names the zoo's teacher" in load("teachers.DCH={model: resnet18, weights: a.pt}")
    assert "teachers.seg_deeplab.task: task 'DCH' is not in query.tasks" in load("query.tasks=[PHB, VEH]")
    assert "teacher_subsets.x: unknown teacher 'nope'" in load("teacher_subsets={x: [seg_lraspp, nope]}")
    assert "teachers.cls_resnet18.modle: unknown key (did you mean 'model'?)" in \
        load("teachers.cls_resnet18.modle=resnet18")
    assert "teachers.cls_resnet18.input" in load("teachers.cls_resnet18.input=imagenette")
    # a subset of teachers without a task needs query.tasks
    assert "query.tasks: required" in load("query.tasks=null", "teacher_subsets={r: [cls_resnet18]}")
    # zoo teachers and own teachers in one subset; the query set defaults to their tasks
    mixed = load_sweep(SWEEP, [f"output={tmp_path}", "query.tasks=null", "teacher_subsets={m: [seg_lraspp, VEH]}"],
                       profile="smoke")
    assert mixed.query_tasks(mixed.subset("m")) == ["PHB", "VEH"]


def test_a_detection_model_teaches_through_its_backbone(tmp_path) -> None:
    """A torchvision detector (its transform normalises and resizes internally: ``input: none``) tapped
    in its backbone: the forward stops after the deepest weighted tap (hooks: the detector's control
    flow defeats fx), and the shard returns a finite, nonzero ∂loss/∂x̄ for every row."""
    from mike_ray.mike.shard import MikeShard, TeacherRef

    spec = {"arch": "fasterrcnn_mobilenet_v3_large_fpn", "num_classes": 3, "kwargs": {"min_size": 64, "max_size": 64}}
    torch.save(build_model({**spec, "seed": 0}).state_dict(), tmp_path / "det.pt")
    entry = TeacherEntry(model=spec, weights=str(tmp_path / "det.pt"), taps="backbone.body.*")
    (info,) = check_teachers({"det": entry})
    assert info.taps[0] == "backbone.body.0" and len(info.taps) > 5
    shard = MikeShard([TeacherRef("det", entry.weights, entry=entry.model_dump(mode="json"))], device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g)
    out = shard.step(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), torch.zeros(3, dtype=torch.long),
                     {"det": {"backbone.body.2": 1.0, "backbone.body.4": 1.0}})
    assert out.counts == {"det": 3} and out.loss > 0
    assert torch.isfinite(out.grad).all() and all(float(out.grad[i].abs().max()) > 0 for i in range(3))


def test_own_teachers_of_one_architecture_run_as_one_grouped_forward_exactly(tmp_path) -> None:
    """Two resnet18 entries (different weights, same input mapping): the shard stacks them and runs
    them as one vmapped forward, through the resize and normalisation, with the values of running
    them one at a time (float64)."""
    from mike_ray.mike.shard import MikeShard, TeacherRef

    spec = {"arch": "resnet18", "num_classes": 5}
    refs = []
    for i in range(2):
        torch.save(_random_state(spec, 10 + i), tmp_path / f"r{i}.pt")
        e = TeacherEntry(model=spec, weights=str(tmp_path / f"r{i}.pt"), taps=["layer1", "layer2"],
                         input={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 48}, task="PHB")
        refs.append(TeacherRef(f"r{i}", e.weights, task_id=TASK_CODES.index("PHB"), entry=e.model_dump(mode="json")))
    grouped = MikeShard(refs, device="cpu", threads=None, dtype=torch.float64, group_rows=4)
    single = MikeShard(refs, device="cpu", threads=None, dtype=torch.float64, group_rows=0)
    assert len({id(s) for s, _ in grouped._stacks.values()}) == 1  # one stack of both
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 64, 64, generator=g, dtype=torch.float64)
    xbar = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    tasks = torch.tensor([TASK_CODES.index(t) for t in ["PHB", "DCH", "PHB", "CTB", "DCH", "CTB"]])
    w = {n: {"layer1": 1.0, "layer2": 0.5} for n in ("r0", "r1")}
    calls = []
    stack = next(iter(grouped._stacks.values()))[0]
    original = stack.forward
    stack.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    a = grouped.step(x, xbar, tasks, w)
    b = single.step(x, xbar, tasks, w)
    assert len(calls) == 2  # x and x̄, both teachers' two PHB rows at once
    assert a.counts == b.counts == {"r0": 2, "r1": 2}
    assert abs(a.loss - b.loss) <= 1e-12 * abs(b.loss) and a.loss > 0
    assert float((a.grad - b.grad).abs().max()) <= 1e-12 * float(b.grad.abs().max())
    assert a.terms.keys() == b.terms.keys() and all(abs(a.terms[k] - b.terms[k]) <= 1e-12 * abs(b.terms[k])
                                                    for k in a.terms)


class ScaledNet(torch.nn.Module):
    """A model whose forward reads a parameter directly (like a ViT's class token or a ConvNeXt's
    layer scale): torch.fx keeps its own reference to it, which a grouped forward would not swap."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.scale = torch.nn.Parameter(torch.randn(1, 4, 1, 1))
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) * self.scale)


def test_teachers_that_cannot_be_grouped_exactly_run_one_at_a_time(tmp_path) -> None:
    """Two teachers of a model that reads a parameter in its own forward: the shard finds that a
    grouped forward would run the second with the first's parameter, does not group them (warned),
    and its step equals the one-at-a-time step."""
    from mike_ray.mike.shard import MikeShard, TeacherRef

    arch = "test_own_teachers:ScaledNet"
    refs = []
    for i in range(2):
        torch.manual_seed(i)
        torch.save(ScaledNet().state_dict(), tmp_path / f"s{i}.pt")
        e = TeacherEntry(model={"arch": arch}, weights=str(tmp_path / f"s{i}.pt"), taps=["conv", "head"], task="PHB")
        refs.append(TeacherRef(f"s{i}", e.weights, task_id=TASK_CODES.index("PHB"), imports=(arch,),
                               entry=e.model_dump(mode="json")))
    with pytest.warns(UserWarning, match="one at a time"):
        grouped = MikeShard(refs, device="cpu", threads=None, dtype=torch.float64, group_rows=4)
    single = MikeShard(refs, device="cpu", threads=None, dtype=torch.float64, group_rows=0)
    assert not grouped._stacks
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 64, 64, generator=g, dtype=torch.float64)
    xbar = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    tasks = torch.tensor([TASK_CODES.index(t) for t in ["PHB", "DCH", "PHB", "CTB"]])
    w = {n: {"conv": 1.0, "head": 1.0} for n in ("s0", "s1")}
    a, b = grouped.step(x, xbar, tasks, w), single.step(x, xbar, tasks, w)
    assert a.terms == b.terms and torch.equal(a.grad, b.grad)
