"""The backprop engine against its oracles: finite differences, the per-example loop, partitions."""

import numpy as np
import pytest

from distbp.backprop import nn

HIDDEN = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]
PAIRS = [("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy"), ("identity", "mse")]


def make_problem(layers, activation, output, loss, rows=12, seed=0, dtype="float64"):
    """A spec at a generic point: random weights AND non-zero biases (no unit on a ReLU kink)."""
    rng = np.random.default_rng(seed)
    if output == "sigmoid":
        layers = (*layers[:-1], 1)
    spec = nn.Spec(layers, activation, output, loss, dtype=dtype)
    params = nn.init_params(spec, rng)
    for _, b in nn.views(spec, params):
        b[...] = rng.normal(0, 0.5, size=b.shape)
    x = rng.normal(size=(rows, layers[0]))
    if output == "identity":
        y = rng.normal(size=(rows, layers[-1]))
    else:
        y = rng.integers(0, max(layers[-1], 2), size=rows)
    return spec, params, x, y


def loss_of(spec, params, x, y):
    return nn.grad_rows(spec, params, x, y).loss_sum


def central_differences(spec, params, x, y, h=1e-6):
    g = np.empty_like(params)
    for i in range(len(params)):
        p = params.copy()
        p[i] += h
        up = loss_of(spec, p, x, y)
        p[i] -= 2 * h
        g[i] = (up - loss_of(spec, p, x, y)) / (2 * h)
    return g


def rel_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", HIDDEN)
def test_gradient_matches_finite_differences(activation, output, loss):
    spec, params, x, y = make_problem((4, 5, 4, 3), activation, output, loss)
    analytic = nn.grad_rows(spec, params, x, y).grad
    assert rel_error(analytic, central_differences(spec, params, x, y)) < 1e-6


def test_mixed_activations_per_layer_match_finite_differences():
    spec, params, x, y = make_problem((3, 6, 5, 4, 2), ["relu", "sigmoid", "tanh"], "softmax", "cross_entropy")
    analytic = nn.grad_rows(spec, params, x, y).grad
    assert rel_error(analytic, central_differences(spec, params, x, y)) < 1e-6


def per_example_gradient(spec, params, x, y):
    """The algorithm written literally, one example at a time, from scratch: no shared code."""
    Ws = [W for W, _ in nn.views(spec, params)]
    bs = [b for _, b in nn.views(spec, params)]
    f = {
        "sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
        "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
        "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
        "leaky_relu": (lambda z: np.where(z > 0, z, 0.01 * z), lambda z: np.where(z > 0, 1.0, 0.01)),
        "identity": (lambda z: z, lambda z: np.ones_like(z)),
    }
    total = np.zeros_like(params)
    for xi, yi in zip(x, y):
        activations, zs = [xi], []
        for l, (W, b) in enumerate(zip(Ws, bs)):
            z = activations[-1] @ W + b
            zs.append(z)
            if l < len(Ws) - 1:
                activations.append(f[spec.activations[l]][0](z))
            elif spec.output == "softmax":
                e = np.exp(z - z.max())
                activations.append(e / e.sum())
            elif spec.output == "sigmoid":
                activations.append(1 / (1 + np.exp(-z)))
            else:
                activations.append(z)
        if spec.output == "softmax":
            target = np.eye(len(zs[-1]))[yi]
        elif spec.output == "sigmoid":
            target = np.array([float(yi)])
        else:
            target = yi
        delta = activations[-1] - target
        grad_w, grad_b = [None] * len(Ws), [None] * len(Ws)
        for l in range(len(Ws) - 1, -1, -1):
            grad_w[l] = np.outer(activations[l], delta)
            grad_b[l] = delta
            if l > 0:
                delta = (Ws[l] @ delta) * f[spec.activations[l - 1]][1](zs[l - 1])
        total += np.concatenate([np.concatenate([gw.ravel(), gb]) for gw, gb in zip(grad_w, grad_b)])
    return total


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", HIDDEN)
def test_matrix_form_equals_per_example_loop(activation, output, loss):
    spec, params, x, y = make_problem((5, 7, 6, 4), activation, output, loss, rows=30, seed=1)
    got = nn.grad_rows(spec, params, x, y).grad
    want = per_example_gradient(spec, params, x, y)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("cuts", [[50], [1, 99], [13, 40, 41, 77], [33, 66], [0, 0, 100]])
