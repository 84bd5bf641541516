"""Taps: intermediate module outputs of any ``nn.Module``, named by module path — one contract for all.

A *tap* is the output tensor of one submodule during one forward pass, named by its path in
``model.named_modules()`` (``"block07"``, ``"layer1.0.conv1"``, ``"features.3"``). MIKE compares the
teachers' taps on x and x̄ (and backpropagates through them to x̄); MHGD reads stage outputs.

- :func:`tap_names` resolves a spec (``"blocks"``, a path, a glob pattern, or a list of those) into an
  ordered, validated list of paths.
- :class:`TappedModel` wraps a model; ``forward(x)`` returns ``{path: activation}`` in that order.
- :func:`check_input_shape` tells, before any cluster time is spent, whether a model takes 3×64×64.

Contract of a tap (identical for both implementations below):

- the value is exactly the tensor the module returned, differentiable w.r.t. the input;
- the module must run exactly once per forward (a shared module such as resnet's ``layer1.0.relu``,
  applied twice, is ambiguous and rejected — tap its parent instead), and must return a tensor (a
  tuple/dict output is rejected: tap the submodule that makes the tensor you want);
- later in-place operations of the model never alter a returned tap;
- ``forward(x, upto=path)`` stops after that tap (early exit) and returns the taps up to it, with
  exactly the values a full forward gives them: a caller that needs only early taps (a layerwise
  schedule's first phases) pays only for the layers up to them.

Two implementations:

- ``"fx"`` (default when it works): torchvision's ``create_feature_extractor`` traces the model
  with torch.fx and cuts the graph after the last tap, so the layers after it do not even run
  (1.4–4× faster than hooks for early taps). Module paths are mapped to the exact fx node each module
  returns, separately for the train and eval graphs (so ``self.training`` branches are handled).
  A tap whose value a later in-place op would overwrite gets a ``clone`` node inserted.
- ``"hooks"`` (fallback): forward hooks on the tapped modules; the whole model runs, and each tap is
  cloned (the hook cannot know whether an in-place op follows). Used when tracing fails (a
  data-dependent ``if`` in a non-leaf module, ...) or when a tap lies inside a module fx treats as a
  leaf (``torch.nn`` builtins such as ``MultiheadAttention``, ``torchvision.ops`` modules).

Modules are shared, not copied: ``tapped.eval()`` puts the wrapped model in eval mode, and running a
TappedModel in train mode updates the model's BatchNorm statistics. Teachers should be ``.eval()``
(torchvision's EfficientNets also drop residual branches at random in train mode). A TappedModel
starts in its model's mode. Side effects of fx to know about: forward hooks that others registered
on the model run (on proxies) while it is traced at construction, and at run time only hooks on
leaf modules fire (non-leaf modules are inlined into the graph).
"""
from __future__ import annotations

import copy
import difflib
import inspect
import operator
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from mike_ray.errors import ModelError, one_line

__all__ = ["TapSpec", "TappedModel", "tap_names", "check_input_shape"]

TapSpec = str | Sequence[str]
"""``"blocks"`` (every top-level child), a module path, a glob pattern, or a list of paths/patterns.

Patterns: ``*`` and ``?`` match within one path component (``"layer*"`` → ``layer1`` … ``layer4``,
``"features.*"`` → the direct children of ``features``); a ``**`` component matches any number of
components (``"**.conv1"`` → every ``conv1`` at any depth; ``"features.**"`` → all its descendants).
``"blocks"`` is always the keyword; to tap a module that is itself named ``blocks`` (timm models
have one), write ``"block[s]"``."""


# --------------------------------------------------------------------------------------------------
# Resolving names


