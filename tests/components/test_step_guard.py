"""The non-finite guard (components/step_guard.py): a bad step changes nothing the optimizer owns, a good
one does, the counters are right, N in a row raise, and the fused path reads nothing back to the host."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hydra_titan.components.optimizer import build_optimizer
from hydra_titan.components.step_guard import NonFiniteError, NonFiniteGuard, supports_found_inf
from hydra_titan.distributed.utils import clip_grad_norm_

HPARAMS = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


class HostReads(TorchDispatchMode):
    """Records every op that copies a device value to the host (`.item()`, `bool(tensor)`, `.tolist()`)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, p in enumerate(model.parameters()):
        for key, value in optimizer.state[p].items():
            state[f"state.{i}.{key}"] = value.clone()
    return state


def run_step(model, optimizer, guard, step: int, poison: float | None = None) -> None:
    torch.manual_seed(step)
    loss = model(torch.randn(4, 8)).square().mean()
    if poison is not None:
        loss = loss * poison
    loss.backward()
    grad_norm = clip_grad_norm_(model.parameters(), 1.0)
    guard.step(loss, grad_norm, step)
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture(params=["auto", "false"], ids=["fused", "foreach"])
def setup(request):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = build_optimizer(model, **HPARAMS, fused=request.param)
    return model, optimizer, NonFiniteGuard(optimizer, torch.device("cpu"), max_in_a_row=3)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_bad_step_changes_no_weight_and_no_optimizer_state(setup, poison):
    model, optimizer, guard = setup
    run_step(model, optimizer, guard, 1)
    before = snapshot(model, optimizer)
    run_step(model, optimizer, guard, 2, poison=poison)
    after = snapshot(model, optimizer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    run_step(model, optimizer, guard, 3)
    changed = snapshot(model, optimizer)
    assert not torch.equal(changed["param.0.weight"], after["param.0.weight"])
    report = guard.report()
    assert (report.skipped, report.longest_run, report.last_step) == (1, 1, 2)
    assert guard.report().skipped == 0  # the since-report counters restart


def test_a_skipped_step_equals_leaving_it_out(setup):
    """Weights after steps 1, bad 2, 3 == weights after steps 1, 3 (Adam's step count included)."""
    model, optimizer, guard = setup
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    reference.load_state_dict(model.state_dict())
    ref_opt = build_optimizer(reference, **HPARAMS, fused="auto" if guard.on_device else "false")
    ref_guard = NonFiniteGuard(ref_opt, torch.device("cpu"), max_in_a_row=3)
    for step, poison in ((1, None), (2, float("nan")), (3, None)):
        run_step(model, optimizer, guard, step, poison)
    for step in (1, 3):
        run_step(reference, ref_opt, ref_guard, step)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_steps_in_a_row_stop_only_at_the_limit(setup):
    model, optimizer, guard = setup
    for step, poison in enumerate([None, float("nan"), float("nan"), None, float("nan"), float("nan")], start=1):
        run_step(model, optimizer, guard, step, poison)
    report = guard.report()
    assert (report.skipped, report.longest_run, report.last_step) == (4, 2, 6)
    guard.check(report)  # two in a row twice: not three
    run_step(model, optimizer, guard, 7, float("nan"))  # the run of steps 5-7
    with pytest.raises(NonFiniteError, match=r"3 steps in a row .* \(the last at step 7\).*max_skipped_steps = 3"):
        guard.check(guard.report())


def test_the_fused_guard_reads_nothing_to_the_host_and_the_fallback_says_so(caplog):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = build_optimizer(model, **HPARAMS, fused="auto")
    assert supports_found_inf(optimizer)
    guard = NonFiniteGuard(optimizer, torch.device("cpu"), max_in_a_row=3)
    loss = model(torch.randn(2, 8)).square().mean()
    loss.backward()
    grad_norm = clip_grad_norm_(model.parameters(), 1.0)
    with HostReads() as mode:
        guard.step(loss, grad_norm, 1)
    assert mode.reads == []
    with caplog.at_level(logging.WARNING):
        NonFiniteGuard(build_optimizer(model, **HPARAMS, fused="false"), torch.device("cpu"), max_in_a_row=3)
    assert "reads each step's finite flag on the host" in caplog.text