def test_gradient_of_rows_is_sum_over_any_partition(cuts):
    spec, params, x, y = make_problem((6, 8, 8, 3), "tanh", "softmax", "cross_entropy", rows=100, seed=2)
    whole = nn.grad_rows(spec, params, x, y)
    bounds = [0, *cuts, 100]
    parts = [nn.grad_rows(spec, params, x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    np.testing.assert_allclose(sum(p.grad for p in parts), whole.grad, rtol=1e-12, atol=1e-13)
    assert sum(p.loss_sum for p in parts) == pytest.approx(whole.loss_sum, rel=1e-12)
    assert sum(p.count for p in parts) == whole.count == 100
    assert sum(p.correct for p in parts) == whole.correct


def test_chunking_does_not_change_the_gradient():
    spec, params, x, y = make_problem((6, 9, 7, 4), "relu", "softmax", "cross_entropy", rows=100, seed=3)
    results = [nn.grad_rows(spec, params, x, y, chunk_rows=c, track_deltas=True) for c in (7, 64, None)]
    for r in results[:-1]:
        np.testing.assert_allclose(r.grad, results[-1].grad, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(r.delta_abs, results[-1].delta_abs, rtol=1e-12)
        assert r.loss_sum == pytest.approx(results[-1].loss_sum, rel=1e-12)
        assert r.correct == results[-1].correct


def test_workspace_reuse_gives_the_same_bits():
    spec, params, x, y = make_problem((6, 9, 4), "tanh", "softmax", "cross_entropy", rows=50, seed=4)
    ws = nn.Workspace(spec, 16)
    first = nn.grad_rows(spec, params, x, y, chunk_rows=16, workspace=ws).grad.copy()
    nn.grad_rows(spec, params, x[:5], y[:5], chunk_rows=16, workspace=ws)  # dirty the buffers
    again = nn.grad_rows(spec, params, x, y, chunk_rows=16, workspace=ws).grad
    assert np.array_equal(first, again)


def test_views_alias_the_flat_buffer_in_layout_order():
    spec = nn.Spec((3, 4, 2), "tanh")
    flat = np.arange(spec.num_params, dtype=np.float32)
    (W1, b1), (W2, b2) = nn.views(spec, flat)
    assert (W1.shape, b1.shape, W2.shape, b2.shape) == ((3, 4), (4,), (4, 2), (2,))
    assert W1[0, 1] == 1 and b1[0] == 12 and W2[0, 0] == 16 and b2[-1] == spec.num_params - 1
    W2[...] = -1
    assert (flat[16:24] == -1).all()
    assert spec.num_params == 3 * 4 + 4 + 4 * 2 + 2


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("activation", HIDDEN)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_huge_preactivations_stay_finite(activation, output, loss, dtype):
    spec, params, x, y = make_problem((3, 4, 3), activation, output, loss, rows=8, seed=5, dtype=dtype)
    params = params.astype(spec.np_dtype)
    for W, b in nn.views(spec, params):
        W[...] = np.sign(W) * 1e2
        b[...] = np.where(np.arange(b.size) % 2, 1e4, -1e4)
    x = np.where(np.arange(x.size).reshape(x.shape) % 2, 1e2, -1e2)
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):  # underflow to 0 is benign
        result = nn.grad_rows(spec, params, x, y)
    assert np.isfinite(result.loss_sum)
    assert np.all(np.isfinite(result.grad))


def test_softmax_loss_at_extreme_logits_is_exact():
    spec = nn.Spec((1, 2), (), "softmax", "cross_entropy", dtype="float64")
    params = np.array([0.0, 0.0, 1e4, -1e4])  # z = (1e4, -1e4) for every row
    result = nn.grad_rows(spec, params, np.zeros((2, 1)), np.array([0, 1]))
    assert result.loss_sum == pytest.approx(2e4)  # row 0 costs 0, row 1 costs 2e4


def test_predict_matches_forward_of_the_gradient_path():
    spec, params, x, y = make_problem((4, 6, 3), "tanh", "softmax", "cross_entropy", rows=40, seed=6)
    proba = nn.predict(spec, params, x, chunk_rows=7)
    assert proba.shape == (40, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    correct = int(np.count_nonzero(proba.argmax(axis=1) == y))
    assert correct == nn.grad_rows(spec, params, x, y).correct


def test_float32_gradient_tracks_float64():
    spec64, params, x, y = make_problem((8, 16, 16, 4), "tanh", "softmax", "cross_entropy", rows=64, seed=7)
    spec32 = nn.Spec(spec64.layers, spec64.activations, dtype="float32")
    g64 = nn.grad_rows(spec64, params, x, y).grad
    g32 = nn.grad_rows(spec32, params.astype(np.float32), x, y).grad
    assert g32.dtype == np.float32
    assert rel_error(g32.astype(np.float64), g64) < 1e-5


def test_init_is_seeded_and_shaped_by_scheme():
    spec = nn.Spec((400, 300, 10), "relu", init="he", dtype="float64")
    a = nn.init_params(spec, np.random.default_rng(0))
    assert np.array_equal(a, nn.init_params(spec, np.random.default_rng(0)))
    W1 = nn.views(spec, a)[0][0]
    assert W1.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    xavier = nn.Spec((400, 300, 10), "tanh", init="xavier")
    W1x = nn.views(xavier, nn.init_params(xavier, np.random.default_rng(0)))[0][0]
    assert np.abs(W1x).max() <= np.sqrt(6 / 700)
    assert all((b == 0).all() for _, b in nn.views(spec, a))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layers=(3,), activations=()),
        dict(layers=(3, 0, 2), activations="tanh"),
        dict(layers=(3, 4, 2), activations="swish"),
        dict(layers=(3, 4, 2), activations=("tanh", "tanh")),
        dict(layers=(3, 4, 2), activations="tanh", output="softmax", loss="mse"),
        dict(layers=(3, 4, 2), activations="tanh", output="sigmoid", loss="binary_cross_entropy"),
        dict(layers=(3, 4, 2), activations="tanh", dtype="float16"),
    ],
)
def test_bad_specs_are_refused(kwargs):
    with pytest.raises((ValueError, KeyError)):
        nn.Spec(**kwargs)


def test_param_slices_cover_the_vector_once_as_the_row_shards_do():
    from distbp.data import rowmath

    for n, S in [(1, 1), (10, 3), (528_138, 3), (7, 7), (10**9 + 3, 8)]:
        slices = nn.param_slices(n, S)
        assert slices[0][0] == 0 and slices[-1][1] == n and all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1
        assert slices == rowmath.shard_ranges(n, S)  # the cut checkpoints of earlier versions were made with
    for n, S in [(3, 4), (5, 0)]:
        with pytest.raises(ValueError, match="at most one per parameter"):
            nn.param_slices(n, S)
