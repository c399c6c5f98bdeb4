"""The network: spec, flat parameter layout, initialisation, forward, backward (deltas), predict.

All weights and biases live in one contiguous 1-D buffer laid out W1, b1, W2, b2, ...; each
W_l (n_in, n_out) and b_l (n_out,) is a view into it. Gradients share the layout, so the sum
of two gradients, an optimizer update or a checkpoint is one array operation.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from distbp.backprop import activations as _activations
from distbp.backprop import losses as _losses


@dataclass(frozen=True)
class Spec:
    """Layer widths (n_0 = inputs, ..., n_L = outputs), one activation per hidden layer, the
    output/loss pair, the initialiser and the dtype."""

    layers: tuple
    activations: tuple
    output: str = "softmax"
    loss: str = "cross_entropy"
    init: str = "xavier"
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        acts = self.activations
        acts = (acts,) * (len(self.layers) - 2) if isinstance(acts, str) else tuple(acts)
        object.__setattr__(self, "activations", acts)
        if len(self.layers) < 2 or min(self.layers) < 1:
            raise ValueError(f"layers must be 2 or more positive widths, got {self.layers}")
        if len(acts) != len(self.layers) - 2:
            raise ValueError(f"need {len(self.layers) - 2} hidden activations, got {len(acts)}")
        for name in acts:
            _activations.get(name)
        _losses.get(self.loss, self.output)
        if self.output == "sigmoid" and self.layers[-1] != 1:
            raise ValueError("a sigmoid output has exactly 1 unit")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {sorted(INITS)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")

    @property
    def num_layers(self):  # L: the number of weight layers
        return len(self.layers) - 1

    @property
    def num_params(self):
        return sum(n_in * n_out + n_out for n_in, n_out in zip(self.layers, self.layers[1:]))

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    def offsets(self):
        """[(w_start, b_start, b_stop)] per layer: where W_l and b_l sit in the flat buffer."""
        out, pos = [], 0
        for n_in, n_out in zip(self.layers, self.layers[1:]):
            out.append((pos, pos + n_in * n_out, pos + n_in * n_out + n_out))
            pos += n_in * n_out + n_out
        return out


def param_slices(num_params, S):
    """S contiguous slices [a, b) that cover the flat parameter vector once, one per parameter
    actor; the first num_params % S hold one parameter more."""
    if not 1 <= S <= num_params:
        raise ValueError(f"{S} slices of {num_params} parameters: at least 1, at most one per parameter")
    size, extra = divmod(num_params, S)
    bounds = [r * size + min(r, extra) for r in range(S + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def slice_layers(spec, a, b):
    """[(layer, start, stop)] of each layer's part of the flat slice [a, b), in slice
    coordinates: how a parameter actor's slice maps onto layers (0-based)."""
    out = []
    for l, (w0, _, b1) in enumerate(spec.offsets()):
        lo, hi = max(a, w0), min(b, b1)
        if lo < hi:
            out.append((l, lo - a, hi - a))
    return out


def views(spec, flat):
    """[(W_l, b_l)] views into `flat`, W_l (n_in, n_out) and b_l (n_out,); writes go through."""
    return [
        (flat[w0:b0].reshape(n_in, n_out), flat[b0:b1])
        for (w0, b0, b1), n_in, n_out in zip(spec.offsets(), spec.layers, spec.layers[1:])
    ]


def _xavier(rng, n_in, n_out):  # Glorot & Bengio 2010, uniform
    limit = np.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, size=(n_in, n_out))


def _he(rng, n_in, n_out):  # He et al. 2015, normal
    return rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_in, n_out))


def _normal(rng, n_in, n_out):
    return rng.normal(0.0, 0.01, size=(n_in, n_out))


INITS = {"xavier": _xavier, "he": _he, "normal": _normal}


def init_params(spec, rng):
    """A fresh flat parameter vector: weights from `spec.init` drawn with `rng`, biases zero.
    Drawn in float64 and then cast, so float32 and float64 nets start from the same point."""
    flat = np.zeros(spec.num_params, dtype=np.float64)
    for (W, _), n_in, n_out in zip(views(spec, flat), spec.layers, spec.layers[1:]):
        W[...] = INITS[spec.init](rng, n_in, n_out)
    return flat.astype(spec.np_dtype)


class GradSums(NamedTuple):
    """What a block of rows contributes: sums, never means, so that blocks add up."""

    grad: np.ndarray  # (num_params,) sum over rows of dloss/dparams
    loss_sum: float  # sum over rows of the per-example loss
    count: int  # rows
    correct: int  # rows classified correctly (0 for regression)
    delta_abs: np.ndarray  # (L,) sum over rows and units of |d_l|, when asked for; else zeros


class Workspace:
    """Activation and delta buffers for chunks of up to `rows` rows, reused across chunks
    and calls so the hot loop allocates nothing of size rows x width."""

    def __init__(self, spec, rows):
        dt, widths = spec.np_dtype, spec.layers[1:]
        self.spec, self.rows = spec, rows
        self.acts = [np.empty((rows, n), dt) for n in widths]  # a_1..a_L, (rows, n_l)
        self.deltas = [np.empty((rows, n), dt) for n in widths]  # d_1..d_L, (rows, n_l)
        self.scratch = [np.empty((rows, n), dt) for n in widths]  # f'(z_l) per layer
        self.z_out = np.empty((rows, widths[-1]), dt)  # z_L, kept for the loss
        self.grad = np.empty(spec.num_params, dt)  # one chunk's gradient, before adding

    def fits(self, spec, rows):
        return self.spec == spec and rows <= self.rows


