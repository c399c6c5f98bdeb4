"""Each optimizer's first three steps on f(w) = w^2 (gradient 2w), from w = 1, lr = 0.1,
against values derived by hand (see the comments)."""

import numpy as np
import pytest

from distbp.backprop import optim

HAND_DERIVED = {
    # w <- w - 0.1 * 2w = 0.8 w
    "sgd": [0.8, 0.64, 0.512],
    # v = 0.9 v + g: v1 = 2, v2 = 1.8 + 1.6 = 3.4, v3 = 3.06 + 0.92 = 3.98; w -= 0.1 v
    "momentum": [0.8, 0.46, 0.062],
    # same v; w -= 0.1 (g + 0.9 v): 3.8, 1.24 + 2.736, 0.4448 + 2.86272
    "nesterov": [0.62, 0.2224, -0.108352],
    # m1 = 0.2, v1 = 0.004 -> m_hat = 2, v_hat = 4 -> w1 = 1 - 0.1 * 2 / (2 + 1e-8), then on
    "adam": [0.9000000005, 0.8004122286917928, 0.7015862729460303],
}


def run(name, steps=3, weight_decay=0.0, w0=1.0, dtype=np.float64, **kw):
    opt = optim.make(name, weight_decay=weight_decay, **kw)
    w = np.array([w0], dtype)
    state = opt.init_state(1, dtype)
    out = []
    for _ in range(steps):
        opt.step(w, 2 * w, state, lr=0.1)
        out.append(float(w[0]))
    return out, state


@pytest.mark.parametrize("name", sorted(HAND_DERIVED))
def test_first_three_steps_match_hand_derivation(name):
    got, _ = run(name)
    assert got == pytest.approx(HAND_DERIVED[name], rel=1e-12, abs=1e-15)


def test_weight_decay_adds_to_the_gradient():
    # g = 2w + 0.5 w = 2.5 w, so sgd scales w by 0.75 each step
    got, _ = run("sgd", weight_decay=0.5)
    assert got == pytest.approx([0.75, 0.5625, 0.421875], rel=1e-12)
    # momentum: v1 = 2.5, w1 = 0.75; v2 = 2.25 + 1.875 = 4.125, w2 = 0.3375
    got, _ = run("momentum", steps=2, weight_decay=0.5)
    assert got == pytest.approx([0.75, 0.3375], rel=1e-12)
    got, _ = run("adam", weight_decay=0.5)
    assert got == pytest.approx([0.9000000003999999, 0.8004122284876838, 0.7015862726343534], rel=1e-12)


def test_state_is_flat_arrays_and_elementwise_slices_agree():
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=10), rng.normal(size=10)
    for name in HAND_DERIVED:
        opt = optim.make(name)
        whole, whole_state = w.copy(), opt.init_state(10, np.float64)
        opt.step(whole, g.copy(), whole_state, lr=0.05)
        assert all(isinstance(v, np.ndarray) and v.ndim == 1 for v in whole_state.values())
        left, right = w[:4].copy(), w[4:].copy()  # two "parameter actors"
        s1, s2 = opt.init_state(4, np.float64), opt.init_state(6, np.float64)
        opt.step(left, g[:4].copy(), s1, lr=0.05)
        opt.step(right, g[4:].copy(), s2, lr=0.05)
        assert np.array_equal(np.concatenate([left, right]), whole), name


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_a_step_taken_a_part_at_a_time_has_the_bits_of_a_whole_step(name):
    """How a parameter actor steps its slice while the rest of the gradient is still coming in:
    `begin` once, then `update` per part, here in no particular order. Over several steps the
    weights and state are those of whole steps, to the bit (Adam's step count moves once a step)."""
    rng = np.random.default_rng(1)
    opt = optim.make(name, weight_decay=0.01)
    w = rng.normal(size=1000).astype(np.float32)
    whole, whole_state = w.copy(), opt.init_state(1000, np.float32)
    parted, parted_state = w.copy(), opt.init_state(1000, np.float32)
    cuts = [(0, 128), (512, 1000), (128, 300), (300, 512)]
    for _ in range(5):
        g = rng.normal(size=1000).astype(np.float32)
        opt.step(whole, g.copy(), whole_state, lr=0.01)
        opt.begin(parted_state)
        scratch = g.copy()
        for a, b in cuts:
            opt.update(parted[a:b], scratch[a:b], parted_state, 0.01, slice(a, b))
    assert np.array_equal(parted, whole)
    assert all(np.array_equal(parted_state[k], whole_state[k]) for k in whole_state)


def test_unknown_optimizer_is_refused():
    with pytest.raises(KeyError):
        optim.make("rmsprop")
