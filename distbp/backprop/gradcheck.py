"""Backprop against central finite differences, in float64, at a generic point.

The point is generic: random weights, non-zero random biases and random inputs, so that no
ReLU unit sits exactly on its kink. At most `rows` rows and `per_layer` sampled parameters
per layer are checked, so it stays fast on large models.
"""

from dataclasses import replace

import numpy as np

from distbp.backprop import nn

TOLERANCE = 1e-6


def relative_error(g, g_hat):
    """‖g − ĝ‖ / max(‖g‖ + ‖ĝ‖, 1e-12)."""
    return float(np.linalg.norm(g - g_hat) / max(np.linalg.norm(g) + np.linalg.norm(g_hat), 1e-12))


def gradcheck(spec, seed=0, rows=64, per_layer=256, h=1e-6):
    """[(layer, checked_params, relative_error)] for layers 1..L of `spec`, run in float64."""
    spec = replace(spec, dtype="float64")
    rng = np.random.default_rng(seed)
    params = nn.init_params(spec, rng)
    for W, b in nn.views(spec, params):
        W += rng.normal(0, 0.1, size=W.shape)  # away from any special init structure
        b[...] = rng.normal(0, 0.5, size=b.shape)
    x = rng.normal(size=(rows, spec.layers[0]))
    if spec.output == "identity":
        y = rng.normal(size=(rows, spec.layers[-1]))
    else:
        y = rng.integers(0, max(spec.layers[-1], 2), size=rows)
    analytic = nn.grad_rows(spec, params, x, y).grad

    def loss(p):
        return nn.grad_rows(spec, p, x, y).loss_sum

    report = []
    for l, (w0, _, b1) in enumerate(spec.offsets(), start=1):
        size = b1 - w0
        idx = w0 + (np.arange(size) if size <= per_layer else rng.choice(size, per_layer, replace=False))
        numeric = np.empty(len(idx))
        for j, i in enumerate(idx):
            p = params.copy()
            p[i] += h
            up = loss(p)
            p[i] -= 2 * h
            numeric[j] = (up - loss(p)) / (2 * h)
        report.append((l, len(idx), relative_error(analytic[idx], numeric)))
    return report
