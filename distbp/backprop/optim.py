"""Optimizers on flat parameter arrays: sgd, momentum, nesterov and adam, each with L2 weight decay.

Every rule is elementwise, so it can run on any contiguous slice of the parameter vector:
S parameter actors, one per slice, give the same bits as one actor holding everything.
State is a dict of flat float arrays (checkpointable as npz); the update is in place.
Conventions follow PyTorch: weight decay adds `weight_decay * w` to the gradient, momentum
keeps v = mu v + g, and Nesterov steps along g + mu v.
"""

import numpy as np


class Optimizer:
    """Base: `init_state(n, dtype)` -> dict of flat arrays; `step(w, g, state, lr)` updates w
    in place, where g is the mean gradient (it may be overwritten as scratch).

    A step may also be taken a part at a time: `begin(state)` once (the step count), then
    `update(w[part], g[part], state, lr, part)` for each part of the vector, in any order.
    Every rule is elementwise, so that gives the bits of one `step`."""

    def __init__(self, weight_decay=0.0):
        self.weight_decay = float(weight_decay)

    def init_state(self, n, dtype):
        return {}

    def _decayed(self, w, g):
        if self.weight_decay:
            g += self.weight_decay * w
        return g

    def step(self, w, g, state, lr):
        self.begin(state)
        self.update(w, g, state, lr)

    def begin(self, state):
        """Count one more step (the state a whole step shares)."""

    def update(self, w, g, state, lr, part=slice(None)):
        """Update `w` (the slice `part` of the vector) from `g` (the same slice) in place."""
        raise NotImplementedError


class SGD(Optimizer):
    def update(self, w, g, state, lr, part=slice(None)):
        g = self._decayed(w, g)
        g *= lr
        w -= g


class Momentum(Optimizer):
    def __init__(self, momentum=0.9, nesterov=False, weight_decay=0.0):
        super().__init__(weight_decay)
        self.momentum, self.nesterov = float(momentum), nesterov

    def init_state(self, n, dtype):
        return {"velocity": np.zeros(n, dtype)}

    def update(self, w, g, state, lr, part=slice(None)):
        g = self._decayed(w, g)
        v = state["velocity"][part]
        v *= self.momentum
        v += g
        if self.nesterov:  # step along g + mu v
            g += self.momentum * v
            g *= lr
            w -= g
        else:
            w -= lr * v


class Adam(Optimizer):
    """Kingma & Ba 2015, with bias correction; `t` is the step count, kept as state."""

    def __init__(self, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(weight_decay)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)

    def init_state(self, n, dtype):
        return {"m": np.zeros(n, dtype), "v": np.zeros(n, dtype), "t": np.zeros(1, np.float64)}

    def begin(self, state):
        state["t"] += 1

    def update(self, w, g, state, lr, part=slice(None)):
        g = self._decayed(w, g)
        m, v = state["m"][part], state["v"][part]
        t = state["t"][0]
        m *= self.beta1
        m += (1 - self.beta1) * g
        np.multiply(g, g, out=g)  # g is scratch from here on
        v *= self.beta2
        v += (1 - self.beta2) * g
        step_size = lr / (1 - self.beta1**t)
        np.sqrt(v, out=g)
        g /= np.sqrt(1 - self.beta2**t)
        g += self.eps  # g = sqrt(v_hat) + eps
        np.divide(m, g, out=g)
        g *= step_size
        w -= g


OPTIMIZERS = {  # name -> factory(momentum, beta1, beta2, eps, weight_decay)
    "sgd": lambda momentum, beta1, beta2, eps, weight_decay: SGD(weight_decay),
    "momentum": lambda momentum, beta1, beta2, eps, weight_decay: Momentum(momentum, False, weight_decay),
    "nesterov": lambda momentum, beta1, beta2, eps, weight_decay: Momentum(momentum, True, weight_decay),
    "adam": lambda momentum, beta1, beta2, eps, weight_decay: Adam(beta1, beta2, eps, weight_decay),
}


def make(name, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """The optimizer `name` (a key of OPTIMIZERS) with its hyper-parameters.
    The learning rate is passed to each `step`, so schedules stay outside."""
    if name not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](momentum, beta1, beta2, eps, weight_decay)
