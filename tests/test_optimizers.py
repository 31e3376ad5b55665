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


def run(make, steps=25, sign=False):
    """Parameters after each step, with the same gradient sequence for every optimizer."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = make(params)
    history, g = [], torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=g) * 3 + p.detach()  # depends on the weights
            p.grad = grad.sign() if sign else grad
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
