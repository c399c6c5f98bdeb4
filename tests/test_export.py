"""distbp export: the ONNX file, run in ONNX Runtime on fresh rows, gives what `distbp predict`
gives, for each activation, output and dtype; string classes; bad input in one line."""

import csv

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from distbp.backprop import nn
from distbp.data import tables
from distbp.api import load
from distbp.cli import main
from distbp.run.model import Model, load_model
from distbp.trainer import Trainer

TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-14)}


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
        np.testing.assert_allclose(pred, saved.predict(x), **TOL[dtype])
        return
    label, proba = got
    want = saved.predict_proba(x)
    assert proba.dtype == np.dtype(dtype) and proba.shape == (200, len(classes)) and label.shape == (200,)
    np.testing.assert_allclose(proba, want, **TOL[dtype])
    clear = np.sort(want, axis=1)[:, -1] - np.sort(want, axis=1)[:, -2] > 1e-4  # not a near tie
    assert np.array_equal(label[clear], saved.predict(x)[clear])


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
