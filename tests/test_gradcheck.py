import numpy as np

from distbp.backprop import gradcheck, nn


def test_gradcheck_passes_on_a_correct_engine_and_samples_large_layers():
    spec = nn.Spec((30, 20, 10, 3), "relu", dtype="float32")
    report = gradcheck.gradcheck(spec, rows=16, per_layer=40)
    assert [(l, n) for l, n, _ in report] == [(1, 40), (2, 40), (3, 33)]
    assert all(err < gradcheck.TOLERANCE for _, _, err in report)


def test_gradcheck_catches_a_wrong_derivative(monkeypatch):
    # Break tanh's derivative (drop the square): the check must notice.
    from distbp.backprop import activations

    def wrong(self, a, delta, scratch):
        delta *= 1 - a
        return delta

    monkeypatch.setattr(activations.Tanh, "scale_delta", wrong)
    report = gradcheck.gradcheck(nn.Spec((4, 6, 5, 2), "tanh"), rows=8)
    assert report[-1][2] < gradcheck.TOLERANCE  # the output layer needs no hidden derivative
    assert max(err for _, _, err in report[:-1]) > 1e-3


def test_relative_error_definition():
    g = np.array([3.0, 4.0])
    assert gradcheck.relative_error(g, g) == 0.0
    assert gradcheck.relative_error(g, np.zeros(2)) == 1.0
    assert gradcheck.relative_error(np.zeros(2), np.zeros(2)) == 0.0
