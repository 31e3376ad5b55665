"""Each hand-written optimizer against torch.optim, step for step, on the same gradients."""
import pytest
import torch

import optimizers

CASES = [
    ("sgd", dict(), torch.optim.SGD, dict()),
    ("sgd", dict(momentum=0.9, weight_decay=0.01), torch.optim.SGD,
     dict(momentum=0.9, weight_decay=0.01)),
    ("adam", dict(), torch.optim.Adam, dict()),
    ("adam", dict(betas=(0.8, 0.99), weight_decay=0.1), torch.optim.Adam,
     dict(betas=(0.8, 0.99), weight_decay=0.1)),
    ("adamw", dict(weight_decay=0.05), torch.optim.AdamW, dict(weight_decay=0.05)),
    ("rmsprop", dict(), torch.optim.RMSprop, dict()),
    ("rmsprop", dict(alpha=0.9, weight_decay=0.01), torch.optim.RMSprop,
     dict(alpha=0.9, weight_decay=0.01)),
]


def run(make, steps=25, sign=False, skip=lambda step, i: False, scale=1.0):
    """Parameters after each step, with the same gradient sequence for every optimizer.
    Parameter i has no gradient (None) at the steps where skip(step, i). scale multiplies
    every gradient."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = make(params)
    history, g = [], torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * 3 + p.detach()  # depends on the weights
            grad = grad * scale
            p.grad = None if skip(step, i) else grad.sign() if sign else grad
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("name,ours,ref,theirs", CASES)
@pytest.mark.parametrize("lr", [1e-3, 0.1])
def test_matches_torch_optim(name, ours, ref, theirs, lr):
    mine = run(lambda ps: optimizers.make_optimizer(name, ps, lr, **ours))
    reference = run(lambda ps: ref(ps, lr=lr, **theirs))
    for step, (a, b) in enumerate(zip(mine, reference, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, msg=f"{name} differs at step {step + 1}")


def sometimes_no_grad(step, i):
    """The second parameter has no gradient at its first two steps and every third after."""
    return i == 1 and (step < 2 or step % 3 == 0)


@pytest.mark.parametrize("name,ours,ref,theirs", CASES)
def test_matches_torch_optim_when_a_parameter_has_no_gradient(name, ours, ref, theirs):
    """torch.optim skips such a parameter and counts steps per parameter: Adam's bias
    correction then uses that parameter's own step count, not the optimizer's."""
    mine = run(lambda ps: optimizers.make_optimizer(name, ps, 0.1, **ours), skip=sometimes_no_grad)
    reference = run(lambda ps: ref(ps, lr=0.1, **theirs), skip=sometimes_no_grad)
    for step, (a, b) in enumerate(zip(mine, reference, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, msg=f"{name} differs at step {step + 1}")


@pytest.mark.parametrize("name,ours,ref,theirs", CASES)
def test_matches_torch_optim_on_tiny_gradients(name, ours, ref, theirs):
    """Gradients of about 3e-6, where eps = 1e-8 is no longer invisible: eps added inside the
    square root (sqrt(v + eps) = 1e-4) instead of after it (sqrt(v) + eps = 3e-6) fails."""
    mine = run(lambda ps: optimizers.make_optimizer(name, ps, 1e-3, **ours), scale=1e-6)
    reference = run(lambda ps: ref(ps, lr=1e-3, **theirs), scale=1e-6)
    for step, (a, b) in enumerate(zip(mine, reference, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, msg=f"{name} differs at step {step + 1}")


def test_sign_sgd_is_sgd_on_gradient_signs():
    mine = run(lambda ps: optimizers.SignSGD(ps, lr=0.01))
    reference = run(lambda ps: torch.optim.SGD(ps, lr=0.01), sign=True)
    for a, b in zip(mine, reference, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)


def test_zero_grad_and_unknown_name():
    p = torch.zeros(2, requires_grad=True)
    opt = optimizers.Adam([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.zero_grad()
    assert p.grad is None
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'"):
        optimizers.make_optimizer("adagrad", [p], 0.1)
