"""Hidden-layer activations: each is f(z) and f'(z), with f' written in terms of a = f(z).

Every hidden derivative here can be computed from the activation alone, so the forward pass
keeps only `a_l` (computed in place over `z_l`) and the backward pass never needs `z_l`.
"""

import numpy as np


class Activation:
    """f applied in place to z (rows, n); `scale_delta` multiplies delta by f'(z) in place."""

    name = ""

    def forward(self, z):  # z (rows, n) -> a, overwritten in place
        raise NotImplementedError

    def scale_delta(self, a, delta, scratch):  # delta *= f'(z), from a; scratch like a
        raise NotImplementedError


class Identity(Activation):
    name = "identity"

    def forward(self, z):
        return z

    def scale_delta(self, a, delta, scratch):
        return delta


class Sigmoid(Activation):
    name = "sigmoid"

    def forward(self, z):
        return sigmoid(z, out=z)

    def scale_delta(self, a, delta, scratch):
        np.subtract(1, a, out=scratch)  # f' = a (1 - a)
        scratch *= a
        delta *= scratch
        return delta


class Tanh(Activation):
    name = "tanh"

    def forward(self, z):
        return np.tanh(z, out=z)

    def scale_delta(self, a, delta, scratch):
        np.multiply(a, a, out=scratch)  # f' = 1 - a^2
        np.subtract(1, scratch, out=scratch)
        delta *= scratch
        return delta


class LeakyReLU(Activation):
    """max(z, alpha z); alpha = 0 gives the plain ReLU. a > 0 exactly where z > 0."""

    def __init__(self, alpha=0.01, name="leaky_relu"):
        self.alpha = alpha
        self.name = name

    def forward(self, z):
        if self.alpha == 0:
            return np.maximum(z, 0, out=z)
        np.multiply(z, self.alpha, out=z, where=z < 0)
        return z

    def scale_delta(self, a, delta, scratch):
        if self.alpha == 0:
            np.sign(a, out=scratch)  # a >= 0, so sign(a) = f'(z): 1 where z > 0, else 0
            delta *= scratch
        else:
            np.multiply(delta, self.alpha, out=delta, where=a <= 0)
        return delta


def sigmoid(z, out=None):
    """Overflow-free logistic 1 / (1 + e^-z), via e^-|z| which never exceeds 1."""
    e = np.exp(-np.abs(z))  # (rows, n), in (0, 1]
    if out is None:
        out = np.empty_like(z)
    pos = z >= 0
    np.divide(1, 1 + e, out=out, where=pos)
    np.divide(e, 1 + e, out=out, where=~pos)
    return out


ACTIVATIONS = {  # the one table of activations: the job schema and the network read it
    "sigmoid": Sigmoid(),
    "tanh": Tanh(),
    "relu": LeakyReLU(alpha=0.0, name="relu"),
    "leaky_relu": LeakyReLU(alpha=0.01),
    "identity": Identity(),
}


def get(name):
    """The activation called `name`; KeyError lists the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise KeyError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
