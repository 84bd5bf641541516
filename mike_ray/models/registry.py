"""Build any model from a config dict, and save/load its weights with one-line errors.

A model spec is a small dict (a section of a sweep or teacher-zoo file)::

    {"arch": "segmenter", "width": 16, "depth": 16, "num_classes": 3, "seed": 0}
    {"arch": "autoencoder", "embed_channels": 2}
    {"arch": "wrn", "depth": 16, "width": 4, "num_classes": 33}  # CIFAR-style classifiers (MHGD)
    {"arch": "resnet18", "num_classes": 3}                    # any torchvision classifier, weights=None
    {"arch": "lraspp_mobilenet_v3_large", "num_classes": 21}  # torchvision segmentation / detection
    {"arch": "my_pkg.nets:make_net", "kwargs": {"k": 1}}      # any importable nn.Module factory

An import-path arch makes mike_ray import and call code, so it is built only when the caller allows
it: ``imports="any"`` for a spec from the sweep file being run (or the CLI), a set of arch strings for
a spec read from a stored file (a teacher record, a classifier record): only those the running sweep
file names itself (:func:`import_archs`). The default allows none — a file the project reads can name
registered architectures only, never code to run.

Torchvision models are always built with ``weights=None`` (and ``weights_backbone=None`` for segmentation
and detection models): nothing is downloaded; weights come from files (a zoo, or a ``teachers:`` entry).
"""
from __future__ import annotations

import difflib
import importlib
import os
import pickle
import re
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Literal, Any

import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from mike_ray.config_base import format_validation_error
from mike_ray.errors import ModelError, one_line
from mike_ray.models.autoencoder import AutoEncoder
from mike_ray.models.classifiers import mobilenet_cifar, resnet_cifar, vgg_cifar, wrn
from mike_ray.models.segmenter import Segmenter
from mike_ray.models.spec import ModelSpec, import_archs

__all__ = ["ModelSpec", "available_archs", "build_model", "check_state_dict", "import_archs", "load_torch_file",
           "load_weights", "save_weights"]

Imports = Collection[str] | Literal["any"]
"""Which ``package.module:callable`` archs a build may import: "any", or exactly these."""

# Our own architectures and the spec fields each accepts.
_CUSTOM: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "segmenter": (Segmenter, ("num_classes", "width", "depth", "num_downsamples", "expand_ratio", "stem_stride")),
    "autoencoder": (AutoEncoder, ("embed_channels", "width", "depth", "num_downsamples", "expand_ratio",
                                  "stem_stride")),
    # CIFAR-style classifiers for MHGD (models/classifiers.py); extra options (widths, dropout) via kwargs
    "wrn": (wrn, ("num_classes", "width", "depth")),
    "resnet_cifar": (resnet_cifar, ("num_classes", "width", "depth")),
    "vgg_cifar": (vgg_cifar, ("num_classes", "width", "depth")),
    "mobilenet_cifar": (mobilenet_cifar, ("num_classes", "width", "depth", "expand_ratio")),
}
_TYPED_FIELDS = ("num_classes", "width", "depth", "num_downsamples", "expand_ratio", "embed_channels",
                 "stem_stride")


def _torchvision_archs() -> dict[str, bool]:
    """Torchvision model name → whether it has a backbone of its own (segmentation, detection),
    which torchvision would otherwise initialise from downloaded ImageNet weights."""
    out = {a: False for a in torchvision.models.list_models(module=torchvision.models)}
    for module in (torchvision.models.segmentation, torchvision.models.detection):
        out.update({a: True for a in torchvision.models.list_models(module=module)})
    return out


def available_archs() -> list[str]:
    """Our architectures, then torchvision's classification, segmentation and detection models."""
    return list(_CUSTOM) + list(_torchvision_archs())


def _as_spec(spec: Mapping[str, Any] | ModelSpec, name: str | None = None) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ModelError(f"model spec must be a mapping with an 'arch' key, got {type(spec).__name__}")
    label = name or spec.get("arch", "?")
    try:
        return ModelSpec.model_validate(dict(spec))
    except ValidationError as err:
        raise ModelError(format_validation_error(err, ModelSpec, f"model '{label}'")) from None


