"""Your own teachers: a ``teachers:`` entry → a frozen, tapped :class:`~mike_ray.models.teacher.TeacherNet`.

One loader serves the check before Ray starts (:func:`check_teachers`, also behind ``--dry-run``) and
the shard that runs the teacher (:func:`load_entry`), so a teacher that passes the check loads the same
way in its shard. Every misfit is a one-line :class:`~mike_ray.errors.ModelError` naming the teacher
and the field: ``teachers.seg.weights: ckpt.pt: does not fit model 'seg': missing 4 keys …``.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mike_ray.errors import ModelError, one_line
from mike_ray.mike.config import TeacherEntry

__all__ = ["TeacherInfo", "check_teachers", "describe_zoo_teacher", "entry_flops", "load_entry", "read_state"]


@dataclass(frozen=True)
class TeacherInfo:
    """What ``--dry-run`` prints about one teacher."""

    name: str
    arch: str
    params: int
    taps: tuple[str, ...]
    task: str | None
    source: str  # the weights file (a teachers: entry) or the zoo folder

    def line(self) -> str:
        return (f"    {self.name}: {self.arch}, {self.params / 1e6:.2f} M parameters, task {self.task or '— (every row)'}, "
                f"{len(self.taps)} tap(s) {', '.join(self.taps)}  [{self.source}]")


def _field(name: str, field: str) -> str:
    return f"teachers.{name}.{field}"


def _entry(entry: TeacherEntry | Mapping[str, Any]) -> TeacherEntry:
    return entry if isinstance(entry, TeacherEntry) else TeacherEntry.model_validate(dict(entry))


def build_entry_model(name: str, entry: TeacherEntry, imports: Collection[str] | str = "any") -> nn.Module:
    """The entry's model, untrained. ``imports``: as in :func:`~mike_ray.models.build_model` ("any":
    the entry comes from the sweep file being run)."""
    from mike_ray.models import build_model

    try:
        return build_model(entry.model, name=name, imports=imports)
    except ModelError as err:
        raise ModelError(f"{_field(name, 'model')}: {str(err).replace(f'model {name!r}: ', '', 1)}") from None


def read_state(name: str, entry: TeacherEntry) -> dict[str, torch.Tensor]:
    """The entry's state dict: the file (``weights_only``), the ``weights_key`` inside it, with
    ``strip_prefix`` removed. Raises a one-line ModelError naming the field at fault."""
    from mike_ray.models.registry import load_torch_file

    path = Path(entry.weights).expanduser()
    try:
        obj = load_torch_file(path, "weights file")
    except ModelError as err:
        raise ModelError(f"{_field(name, 'weights')}: {err}") from None
    if entry.weights_key is not None:
        if not isinstance(obj, Mapping) or entry.weights_key not in obj:
            has = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
            raise ModelError(f"{_field(name, 'weights_key')}: {entry.weights_key!r} is not a key of {path} "
                             f"(has: {has})")
        obj = obj[entry.weights_key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = ""
        if isinstance(obj, Mapping):
            inner = [k for k, v in obj.items() if isinstance(v, Mapping)]
            hint = f" (set weights_key to one of: {', '.join(map(str, inner[:5]))})" if inner else ""
        where = f"{path}[{entry.weights_key!r}]" if entry.weights_key is not None else str(path)
        raise ModelError(f"{_field(name, 'weights')}: {where}: not a state dict (a mapping of parameter names to "
                         f"tensors){hint}")
    state = {str(k): v for k, v in obj.items()}
    if entry.strip_prefix:
        if not any(k.startswith(entry.strip_prefix) for k in state):
            raise ModelError(f"{_field(name, 'strip_prefix')}: no key of {path} starts with {entry.strip_prefix!r} "
                             f"(e.g. {next(iter(state))!r})")
        state = {k.removeprefix(entry.strip_prefix): v for k, v in state.items()}
    return state


def _fit(name: str, entry: TeacherEntry, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly; a misfit names the first offending key (and the prefix
    to strip, when every key of the file carries one the model lacks)."""
    from mike_ray.models.registry import check_state_dict

    try:
        check_state_dict(model, state, Path(entry.weights), name=name)
    except ModelError as err:
        own = model.state_dict()
        prefix = next(iter(state)).split(".", 1)[0] + "." if state else ""
        hint = ""
        if prefix and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            hint = f" (every key starts with {prefix!r}: set strip_prefix: {prefix!r})"
        raise ModelError(f"{_field(name, 'weights')}: {err}{hint}") from None
    model.load_state_dict(state)


