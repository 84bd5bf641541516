"""Same-architecture frozen models run as one grouped forward (``torch.func.vmap``).

A shard holding many teachers of one architecture would otherwise launch one small forward (and
backward) per teacher: at 100 teachers and a 64-row batch, every teacher owns ~1 row, and a step is
~64 one-row launches whose cost is per-call overhead, not FLOPs. :class:`StackedModels` keeps the
teachers' parameters and buffers stacked (``G×…`` per tensor, ``torch.func.stack_module_state``) and
runs any subset of them, each on its own rows, in one vmapped ``functional_call``: a convolution over
G teachers becomes one grouped convolution.

The per-teacher modules stay usable on their own: their tensors are rebound as views into the stacks,
so the weights are held once. The grouped forward is exact (same ops per teacher, eval mode: no batch
statistics couple the rows); ``tests/test_shards.py`` pins it against per-teacher forwards in float64.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

from torch import Tensor, nn


def signature(module: nn.Module) -> tuple:
    """What two modules must share to be stacked: their printed structure (module classes and their
    settings: kernel, stride, groups, eps …) and parameter and buffer names, shapes and dtypes. A
    caller adds what a module's repr cannot show (a model spec's options that change the forward)."""
    return (repr(module),
            tuple((k, tuple(v.shape), v.dtype) for k, v in module.named_parameters()),
            tuple((k, tuple(v.shape), v.dtype) for k, v in module.named_buffers()))


class StackedModels:
    """G frozen modules of one :func:`signature`, run as one vmapped forward.

    Args:
        modules: the modules (eval mode, no grad); their parameters and buffers are rebound as views
            into the stacked tensors, so each stays callable alone and the weights are held once.

    ``forward(sel, x, **kwargs)`` runs module ``sel[g]`` on ``x[g]`` for every g. Each calling thread
    uses its own copy of the first module as the ``functional_call`` template (the call swaps the
    template's tensors for the duration of the call), so concurrent callers never see each other's.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        from torch.func import stack_module_state

        if len(modules) < 2:
            raise ValueError("StackedModels: stacking needs at least two modules")
        sig = signature(modules[0])
        if any(signature(m) != sig for m in modules[1:]):
            raise ValueError("StackedModels: modules differ in parameters or buffers")
        self.params, self.buffers = stack_module_state(list(modules))
        # The functional_call template: a private copy of one member that nobody runs, so no thread
        # changes it while another copies it. Copying a member that a concurrent caller was running
        # raced on its lazily filled caches ("dictionary changed size during iteration"), and the shard
        # step then fell back to running those teachers one at a time, with other roundings.
        self._template = copy.deepcopy(modules[0])
        self._copying = threading.Lock()
        self._local = threading.local()  # each calling thread's copy of the template
        for i, m in enumerate(modules):  # hold each weight once: the modules read the stacks
            for name, p in m.named_parameters():
                p.data = self.params[name][i]
            for name, b in m.named_buffers():
                b.data = self.buffers[name][i]

    def __len__(self) -> int:
        return len(next(iter(self.params.values())))

    def _base(self) -> nn.Module:
        base = getattr(self._local, "base", None)
        if base is None:
            with self._copying:
                base = self._local.base = copy.deepcopy(self._template)
        return base

    def select(self, sel: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The stacked parameters and buffers of members ``sel`` (int64 G'): gathered once, for one or
        several :meth:`forward` calls (a MIKE step runs the same members on x and on x̄)."""
        return ({k: v.index_select(0, sel) for k, v in self.params.items()},
                {k: v.index_select(0, sel) for k, v in self.buffers.items()})

    def forward(self, members: Tensor | tuple[dict[str, Tensor], dict[str, Tensor]], x: Tensor, **kwargs) -> object:
        """Members (int64 G', or what :meth:`select` gave for them) on inputs ``x`` (G'×n×…): the
        vmapped outputs, every tensor in them with a leading G' dimension (a dict of taps stays a dict
        of G'×n×… tensors)."""
        from torch.func import functional_call, vmap

        base = self._base()
        params, buffers = self.select(members) if isinstance(members, Tensor) else members

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> object:
            return functional_call(base, (p, b), (xi,), kwargs)

        return vmap(one)(params, buffers, x)
