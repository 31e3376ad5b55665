"""Hand-written optimizers: SGD (with momentum), Adam, AdamW, RMSProp and sign-SGD.

Each is a short class with the same interface as torch.optim (`step()`, `zero_grad()`),
its update equations in comments, and a test that it matches torch.optim step for step.
Why they matter here (the paper): on steered data the loss gradient carries a small but
consistent component along the steering vector. SGD's step is the raw gradient, dominated
by a few coordinates with outlier gradients; Adam and RMSProp divide each coordinate by its
own running gradient scale, so the small consistent component accumulates.
"""
import torch


class Optimizer:
    """Holds the parameters, the learning rate and per-parameter state."""

    def __init__(self, params, lr):
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.state = [{} for _ in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p, state in zip(self.params, self.state, strict=True):
            if p.grad is not None:  # a parameter without a gradient skips the step entirely
                # each parameter counts its own steps, as torch.optim does: one that had no
                # gradient at some step has taken fewer (Adam's bias correction depends on it)
                state["step"] = state.get("step", 0) + 1
                self.update(p, p.grad, state)

    def update(self, p, g, state):
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay

    def update(self, p, g, state):
        g = g + self.weight_decay * p                      # g <- g + wd * theta   (L2 penalty)
        if self.momentum:
            if "buf" not in state:
                state["buf"] = g.clone()                   # b_1 = g_1
            else:
                state["buf"].mul_(self.momentum).add_(g)   # b_t = mu * b_{t-1} + g_t
            g = state["buf"]
        p.add_(g, alpha=-self.lr)                          # theta <- theta - lr * g


class SignSGD(Optimizer):
    """Every coordinate moves by exactly lr, in the direction that lowers the loss."""

    def update(self, p, g, state):
        p.add_(g.sign(), alpha=-self.lr)                   # theta <- theta - lr * sign(g)


class RMSProp(Optimizer):
    def __init__(self, params, lr, alpha=0.99, eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.alpha, self.eps, self.weight_decay = alpha, eps, weight_decay

    def update(self, p, g, state):
        g = g + self.weight_decay * p                      # L2 penalty
        if "v" not in state:
            state["v"] = torch.zeros_like(p)
        v = state["v"]
        v.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)  # v <- a v + (1 - a) g^2
        # theta <- theta - lr * g / (sqrt(v) + eps)
        p.addcdiv_(g, v.sqrt().add_(self.eps), value=-self.lr)


class Adam(Optimizer):
    """Adam; with decoupled=True it is AdamW (weight decay applied to the weights directly)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled=False):
        super().__init__(params, lr)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.decoupled = eps, weight_decay, decoupled

    def update(self, p, g, state):
        if self.decoupled:
            p.mul_(1 - self.lr * self.weight_decay)        # AdamW: theta <- theta (1 - lr wd)
        else:
            g = g + self.weight_decay * p                  # Adam: L2 penalty in the gradient
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["m"], state["v"]
        m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)            # m <- b1 m + (1 - b1) g
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)     # v <- b2 v + (1 - b2) g^2
        t = state["step"]                                           # this parameter's steps
        m_hat = m / (1 - self.beta1 ** t)                           # bias corrections: early
        v_hat = v / (1 - self.beta2 ** t)                           # m, v start from zero
        # theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)
        p.addcdiv_(m_hat, v_hat.sqrt().add_(self.eps), value=-self.lr)


def AdamW(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True)


def SGDMomentum(params, lr, momentum=0.9, weight_decay=0.0):
    """SGD with heavy-ball momentum 0.9: the same direction as SGD, averaged over steps."""
    return SGD(params, lr, momentum, weight_decay)


OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD, "sgdm": SGDMomentum,
              "rmsprop": RMSProp, "signsgd": SignSGD}


def make_optimizer(name, params, lr, **options):
    """An optimizer by name: adam, adamw, sgd, sgdm (momentum 0.9), rmsprop or signsgd."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](params, lr, **options)
