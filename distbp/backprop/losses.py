"""Output layer + loss pairs: each computes a_L from z_L, the loss sum and the output delta.

For each supported pair the output delta d_L = dloss/da_L * f'_L(z_L) simplifies to a_L - y,
which is both cheaper and more accurate than the product. Targets are class indices (rows,)
for the two classification pairs and a float matrix (rows, n_out) for regression.
"""

import numpy as np

from distbp.backprop.activations import sigmoid


class Loss:
    """One output activation with its loss. Sums are float64 whatever the model dtype."""

    name = ""
    output = ""
    classification = True

    def forward(self, z, out):  # z (rows, n_out) -> a_L written into out
        raise NotImplementedError

    def loss_sum(self, z, a, y):  # sum over rows of the per-example loss
        raise NotImplementedError

    def delta(self, a, y, out):  # d_L = a_L - y, written into out (rows, n_out)
        raise NotImplementedError

    def correct(self, a, y):  # rows whose predicted class equals y
        raise NotImplementedError


class SoftmaxCrossEntropy(Loss):
    """Per example -sum_k y_k log a_k with one-hot y, i.e. logsumexp(z) - z_y."""

    name, output = "cross_entropy", "softmax"

    def forward(self, z, out):
        np.subtract(z, z.max(axis=1, keepdims=True), out=out)  # shift: exp never overflows
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def loss_sum(self, z, a, y):
        zmax = z.max(axis=1)
        lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))  # (rows,)
        return float(np.sum(lse - z[np.arange(len(y)), y], dtype=np.float64))

    def delta(self, a, y, out):
        np.copyto(out, a)
        out[np.arange(len(y)), y] -= 1
        return out

    def correct(self, a, y):
        return int(np.count_nonzero(a.argmax(axis=1) == y))


class SigmoidBinaryCrossEntropy(Loss):
    """Per example -[y log a + (1-y) log(1-a)], computed from z as softplus(z) - y z."""

    name, output = "binary_cross_entropy", "sigmoid"

    def forward(self, z, out):
        return sigmoid(z, out=out)

    def loss_sum(self, z, a, y):
        z = z[:, 0]
        per_row = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
        return float(np.sum(per_row, dtype=np.float64))

    def delta(self, a, y, out):
        np.subtract(a, y[:, None], out=out)
        return out

    def correct(self, a, y):
        return int(np.count_nonzero((a[:, 0] >= 0.5) == (y == 1)))


class IdentityMSE(Loss):
    """Per example 0.5 * sum (a - y)^2."""

    name, output = "mse", "identity"
    classification = False

    def forward(self, z, out):
        np.copyto(out, z)
        return out

    def loss_sum(self, z, a, y):
        diff = a - y
        return 0.5 * float(np.sum(diff * diff, dtype=np.float64))

    def delta(self, a, y, out):
        np.subtract(a, y, out=out)
        return out

    def correct(self, a, y):
        return 0


LOSSES = {cls.name: cls() for cls in (SoftmaxCrossEntropy, SigmoidBinaryCrossEntropy, IdentityMSE)}


def get(name, output):
    """The loss `name`, checked to pair with the output activation `output`."""
    loss = LOSSES.get(name)
    if loss is None:
        raise KeyError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    if loss.output != output:
        raise KeyError(f"loss {name!r} pairs with output {loss.output!r}, not {output!r}")
    return loss