def build_model(spec: Mapping[str, Any] | ModelSpec, *, name: str | None = None, imports: Imports = ()) -> nn.Module:
    """Build an untrained model from a spec dict (see the module docstring).

    Args:
        spec: a dict (validated into :class:`ModelSpec`) or a ``ModelSpec``.
        name: the model's name in error messages (default: its arch).
        imports: import-path archs this build may import: "any" (a spec from the sweep file being run
            or the command line), or a collection — for a spec read from a stored file, the running
            sweep file's own :func:`import_archs` (default: none).

    Raises:
        ModelError: unknown arch (closest names suggested), an unknown key, an option that does not
            apply to the arch, or a builder that rejects its arguments.
    """
    s = _as_spec(spec, name)
    label = name or s.arch
    given = {f: getattr(s, f) for f in _TYPED_FIELDS if getattr(s, f) is not None}

    if s.arch in _CUSTOM:
        factory, allowed = _CUSTOM[s.arch]
        bad = [f for f in given if f not in allowed]
        if bad:
            raise ModelError(f"model '{label}': option '{bad[0]}' does not apply to arch '{s.arch}' "
                             f"(allowed: {', '.join(allowed)}, seed, kwargs)")
        kwargs = {**s.kwargs, **given}
    elif ":" in s.arch:  # "package.module:callable"
        if imports != "any" and s.arch not in imports:
            raise ModelError(f"model '{label}': arch '{s.arch}' is an import path, which only the sweep file "
                             f"you run may name (a stored record names registered architectures only); "
                             f"not imported")
        factory = _import_factory(s.arch, label)
        bad = [f for f in given if f != "num_classes"]
        if bad:
            raise ModelError(f"model '{label}': option '{bad[0]}' does not apply to an imported arch; "
                             f"pass it in 'kwargs'")
        kwargs = {**s.kwargs, **given}
    elif s.arch in (tv := _torchvision_archs()):
        bad = [f for f in given if f != "num_classes"]
        if bad:
            raise ModelError(f"model '{label}': option '{bad[0]}' does not apply to torchvision's "
                             f"'{s.arch}' (allowed: num_classes, seed, kwargs)")
        # never a download: no weights, and no ImageNet backbone for segmentation/detection models
        fixed = {"weights": None, **({"weights_backbone": None} if tv[s.arch] else {})}
        factory = lambda **kw: torchvision.models.get_model(s.arch, **fixed, **kw)  # noqa: E731
        kwargs = {**s.kwargs, **given}
    else:
        close = difflib.get_close_matches(s.arch, available_archs(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ModelError(f"model '{label}': unknown arch '{s.arch}'{hint}")

    with torch.random.fork_rng(devices=[]):
        if s.seed is not None:
            torch.manual_seed(s.seed)
        try:
            model = factory(**kwargs)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - builders raise TypeError/ValueError/AssertionError...
            raise ModelError(f"model '{label}': building '{s.arch}' failed: "
                             f"{one_line(f'{type(err).__name__}: {err}')}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{label}': '{s.arch}' returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_factory(target: str, label: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ModelError(f"model '{label}': cannot import '{target}': {one_line(str(err))}") from None
    if not callable(obj):
        raise ModelError(f"model '{label}': '{target}' is not callable")
    return obj


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` with ``torch.save``, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def load_torch_file(path: str | Path, what: str = "weights file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    ``weights_only=True`` refuses any pickled object other than tensors and plain containers, so a
    foreign or malicious ``.pt`` file is an error, never code that runs. Torch's warnings (e.g. about
    an unusual pickle protocol) are silenced: the caller reports the outcome in one line.

    Raises:
        ModelError: ``<path>: ...`` for a missing, empty, truncated or foreign file, or one holding a
            pickled object that ``weights_only`` refuses (the refused global is named).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: not a readable {what}: file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(2)
    # torch.save writes a zip archive ("PK"); old torch and plain pickles start with the PROTO opcode
    zipped = head == b"PK"
    if not zipped and head[:1] != b"\x80":
        raise ModelError(f"{path}: not a readable {what}: neither a torch.save zip archive nor a pickle "
                         f"(starts with {head!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a multi-paragraph advice text; the refused global/opcode is the useful part
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please use|\n\n|$)",
                          str(err), re.S)
        why = one_line(found.group(1)) if found else "a pickled object other than tensors"
        raise ModelError(f"{path}: not a readable {what}: refused by torch.load(weights_only=True): {why[:160]}") \
            from None
    except Exception as err:  # noqa: BLE001 - zip/unpickling errors of a damaged or foreign file
        detail = one_line(str(err)).split(". ")[0][:160] or type(err).__name__
        damaged = "truncated or damaged zip archive, " if zipped else ""
        raise ModelError(f"{path}: not a readable {what}: {damaged}{type(err).__name__}: {detail}") from None


def check_state_dict(model: nn.Module, state: Any, path: str | Path, *, name: str | None = None,
                     field: str = "") -> None:
    """Raise :class:`ModelError` unless ``state`` is a state dict that fits ``model`` exactly.

    ``field`` names where the state dict sits inside the file (``"model"`` in a trainer checkpoint),
    so the message reads ``<path>: model: does not fit ...``.
    """
    label = name or type(model).__name__
    where = f"{path}: {field}: " if field else f"{path}: "
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{where}not a state dict (a mapping of parameter names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} keys (e.g. '{missing[0]}')"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')"] if unexpected else [])
        raise ModelError(f"{where}does not fit model '{label}': {', '.join(parts)}")
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise ModelError(f"{where}does not fit model '{label}': '{k}' has shape "
                             f"{tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model")


def load_weights(model: nn.Module, path: str | Path, *, name: str | None = None) -> nn.Module:
    """Load a state dict saved by :func:`save_weights` into ``model`` (``weights_only=True``, strict).

    Tensors are loaded onto CPU and copied into the model's own devices. Returns ``model``.

    Raises:
        ModelError: ``<path>: ...`` for a missing or unreadable file, or one whose keys or shapes do
            not fit the model (the first offending key is named).
    """
    path = Path(path)
    label = name or type(model).__name__
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found (model '{label}')")
    state = load_torch_file(path, "weights file")
    check_state_dict(model, state, path, name=label)
    model.load_state_dict(state)
    return model
