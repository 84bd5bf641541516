"""models/stacked.py: same-architecture modules run as one vmapped forward, exactly, from any thread."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from mike_ray.models.stacked import StackedModels, signature


def _net(seed: int, stride: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 3, padding=1)).double().eval().requires_grad_(False)


def test_members_run_on_their_own_inputs_exactly_and_weights_are_held_once() -> None:
    nets = [_net(i) for i in range(4)]
    for m in nets:  # non-trivial running statistics: eval-mode BatchNorm must use each member's own
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    want_own = [m(torch.ones(1, 3, 5, 5, dtype=torch.float64)) for m in nets]
    stack = StackedModels(nets)
    x = torch.rand(3, 2, 3, 5, 5, dtype=torch.float64)
    sel = torch.tensor([2, 0, 3])
    got = stack.forward(sel, x)
    assert got.shape == (3, 2, 2, 5, 5)
    for g, i in enumerate(sel.tolist()):
        torch.testing.assert_close(got[g], nets[i](x[g]), rtol=0, atol=1e-12)
    # each module still runs alone, on the stacked storage (no copy of its weights)
    for m, want in zip(nets, want_own):
        torch.testing.assert_close(m(torch.ones(1, 3, 5, 5, dtype=torch.float64)), want, rtol=0, atol=0)
    assert nets[1][0].weight.data_ptr() == stack.params["0.weight"][1].data_ptr()


def test_the_gradient_reaches_each_members_input() -> None:
    nets = [_net(i) for i in range(3)]
    stack = StackedModels(nets)
    x = torch.rand(3, 2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(stack.forward(torch.arange(3), x).tanh().sum(), x)
    for i, m in enumerate(nets):
        xi = x[i].detach().requires_grad_(True)
        (gi,) = torch.autograd.grad(m(xi).tanh().sum(), xi)
        torch.testing.assert_close(g[i], gi, rtol=0, atol=1e-12)


def test_modules_that_differ_in_settings_are_never_stacked() -> None:
    assert signature(_net(0)) == signature(_net(1))  # weights differ: stackable
    assert signature(_net(0)) != signature(_net(0, stride=2))  # same tensors, another forward
    with pytest.raises(ValueError, match="differ"):
        StackedModels([_net(0), _net(1, stride=2)])
    with pytest.raises(ValueError, match="at least two"):
        StackedModels([_net(0)])


def test_concurrent_callers_each_get_their_own_members() -> None:
    """Each thread calls with its own template copy, so two callers never swap each other's weights."""
    nets = [_net(i) for i in range(4)]
    stack = StackedModels(nets)
    x = torch.rand(2, 3, 3, 8, 8, dtype=torch.float64)
    errors: list[BaseException] = []

    def caller(members: list[int]) -> None:
        try:
            for _ in range(20):
                got = stack.forward(torch.tensor(members), x)
                for g, i in enumerate(members):
                    torch.testing.assert_close(got[g], nets[i](x[g]), rtol=0, atol=1e-12)
        except BaseException as err:  # noqa: BLE001 — reported below
            errors.append(err)

    threads = [threading.Thread(target=caller, args=(m,)) for m in ([0, 1], [2, 3], [3, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


class _Cached(nn.Module):
    """A module that fills a cache as it runs, as TappedModel does with its cut graphs."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 2, 3, padding=1).double()
        self.cache: dict[int, None] = {i: None for i in range(-5000, 0)}  # a long copy: a wide window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache[len(self.cache)] = None
        return self.conv(x)


def test_a_first_grouped_call_while_a_member_runs_alone() -> None:
    """A shard runs one teacher alone (filling its caches) while another caller's first grouped call
    takes its template copy. The copy is of a private, never-run member copy: copying the running
    member raced ("dictionary changed size during iteration", 5 of 80 callers here before the fix) and
    the shard then ran the group one at a time, with other roundings than its concurrent caller."""
    nets = [_Cached(i).eval().requires_grad_(False) for i in range(3)]
    stack = StackedModels(nets)
    x = torch.rand(2, 1, 3, 4, 4, dtype=torch.float64)
    stop, errors = threading.Event(), []

    def alone() -> None:
        while not stop.is_set():
            nets[0](x[0])

    def grouped() -> None:
        try:
            stack.forward(torch.tensor([1, 2]), x)
        except BaseException as err:  # noqa: BLE001 — reported below
            errors.append(err)

    runner = threading.Thread(target=alone)
    runner.start()
    try:
        for _ in range(20):
            callers = [threading.Thread(target=grouped) for _ in range(4)]
            for t in callers:
                t.start()
            for t in callers:
                t.join()
    finally:
        stop.set()
        runner.join()
    assert not errors, errors[0]
