"""distbp export: the ONNX file, run in ONNX Runtime on fresh rows, gives what `distbp predict`
gives, for each activation, output and dtype; string classes; bad input in one line."""

import csv

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from distbp.backprop import activations, nn
from distbp.data import tables
from distbp.api import load
from distbp.cli import main
from distbp.run.model import Model, load_model
from distbp.trainer import Trainer

TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-14)}


def tolerance(model, x, dtype, want):
    """How far ONNX Runtime's outputs may be from `want`, distbp's, elementwise: TOL[dtype]'s
    atol, plus its rtol times both the output and the magnitude of what the last layer summed
    (|a| |W| + |b|, through the output function's slope). A sum is rounded relative to its
    terms, so where they cancel to near 0, two correct implementations (ONNX Runtime's and
    numpy's, with whatever BLAS kernel it runs) differ by more than rtol times the result."""
    spec = model.spec
    a = (x.astype(dtype).astype(np.float64) - model.x_mean) / model.x_std
    layers = nn.views(spec, model.params.astype(np.float64))
    for name, (W, b) in zip(spec.activations, layers[:-1]):
        a = activations.get(name).forward(a @ W + b)
    W, b = layers[-1]
    terms = np.abs(a) @ np.abs(W) + np.abs(b)
    z = a @ W + b
    if spec.output == "identity":
        scale = terms
    elif spec.output == "sigmoid":  # slope at most 1/4; both columns, P(class 1) and 1 - it
        scale = np.hstack([terms, terms]) / 4
    else:  # softmax: a change d in z moves p_i by at most 2 p_i max|d|
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        scale = 2 * p * terms.max(axis=1, keepdims=True)
    return TOL[dtype]["atol"] + TOL[dtype]["rtol"] * (np.abs(want) + scale)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def made_model(activation, output, dtype, classes=(0, 1, 2), seed=0):
    """A model.npz as distbp writes it, with random weights and standardisation."""
    rng = np.random.default_rng(seed)
    n_out = {"softmax": len(classes), "sigmoid": 1, "identity": 2}[output]
    loss = {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy", "identity": "mse"}[output]
    spec = nn.Spec([4, 7, 5, n_out], activation, output, loss, "xavier", dtype)
    params = nn.init_params(spec, rng) * 3
    task = "regression" if output == "identity" else "classification"
    labels = ["t0", "t1"] if task == "regression" else ["label"]
    return Model(spec, params, task, [f"f{i}" for i in range(4)], labels, list(classes) if task == "classification" else [],
                 rng.normal(size=4) * 5, rng.uniform(0.5, 3, size=4))


def fresh_rows(rows=200, seed=1):
    return np.random.default_rng(seed).normal(size=(rows, 4)) * 4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("output", ["softmax", "sigmoid", "identity"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
def test_onnx_runtime_matches_predict(tmp_path, activation, output, dtype):
    classes = (0, 1) if output == "sigmoid" else (0, 1, 2)
    model = made_model(activation, output, dtype, classes)
    model.save(str(tmp_path / "model.npz"))
    cli = CliRunner().invoke(main, ["export", str(tmp_path / "model.npz"), "-o", str(tmp_path / "model.onnx")])
    assert cli.exit_code == 0, cli.output
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    x = fresh_rows()
    saved = load_model(str(tmp_path / "model.npz"))
    got = session(tmp_path / "model.onnx").run(None, {"X": x.astype(dtype)})
    if output == "identity":
        (pred,) = got
        assert pred.dtype == np.dtype(dtype) and pred.shape == (200, 2)
        want = saved.predict(x)
        np.testing.assert_array_less(np.abs(pred - want), tolerance(saved, x, dtype, want))
        return
    label, proba = got
    want = saved.predict_proba(x)
    assert proba.dtype == np.dtype(dtype) and proba.shape == (200, len(classes)) and label.shape == (200,)
    np.testing.assert_array_less(np.abs(proba - want), tolerance(saved, x, dtype, want))
    clear = np.sort(want, axis=1)[:, -1] - np.sort(want, axis=1)[:, -2] > 1e-4  # not a near tie
    assert np.array_equal(label[clear], saved.predict(x)[clear])


@pytest.mark.parametrize("output", ["softmax", "sigmoid", "identity"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
def test_the_tolerance_still_tells_a_weight_off_by_one_part_in_ten_thousand(activation, output):
    """The comparison above is not loose: in float64, outputs computed with the first weight
    changed by 1e-4 of its size fall outside it somewhere."""
    model = made_model(activation, output, "float64", (0, 1) if output == "sigmoid" else (0, 1, 2))
    x = fresh_rows()
    want = model.predict_proba(x)
    params = model.params.copy()
    params[0] *= 1 + 1e-4
    wrong = nn.predict(model.spec, params, model.standardized(x))
    if output == "sigmoid":
        wrong = np.hstack([1 - wrong, wrong])
    assert np.any(np.abs(wrong - want) >= tolerance(model, x, "float64", want))


def test_a_trained_model_with_string_classes_exports_its_labels(ray_session, make_job, tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(3)
    x = rng.normal(size=(240, 2))
    names = np.array(["cat", "dog", "emu"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)]
    path = tmp_path / "animals.parquet"
    tables.write_table(pa.table({"x0": x[:, 0], "x1": x[:, 1], "label": names}), str(path))
    job = make_job(name="animals", data={"path": str(path)}, model={"layers": [2, 8, 3], "dtype": "float32"}, train={"steps": 30})
    result = Trainer(load(job)).run()
    out = tmp_path / "animals.onnx"
    assert CliRunner().invoke(main, ["export", result.model_path, "-o", str(out)]).exit_code == 0
    fresh = tmp_path / "fresh.csv"
    rows = np.random.default_rng(9).normal(size=(50, 2))
    tables.write_table(pa.table({"x0": rows[:, 0], "x1": rows[:, 1]}), str(fresh))
    assert CliRunner().invoke(main, ["predict", result.model_path, str(fresh), "-o", str(tmp_path / "p.csv")]).exit_code == 0
    with open(tmp_path / "p.csv", newline="") as f:
        predicted = list(csv.DictReader(f))
    label, proba = session(out).run(None, {"X": rows.astype(np.float32)})
    assert [s for s in label] == [r["prediction"] for r in predicted]
    np.testing.assert_allclose(proba, [[float(r[f"proba_{c}"]) for c in ("cat", "dog", "emu")] for r in predicted], **TOL["float32"])
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["X"] and [o.name for o in graph.output] == ["label", "probabilities"]


@pytest.mark.parametrize("bad, needle", [
    (b"not a zip", "not a distbp model.npz"),
    ("format", "unsupported model format_version 9"),
])
def test_a_file_that_is_not_a_distbp_model_is_refused_in_one_line(tmp_path, bad, needle):
    path = tmp_path / "model.npz"
    if bad == "format":
        made_model("tanh", "softmax", "float32").save(str(path))
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["spec"] = np.array(str(arrays["spec"]).replace('"format_version": 1', '"format_version": 9'))
        np.savez(path, **arrays)
    else:
        path.write_bytes(bad)
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
