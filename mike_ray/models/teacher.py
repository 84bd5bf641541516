"""A network trained elsewhere, seen as a MIKE teacher: input mapping → model → chosen output, tapped.

The shared input space is B×3×H×W RGB in [0, 1] (the query crops and the reconstructions x̄). A
teacher trained on other inputs (ImageNet-normalised, 224×224) gets them through :class:`InputMap`
— a bilinear resize, then ``(x − mean) / std`` — as ordinary differentiable ops in front of the
model, so ∂loss/∂x̄ is exact through them. :class:`TeacherNet` taps the model by the user's own
module paths (``backbone.4``, ``layer2``), plus ``output``: the model's output, picked from a dict
or tuple (torchvision segmentation returns ``{"out": …}``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mike_ray.errors import ModelError
from mike_ray.models.taps import TapSpec, TappedModel, tap_names

__all__ = ["InputMap", "OUTPUT_TAP", "SelectOutput", "TeacherNet"]

OUTPUT_TAP = "output"
"""The tap name of a teacher's (selected) output."""
_NET = "net."  # where the user's model sits inside the wrapper: its tap paths carry this prefix


class InputMap(nn.Module):
    """[0, 1] RGB → what the teacher was trained on: resize (bilinear) to ``size``, then normalise.

    Args:
        mean, std: per-channel normalisation (3 values each).
        size: H×W (or one int for a square) to resize to; None keeps the input size.
    """

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 size: int | Sequence[int] | None = None) -> None:
        super().__init__()
        # float64, cast to the input's dtype per call: a float64 teacher gets the exact constants
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float64).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float64).reshape(1, -1, 1, 1))
        self.size = None if size is None else ((int(size), int(size)) if isinstance(size, int) else tuple(size))

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None:
            # unconditionally (bilinear to the same size is the identity): a shape test would stop
            # torch.fx from tracing the teacher, and the taps would fall back to hooks
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class SelectOutput(nn.Module):
    """Picks one output of a model that returns a dict or a tuple (``key`` None: the output as is)."""

    def __init__(self, key: str | int | None = None) -> None:
        super().__init__()
        self.key = key

    def forward(self, out: Any) -> Any:
        return out if self.key is None else out[self.key]

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


class _Wrapped(nn.Module):
    def __init__(self, model: nn.Module, input_map: InputMap, output: SelectOutput) -> None:
        super().__init__()
        self.input = input_map
        self.net = model
        self.output = output

    def forward(self, x: Tensor) -> Any:
        return self.output(self.net(self.input(x)))


class TeacherNet(nn.Module):
    """``model`` behind an :class:`InputMap`, tapped by the model's own module paths.

    Args:
        model: the teacher (frozen by the caller).
        taps: a :data:`~mike_ray.models.taps.TapSpec` resolved on ``model`` itself (``"blocks"``,
            ``"backbone.*"``, ``["layer1", "layer3"]``); the name ``output`` taps the model's
            (selected) output.
        input_map: the input mapping (default: identity).
        output: the key or index of the output to use when the model returns a dict or tuple.
        name: the teacher's name in error messages.

    ``forward(x, upto=None)`` returns ``OrderedDict{tap: activation}`` like :class:`TappedModel`
    (same contract: exact values, early exit after ``upto``), keyed by the user's paths.
    """

    def __init__(self, model: nn.Module, taps: TapSpec = "blocks", *, input_map: InputMap | None = None,
                 output: str | int | None = None, name: str | None = None) -> None:
        super().__init__()
        specs = [taps] if isinstance(taps, str) else list(taps)
        wants_output = OUTPUT_TAP in specs and OUTPUT_TAP not in dict(model.named_modules())
        rest = [s for s in specs if not (wants_output and s == OUTPUT_TAP)]
        paths = tap_names(model, rest, name=name) if rest else []
        self.paths = paths + ([OUTPUT_TAP] if wants_output else [])
        inner = _Wrapped(model, input_map or InputMap(), SelectOutput(output))
        internal = [_NET + p for p in paths] + ([OUTPUT_TAP] if wants_output else [])
        # no name inside: the printed structure is what stacks teachers (models/stacked.signature),
        # and two teachers of one architecture differ in name only
        self.tapped = TappedModel(inner, internal)
        self._internal = dict(zip(self.paths, internal))
        self.training = model.training
        self.name = name or type(model).__name__

    @property
    def method(self) -> str:
        """``"fx"`` or ``"hooks"`` (see :class:`TappedModel`)."""
        return self.tapped.method

    def forward(self, x: Tensor, upto: str | None = None) -> OrderedDict[str, Tensor]:
        if upto is not None and upto not in self._internal:
            raise ModelError(f"teacher '{self.name}': upto='{upto}' is not one of its taps ({', '.join(self.paths)})")
        out = self.tapped(x, upto=None if upto is None else self._internal[upto])
        return OrderedDict((p, out[self._internal[p]]) for p in self.paths if self._internal[p] in out)

    def extra_repr(self) -> str:
        return f"paths={self.paths}"