def load_entry(name: str, entry: TeacherEntry | Mapping[str, Any], device: str | torch.device = "cpu",
               imports: Collection[str] | str = "any") -> "TeacherNet":  # noqa: F821
    """Build, load and wrap a ``teachers:`` entry: frozen, eval mode, on ``device``."""
    from mike_ray.models.teacher import OUTPUT_TAP, InputMap, TeacherNet

    entry = _entry(entry)
    model = build_entry_model(name, entry, imports)
    _fit(name, entry, model, read_state(name, entry))
    model.eval().requires_grad_(False)
    inp = entry.input
    try:
        net = TeacherNet(model, entry.taps, input_map=InputMap(inp.mean, inp.std, inp.size), output=entry.output,
                         name=name)
    except ModelError as err:
        msg = str(err).replace(f"model {name!r}: ", "", 1)
        if f"tap '{OUTPUT_TAP}' outputs a" in msg:  # the model's output is a dict or tuple: pick one
            kind = msg.split("outputs a", 1)[1].split(",")[0].strip()
            where = "output" if entry.output is None else "taps"
            raise ModelError(f"{_field(name, where)}: the model returns a {kind}"
                             + (": name the one to tap (output: <key or index>)" if entry.output is None else
                                f" at output {entry.output!r}: not a tensor")) from None
        raise ModelError(f"{_field(name, 'taps')}: {msg}") from None
    return net.eval().requires_grad_(False).to(device)


def _probe(name: str, entry: TeacherEntry, net: "TeacherNet", image_size: int) -> None:  # noqa: F821
    """One dummy forward (batch 2, 3×S×S in [0, 1]) through the input mapping, the model, the output
    selection and the taps, each failure named by its field."""
    x = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    inner = net.tapped.model
    size = f"3×{image_size}×{image_size}" + (f", resized to {'×'.join(map(str, inner.input.size))}"
                                            if inner.input.size else "")
    with torch.no_grad():
        try:
            out = inner.net(inner.input(x))
        except Exception as err:  # noqa: BLE001 - any failure here is an input the model cannot take
            raise ModelError(f"{_field(name, 'input')}: the model cannot take the query images ({size}): "
                             f"{one_line(f'{type(err).__name__}: {err}')[:200]}") from None
        if entry.output is not None:
            try:
                out = out[entry.output]
            except (KeyError, IndexError, TypeError):
                has = (f"keys: {', '.join(map(repr, out))}" if isinstance(out, Mapping) else
                       f"{len(out)} outputs" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}")
                raise ModelError(f"{_field(name, 'output')}: {entry.output!r} is not an output of the model "
                                 f"({has})") from None
        if "output" in net.paths and not isinstance(out, torch.Tensor):
            has = f"a dict with keys {', '.join(map(repr, out))}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
            raise ModelError(f"{_field(name, 'output')}: the model returns {has}; name the one to tap")
        try:
            net(x)
        except ModelError as err:
            raise ModelError(f"{_field(name, 'taps')}: {str(err).replace(f'model {name!r}: ', '', 1)}") from None


def check_teachers(entries: Mapping[str, TeacherEntry], image_size: int = 64) -> list[TeacherInfo]:
    """Load every entry as its shard will (model, weights, taps) and run one dummy forward on the
    query image size: a misfit is a one-line ModelError naming the teacher and the field, before
    any cluster time is spent. Returns what ``--dry-run`` lists."""
    out = []
    for name, entry in entries.items():
        net = load_entry(name, entry)
        _probe(name, entry, net, image_size)
        model = net.tapped.model.net
        out.append(TeacherInfo(name, entry.model.get("arch", "?"), sum(p.numel() for p in model.parameters()),
                               tuple(net.paths), entry.task, str(entry.weights)))
        del net, model
    return out


def describe_zoo_teacher(task: str, spec: Mapping[str, Any], taps: Any, where: str) -> TeacherInfo:
    """A zoo teacher (trained here, or still to be), listed like a ``teachers:`` entry: its
    architecture from the zoo's model spec, its taps, its task."""
    from mike_ray.models import build_model, tap_names

    model = build_model(dict(spec), name=f"zoo.{task}", imports="any")  # the sweep's own zoo.model
    return TeacherInfo(task, str(spec.get("arch", "?")), sum(p.numel() for p in model.parameters()),
                       tuple(tap_names(model, taps)), task, where)


def entry_flops(name: str, entry: TeacherEntry | Mapping[str, Any], image_size: int = 64,
                imports: Collection[str] | str = "any") -> float:
    """Forward FLOPs of one query image through the entry's model, after its input mapping (an
    untrained instance: the count does not depend on the weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mike_ray.models.teacher import InputMap

    entry = _entry(entry)
    model = build_entry_model(name, entry, imports).eval()
    inp = InputMap(entry.input.mean, entry.input.std, entry.input.size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inp(torch.zeros(1, 3, image_size, image_size)))
    return float(counter.get_total_flops())