def _model_name(model: nn.Module, name: str | None) -> str:
    return name if name else type(model).__name__


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a tap pattern: ``*``/``?``/``[...]`` stay within a component; a ``**`` component
    matches zero or more components (one or more when it ends the pattern)."""
    comps = pattern.split(".")
    rx = ""
    for k, comp in enumerate(comps):
        last = k == len(comps) - 1
        if comp == "**":
            rx += r"[^.]+(?:\.[^.]+)*" if last else r"(?:[^.]+\.)*"
            continue
        i = 0
        while i < len(comp):
            c = comp[i]
            end = comp.find("]", i + 1)
            if c == "*":
                rx += "[^.]*"
            elif c == "?":
                rx += "[^.]"
            elif c == "[" and end > i + 1:
                body = comp[i + 1:end].replace("\\", "\\\\")  # keep ranges like 0-9 working
                rx += "[^" + body[1:] + "]" if body[0] == "!" else "[" + body + "]"
                i = end
            else:
                rx += re.escape(c)
            i += 1
        if not last:
            rx += r"\."
    return re.compile(rx + r"\Z")


def tap_names(model: nn.Module, spec: TapSpec = "blocks", *, name: str | None = None) -> list[str]:
    """Resolve ``spec`` into an ordered list of existing module paths of ``model``.

    Order: explicit paths in the order given; ``"blocks"`` and patterns in registration order
    (``named_modules``), which for sequential models — torchvision's and ours — is execution order.
    A path listed twice (or matched by two patterns) appears once, at its first position.

    Raises:
        ModelError: an unknown path (with the closest existing paths suggested), a pattern that
            matches nothing, an empty spec, or a model without children for ``"blocks"``.
    """
    mname = _model_name(model, name)
    # remove_duplicate=False: a module registered under two names can be tapped by either.
    paths = [p for p, _ in model.named_modules(remove_duplicate=False) if p]
    known = set(paths)
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ModelError(f"model '{mname}': empty tap list")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ModelError(f"model '{mname}': tap names must be non-empty strings, got {item!r}")
        if item == "blocks":
            found = [p for p, _ in model.named_children()]
            if not found:
                raise ModelError(f"model '{mname}': has no child modules to tap as 'blocks'")
        elif any(c in item for c in "*?["):
            rx = _pattern_regex(item)
            found = [p for p in paths if rx.match(p)]
            if not found:
                raise ModelError(f"model '{mname}': tap pattern '{item}' matches no module")
        elif item in known:
            found = [item]
        elif item in dict(model.named_parameters()) or item in dict(model.named_buffers()):
            owner = item.rpartition(".")[0]
            hint = f"; tap '{owner}'" if owner else ""
            raise ModelError(f"model '{mname}': tap '{item}' is a parameter or buffer, not a module{hint}")
        else:
            close = difflib.get_close_matches(item, paths, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ModelError(f"model '{mname}': unknown tap '{item}'{hint}")
        out += [p for p in found if p not in out]
    return out


# --------------------------------------------------------------------------------------------------
# Train/eval flags: tracing and dummy runs flip them; restore every module's own flag afterwards
# (a model in train mode may hold frozen BatchNorms in eval mode).


def _save_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    for m, mode in saved:
        m.training = mode


# --------------------------------------------------------------------------------------------------
# fx implementation


class _StopForward(Exception):
    """Raised by the last needed tap's hook to end a forward early (hooks implementation)."""