def _workspace(spec, rows, workspace):
    return workspace if workspace is not None and workspace.fits(spec, rows) else Workspace(spec, rows)


def forward(spec, params, x, workspace):
    """Forward pass over one chunk x (rows, n_0). Returns [a_1 .. a_L] as views into the
    workspace; a_l is computed in place over z_l, since every f'(z_l) can be had from a_l."""
    loss = _losses.get(spec.loss, spec.output)
    m, acts = len(x), []
    a_prev = x
    layers = views(spec, params)
    for l, (W, b) in enumerate(layers[:-1]):
        z = np.matmul(a_prev, W, out=workspace.acts[l][:m])  # (m, n_l)
        z += b
        a_prev = _activations.get(spec.activations[l]).forward(z)
        acts.append(a_prev)
    W, b = layers[-1]
    z_out = np.matmul(a_prev, W, out=workspace.z_out[:m])
    z_out += b
    acts.append(loss.forward(z_out, out=workspace.acts[-1][:m]))
    return acts


def _backward(spec, params, x, y, acts, workspace, grad, track_deltas):
    """Deltas from the output down, writing a_{l-1}^T d_l and sum(d_l) into `grad` (flat)."""
    loss = _losses.get(spec.loss, spec.output)
    m, L = len(x), spec.num_layers
    param_views, grad_views = views(spec, params), views(spec, grad)
    delta_abs = np.zeros(L)
    delta = loss.delta(acts[-1], y, out=workspace.deltas[-1][:m])  # d_L (m, n_L)
    for l in range(L - 1, -1, -1):  # python index l is layer l + 1
        a_prev = x if l == 0 else acts[l - 1]  # (m, n_in)
        grad_w, grad_b = grad_views[l]
        np.matmul(a_prev.T, delta, out=grad_w)  # (n_in, n_out)
        np.sum(delta, axis=0, out=grad_b)
        if track_deltas:
            delta_abs[l] = np.sum(np.abs(delta), dtype=np.float64)
        if l > 0:
            W = param_views[l][0]
            prev = np.matmul(delta, W.T, out=workspace.deltas[l - 1][:m])  # (m, n_in)
            act = _activations.get(spec.activations[l - 1])
            delta = act.scale_delta(a_prev, prev, workspace.scratch[l - 1][:m])
    return delta_abs


def grad_rows(spec, params, x, y, chunk_rows=None, workspace=None, track_deltas=False, out=None):
    """Gradient SUM over the rows of x (rows, n_0) with targets y, processed in chunks of
    `chunk_rows` rows so activation memory stays bounded. y is (rows,) class indices for
    classification, (rows, n_out) floats for regression. Returns GradSums, whose grad is
    `out` (num_params,) when given: the sum is written there instead of a new array."""
    dtype = spec.np_dtype
    params = np.asarray(params)
    if params.dtype != dtype or params.shape != (spec.num_params,):
        raise ValueError(f"params must be ({spec.num_params},) {dtype}, got {params.shape} {params.dtype}")
    x = np.ascontiguousarray(x, dtype=dtype)
    loss = _losses.get(spec.loss, spec.output)
    n = len(x)
    step = n if not chunk_rows else min(int(chunk_rows), n)
    grad = np.zeros(spec.num_params, dtype) if out is None else out
    loss_sum, correct, delta_abs = 0.0, 0, np.zeros(spec.num_layers)
    if n == 0:
        grad.fill(0)
        return GradSums(grad, 0.0, 0, 0, delta_abs)
    ws = _workspace(spec, step, workspace)
    for start in range(0, n, step):
        xs, ys = x[start : start + step], y[start : start + step]
        acts = forward(spec, params, xs, ws)
        loss_sum += loss.loss_sum(ws.z_out[: len(xs)], acts[-1], ys)
        correct += loss.correct(acts[-1], ys) if loss.classification else 0
        target = grad if start == 0 else ws.grad  # first chunk writes in place, later ones add
        delta_abs += _backward(spec, params, xs, ys, acts, ws, target, track_deltas)
        if start:
            grad += ws.grad
    return GradSums(grad, loss_sum, n, correct, delta_abs)


def predict(spec, params, x, chunk_rows=8192):
    """The output activations a_L (rows, n_out): class probabilities or regression values."""
    x = np.ascontiguousarray(x, dtype=spec.np_dtype)
    n = len(x)
    out = np.empty((n, spec.layers[-1]), spec.np_dtype)
    if n == 0:
        return out
    ws = Workspace(spec, min(chunk_rows, n))
    for start in range(0, n, ws.rows):
        xs = x[start : start + ws.rows]
        out[start : start + len(xs)] = forward(spec, params, xs, ws)[-1]
    return out


def evaluate(spec, params, x, y, chunk_rows=8192):
    """(loss_sum, correct) over the rows of x: the forward pass only."""
    loss = _losses.get(spec.loss, spec.output)
    x = np.ascontiguousarray(x, dtype=spec.np_dtype)
    loss_sum, correct = 0.0, 0
    if len(x) == 0:
        return loss_sum, correct
    ws = Workspace(spec, min(chunk_rows, len(x)))
    for start in range(0, len(x), ws.rows):
        xs, ys = x[start : start + ws.rows], y[start : start + ws.rows]
        a_out = forward(spec, params, xs, ws)[-1]
        loss_sum += loss.loss_sum(ws.z_out[: len(xs)], a_out, ys)
        correct += loss.correct(a_out, ys) if loss.classification else 0
    return loss_sum, correct
