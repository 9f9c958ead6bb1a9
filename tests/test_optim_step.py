"""The guarded optimizer step: one NaN/inf policy for every training loop."""

from __future__ import annotations

import pytest
import torch

from diffalign.optim_step import SingleProcess, guarded_backward, guarded_step


def _setup(accumulate: int = 1):
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net, opt = accelerator.prepare(net, opt)
    return accelerator, net, opt


def _snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(net, before) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_nan_loss_skips_backward_and_step():
    accelerator, net, opt = _setup()
    before = _snapshot(net)
    loss = net(torch.ones(2, 3)).sum() * float("nan")
    skipped, grad_norm = guarded_step(accelerator, loss, list(net.parameters()), opt, max_grad_norm=1.0)
    assert skipped is True and grad_norm is None
    assert not _changed(net, before)
    assert all(p.grad is None for p in net.parameters())  # never backpropagated


def test_finite_loss_steps():
    accelerator, net, opt = _setup()
    before = _snapshot(net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    skipped, grad_norm = guarded_step(accelerator, net(torch.ones(2, 3)).sum(), list(net.parameters()), opt, sched, 1.0)
    assert skipped is False and grad_norm is not None and grad_norm > 0
    assert _changed(net, before)
    assert sched.get_last_lr()[0] == pytest.approx(0.05)


def test_inf_grad_norm_skips_the_step():
    accelerator, net, opt = _setup()
    before = _snapshot(net)
    w = net.weight
    loss = torch.sqrt(w - w.detach()).sum()  # value 0, gradient inf
    assert torch.isfinite(loss)
    skipped, grad_norm = guarded_step(accelerator, loss, list(net.parameters()), opt, max_grad_norm=1.0)
    assert skipped is True and grad_norm is not None and not torch.isfinite(torch.tensor(grad_norm))
    assert not _changed(net, before)


def test_micro_batches_via_callable():
    """A loop with its own micro-batches: one non-finite micro-batch skips the whole update."""
    accelerator, net, opt = _setup()
    params = list(net.parameters())
    before = _snapshot(net)

    def backward(losses):
        def run():
            finite = True
            for loss in losses:
                finite = guarded_backward(accelerator, loss, 0.5) and finite
            return finite
        return run

    x = torch.ones(2, 3)
    skipped, _ = guarded_step(accelerator, backward([net(x).sum(), net(x).sum() * float("inf")]), params, opt)
    assert skipped and not _changed(net, before)
    skipped, norm = guarded_step(accelerator, backward([net(x).sum(), net(x).sum()]), params, opt)
    assert not skipped and norm is not None and _changed(net, before)


def test_gradient_accumulation_steps_only_on_sync():
    accelerator, net, opt = _setup(accumulate=2)
    params = list(net.parameters())
    before = _snapshot(net)
    with accelerator.accumulate(net):
        skipped, norm = guarded_step(accelerator, net(torch.ones(2, 3)).sum(), params, opt, max_grad_norm=1.0)
    assert not skipped and norm is None and not _changed(net, before)  # accumulating: no clip, no step
    with accelerator.accumulate(net):
        skipped, norm = guarded_step(accelerator, net(torch.ones(2, 3)).sum(), params, opt, max_grad_norm=1.0)
    assert not skipped and norm is not None and _changed(net, before)


def test_single_process_without_accelerate():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    stepper = SingleProcess(torch.optim.SGD(net.parameters(), lr=0.1))
    before = _snapshot(net)
    skipped, norm = guarded_step(stepper, net(torch.ones(2, 3)).sum() * float("nan"), net.parameters(), stepper.optimizer)
    assert skipped and norm is None and not _changed(net, before)
    skipped, norm = guarded_step(stepper, net(torch.ones(2, 3)).sum(), list(net.parameters()), stepper.optimizer, None, 0)
    assert not skipped and norm > 0 and _changed(net, before)


def test_count_nonfinite_resets_and_aborts():
    from diffalign.optim_step import count_nonfinite

    n = count_nonfinite(0, True, 3, "steps", "hint")
    n = count_nonfinite(n, True, 3, "steps", "hint")
    assert n == 2 and count_nonfinite(n, False, 3, "steps", "hint") == 0  # a step that ran resets it
    with pytest.raises(FloatingPointError, match="3 steps in a row .*; hint"):
        count_nonfinite(n, True, 3, "steps", "hint")