class _FxUnsupported(Exception):
    """The fx path cannot serve these taps; the message says why (the hooks path takes over)."""


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _mutates_first_arg(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` modifies its first argument in place (the ops torch.fx keeps in-place)."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        fname = getattr(node.target, "__name__", "")
        if fname.endswith("_") and not fname.startswith("_"):
            return True
        try:  # functional ops with a positional inplace flag, e.g. F.relu(x, True)
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            return bound.arguments.get("inplace") is True
        except (TypeError, ValueError):
            return False
    return False


def _protect_outputs(gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Insert ``clone`` after each returned node that a later in-place op would overwrite."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    returned: dict[str, fx.Node] = dict(output.args[0])  # fx containers are immutable: copy
    for key, node in list(returned.items()):
        if any(u is not output and u.args and u.args[0] is node and _mutates_first_arg(u, gm)
               for u in node.users):
            with graph.inserting_after(node):
                returned[key] = graph.call_method("clone", (node,))
    output.args = (returned,)
    graph.lint()


def _build_fx(model: nn.Module, paths: list[str],
              mname: str) -> tuple[fx.GraphModule, dict[bool, dict[str, str]]]:
    """Trace ``model`` in train and eval mode and build the cut graph returning the taps.

    Returns the extractor and, per mode (``training`` flag), path → extractor output key.
    """
    try:
        from torchvision.models.feature_extraction import (
            NodePathTracer,
            _set_default_tracer_kwargs,  # the defaults create_feature_extractor uses: same node names
            create_feature_extractor,
        )
    except ImportError as err:  # a future torchvision without these: fall back to hooks
        raise _FxUnsupported(f"torchvision feature extraction unavailable ({err})") from None

    modules = {p: model.get_submodule(p) for p in paths}
    targets = {id(m) for m in modules.values()}

    class TapTracer(NodePathTracer):
        """Counts calls of the tapped modules and records what each call returned."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.calls: Counter[int] = Counter()
            self.returned: dict[int, Any] = {}

        def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_module(m, forward, args, kwargs)
            if id(m) in targets:
                self.calls[id(m)] += 1
                self.returned[id(m)] = out
            return out

    probe = TapTracer(**_set_default_tracer_kwargs(None))
    for p in paths:  # fx never enters a leaf module, so a tap inside one has no node of its own
        parts = p.split(".")
        for i in range(1, len(parts)):
            anc = ".".join(parts[:i])
            if probe.is_leaf_module(model.get_submodule(anc), anc):
                raise _FxUnsupported(f"tap '{p}' lies inside '{anc}', a module fx does not trace into")

    keys: dict[bool, dict[str, str]] = {}
    saved = _save_modes(model)
    try:
        for training in (True, False):
            model.train(training)
            tracer = TapTracer(**_set_default_tracer_kwargs(None))
            try:
                tracer.trace(model)
            except Exception as err:  # noqa: BLE001 - any tracing failure means "use hooks"
                raise _FxUnsupported(f"torch.fx cannot trace it: {type(err).__name__}: "
                                     f"{one_line(str(err))[:160]}") from None
            mode = "train" if training else "eval"
            keys[training] = {}
            for p, m in modules.items():
                n = tracer.calls[id(m)]
                if n != 1:
                    raise ModelError(_count_message(mname, p, n, mode))
                out = tracer.returned[id(m)]
                if not isinstance(out, fx.Proxy):
                    raise ModelError(_non_tensor_message(mname, p, out))
                qualname = tracer.node_to_qualname.get(out.node)
                if qualname is None:
                    raise _FxUnsupported(f"tap '{p}' returns a value with no graph node name")
                keys[training][p] = qualname
        extractor = create_feature_extractor(
            model,
            train_return_nodes={q: q for q in keys[True].values()},
            eval_return_nodes={q: q for q in keys[False].values()},
            suppress_diff_warning=True,
        )
    finally:
        _restore_modes(saved)
    for graph in (extractor.train_graph, extractor.eval_graph):
        _protect_outputs(extractor, graph)
    extractor.graph = extractor.train_graph if extractor.training else extractor.eval_graph  # recompile
    return extractor, keys


def _count_message(mname: str, path: str, n: int, mode: str) -> str:
    if n == 0:
        return f"model '{mname}': tap '{path}' never runs in forward ({mode} mode)"
    return (f"model '{mname}': tap '{path}' runs {n} times per forward ({mode} mode), so its output is "
            f"ambiguous; tap a module that runs once (e.g. its parent)")


def _non_tensor_message(mname: str, path: str, value: Any) -> str:
    return (f"model '{mname}': tap '{path}' outputs a {type(value).__name__}, not a tensor; "
            f"tap the submodule that produces the tensor you want")


# --------------------------------------------------------------------------------------------------
# The wrapper


class TappedModel(nn.Module):
    """``model`` whose forward returns its taps: B×3×64×64 → ``OrderedDict{path: activation}``.

    Args:
        model: any ``nn.Module`` (shared, not copied: see the module docstring on train/eval).
        taps: a :data:`TapSpec`, resolved with :func:`tap_names`; default every top-level child.
        name: model name used in error messages (default: the class name).
        method: ``"fx"``, ``"hooks"``, or ``"auto"`` (fx, falling back to hooks when fx cannot serve
            these taps; ``fallback_reason`` then says why).

    Attributes:
        paths: the resolved tap paths, in output order.
        method: the implementation in use, ``"fx"`` or ``"hooks"``.

    ``state_dict()`` is the wrapped model's under the prefix ``model.``; ``.to()`` moves both the
    model and the traced extractor.

    Raises:
        ModelError: unknown taps, a tapped module that runs other than once per forward, a tap whose
            output is not a tensor, or ``method="fx"`` when fx cannot serve these taps.
    """

    def __init__(self, model: nn.Module, taps: TapSpec = "blocks", *, name: str | None = None,
                 method: Literal["auto", "fx", "hooks"] = "auto") -> None:
        super().__init__()
        if method not in ("auto", "fx", "hooks"):
            raise ModelError(f"model '{_model_name(model, name)}': tap method must be 'auto', 'fx' or "
                             f"'hooks', got {method!r}")
        self.model = model
        self.training = model.training  # start in the model's mode (nn.Module would say train)
        self.name = _model_name(model, name)
        self.paths = tap_names(model, taps, name=self.name)
        self.fallback_reason: str | None = None
        extractor, keys = None, {}
        if method != "hooks":
            try:
                extractor, keys = _build_fx(model, self.paths, self.name)
            except _FxUnsupported as why:
                if method == "fx":
                    raise ModelError(f"model '{self.name}': cannot tap with fx: {why}") from None
                self.fallback_reason = str(why)
        self.method = "fx" if extractor is not None else "hooks"
        # Not a registered submodule: its modules are the model's own, and registering it would
        # duplicate them in state_dict() and let .train() flip its graph behind our back.
        object.__setattr__(self, "_extractor", extractor)
        self._keys = keys
        self._cuts: dict[tuple[bool, int], fx.GraphModule] = {}  # early-exit graphs, built on first use

    def __deepcopy__(self, memo: dict[int, Any]) -> TappedModel:
        # torchvision's DualGraphModule re-runs __init__ when copied, which puts every module it
        # holds (here: the copy's shared modules) in train mode; put each module's flag back.
        flags = [m.training for m in self.modules()]
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = {} if k == "_cuts" else copy.deepcopy(v, memo)
        for m, flag in zip(new.modules(), flags):
            m.training = flag
        return new

    def _apply(self, fn: Any, recurse: bool = True) -> TappedModel:
        super()._apply(fn, recurse)
        if self._extractor is not None:
            # Shared parameters are already converted (idempotent); this catches tensors the
            # extractor holds on its own (buffers of get_attr nodes).
            self._extractor._apply(fn, recurse)
        self._cuts = {}  # they hold the extractor's tensors as they were: rebuild on next use
        return self

    def forward(self, x: Tensor, upto: str | None = None) -> OrderedDict[str, Tensor]:
        """B×C×H×W input → ``OrderedDict`` path → activation tensor, in :attr:`paths` order.

        ``upto``: a tap path; the forward stops after it (early exit) and returns only the taps up
        to and including it — exactly the values a full forward gives them. With fx the graph is
        cut after that tap (the layers after it do not run); with hooks the forward is stopped by
        the tap's hook. None: every tap.
        """
        k = len(self.paths) - 1 if upto is None else self._tap_index(upto)
        if self._extractor is not None:
            return self._run_fx(x, k)
        return self._run_hooks(x, k)

    def _tap_index(self, path: str) -> int:
        try:
            return self.paths.index(path)
        except ValueError:
            raise ModelError(f"model '{self.name}': upto='{path}' is not one of its taps "
                             f"({', '.join(self.paths)})") from None

    def _cut(self, k: int) -> fx.GraphModule:
        """The extractor's graph (current mode) returning the first ``k + 1`` taps only, with every
        node they do not depend on removed; built once per (mode, k) from the traced graph (no
        re-tracing), sharing the model's modules."""
        key = (self.training, k)
        gm = self._cuts.get(key)
        if gm is None:
            ex = self._extractor
            src = ex.train_graph if self.training else ex.eval_graph
            graph = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            returned = graph.graph_copy(src, env)  # the copied output dict {key: node}
            keys = self._keys[self.training]
            graph.output({keys[p]: returned[keys[p]] for p in self.paths[:k + 1]})
            gm = fx.GraphModule(ex, graph)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            self._cuts[key] = gm
        return gm

    def _run_fx(self, x: Tensor, k: int) -> OrderedDict[str, Tensor]:
        ex = self._extractor
        if ex.training != self.training:
            # Swap graphs without DualGraphModule.train(), which would recurse into the shared
            # modules and override their own train/eval flags.
            ex.graph = ex.train_graph if self.training else ex.eval_graph
            ex.training = self.training
        out = ex(x) if k == len(self.paths) - 1 else self._cut(k)(x)
        keys = self._keys[self.training]
        result: OrderedDict[str, Tensor] = OrderedDict()
        for p in self.paths[:k + 1]:
            value = out[keys[p]]
            if not isinstance(value, Tensor):  # a leaf module that returns a tuple, e.g. nn.LSTM
                raise ModelError(_non_tensor_message(self.name, p, value))
            result[p] = value
        return result

    def _run_hooks(self, x: Tensor, k: int) -> OrderedDict[str, Tensor]:
        store: dict[str, Any] = {}
        calls: Counter[str] = Counter()
        paths = self.paths[:k + 1]
        last = paths[-1]

        def make_hook(path: str):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                calls[path] += 1
                # clone: an in-place op later in the forward must not change what we return
                store[path] = output.clone() if isinstance(output, Tensor) else output
                if path == last and len(paths) < len(self.paths) and all(calls[p] for p in paths):
                    raise _StopForward  # early exit: nothing after this tap is needed
            return hook

        handles = [self.model.get_submodule(p).register_forward_hook(make_hook(p)) for p in paths]
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        mode = "train" if self.training else "eval"
        result: OrderedDict[str, Tensor] = OrderedDict()
        for p in paths:
            if calls[p] != 1:
                raise ModelError(_count_message(self.name, p, calls[p], mode))
            if not isinstance(store[p], Tensor):
                raise ModelError(_non_tensor_message(self.name, p, store[p]))
            result[p] = store[p]
        return result

    @torch.no_grad()
    def shapes(self, input_shape: Sequence[int] = (3, 64, 64)) -> OrderedDict[str, torch.Size]:
        """Per-tap activation shape (without the batch dim) for one C×H×W input, from a dummy run.

        Runs in eval mode (restoring every module's flag after), so BatchNorm statistics are untouched.
        """
        saved = _save_modes(self)
        self.eval()
        try:
            x = _dummy_input(self.model, input_shape)
            return OrderedDict((p, v.shape[1:]) for p, v in self(x).items())
        finally:
            _restore_modes(saved)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, method={self.method!r}, paths={self.paths}"


# --------------------------------------------------------------------------------------------------
# Input-shape check


def _dummy_input(model: nn.Module, shape: Sequence[int]) -> Tensor:
    """A batch of 2 uniform [0, 1] images (batch 2: train-mode BatchNorm rejects batch 1 at 1×1)."""
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next(model.buffers(), torch.empty(0))
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.rand((2, *shape), generator=gen).to(device=ref.device, dtype=dtype)


def check_input_shape(model: nn.Module, shape: Sequence[int] = (3, 64, 64), name: str | None = None,
                      *, role: str = "teacher") -> None:
    """Raise :class:`ModelError` unless ``model`` runs on C×H×W inputs of ``shape`` (e.g. 3×64×64).

    One dummy forward (batch 2, eval mode, ``no_grad``; every module's train/eval flag restored
    after). The message names the model and says what it seems to expect, e.g. ``teacher 'gray':
    expects 1-channel input (first layer 'conv1'), got input 3×64×64: <short reason>``.
    """
    mname = _model_name(model, name)
    dims = "×".join(str(int(d)) for d in shape)
    if len(shape) != 3 or any(int(d) < 1 for d in shape):
        raise ModelError(f"{role} '{mname}': input shape must be C×H×W with positive sizes, got {dims}")
    saved = _save_modes(model)
    try:
        model.eval()
        with torch.no_grad():
            model(_dummy_input(model, shape))
    except Exception as err:  # noqa: BLE001 - any failure of the dummy forward is a misfit
        reason = one_line(f"{type(err).__name__}: {err}")
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        first = next(((p, m) for p, m in model.named_modules()
                      if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
        in_ch = None if first is None else getattr(first[1], "in_channels",
                                                   getattr(first[1], "in_features", None))
        if first is not None and in_ch is not None and in_ch != int(shape[0]):
            expects = f"{in_ch}-channel input (first layer '{first[0]}')"
        else:
            expects = "another input size (a layer cannot take the feature map it receives)"
        raise ModelError(f"{role} '{mname}': expects {expects}, got input {dims}: {reason}") from None
    finally:
        _restore_modes(saved)
