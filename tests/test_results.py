"""What a run reports and writes about its model: the closing summary measures the weights in
model.npz; regression figures (eval, metrics.csv, the summary) match scikit-learn's; predict
with several targets; the standardisation stored in the model; predict CSVs; the warning when
resuming with another worker count."""

import csv
import json
import math
import sys

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from sklearn.metrics import mean_squared_error, r2_score

from distbp import api, faults
from distbp.data import tables, rowmath
from distbp.api import load
from distbp.cli import main
from distbp.run import checkpoint
from distbp.run.model import load_model
from distbp.trainer import Trainer


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_closing_summary_measures_the_saved_weights(ray_session, make_job):
    job = make_job(name="sum", rows=300, train={"steps": 20, "optimizer": {"name": "adam", "lr": 0.05}})
    cli = CliRunner().invoke(main, ["run", str(job)])
    assert cli.exit_code == 0, cli.output
    result = Trainer(load(job), force=True).run()
    assert set(result.final) == {"loss", "accuracy", "seconds"} and all(type(v) is float for v in result.final.values())
    measured = api.evaluate(result.model_path, load(job).data_path())  # one process, on the file
    assert result.final["loss"] == pytest.approx(measured["loss"], rel=1e-12)
    assert result.final["accuracy"] == measured["accuracy"]
    assert result.final["loss"] != pytest.approx(result.last_row["loss"], rel=1e-6)  # the row is before the last update
    line = next(line for line in cli.output.splitlines() if line.startswith("done: "))
    assert line.startswith("done: 20 steps in ") and "; model.npz holds the weights after step 20: " in line
    assert f"loss {measured['loss']:.4f}, accuracy {measured['accuracy']:.4f} -> " in line and line.endswith("model.npz")


def regression_data(path, rows=400, targets=2):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -2.0]
    ys = [np.sin(x[:, 0]) + 0.1 * x[:, 1], x[:, 2] * x[:, 0] * 5][:targets]
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], **{f"y{t}": y for t, y in enumerate(ys)}})
    tables.write_table(table, str(path))
    return x, np.column_stack(ys)


def regression_job(make_job, tmp_path, targets=2, **data_keys):
    regression_data(tmp_path / f"reg{targets}.parquet", targets=targets)
    return make_job(
        name=f"reg{targets}", data={"path": f"reg{targets}.parquet", "label": [f"y{t}" for t in range(targets)], "task": "regression", **data_keys},
        model={"layers": [3, 16, targets], "activation": "tanh", "output": "identity", "loss": "mse", "dtype": "float64"},
        train={"steps": 30, "eval_every": 10, "optimizer": {"name": "adam", "lr": 0.02}},
    )


def test_regression_reports_rmse_and_r2_as_scikit_learn_computes_them(ray_session, make_job, tmp_path):
    job = regression_job(make_job, tmp_path, validation=0.25)
    result = Trainer(load(job)).run()
    rows = read_rows(result.metrics_path)
    assert [r["step"] for r in rows if r["val_r2"]] == ["10", "20", "30"]
    for r in rows:
        if r["val_loss"]:  # rmse over every target value: the mse loss is half the squared error
            assert float(r["val_rmse"]) == pytest.approx(math.sqrt(2 * float(r["val_loss"]) / 2), rel=1e-12)
    model = load_model(result.model_path)
    x, y = regression_data(tmp_path / "again.parquet")
    held_out = rowmath.validation_mask(0, len(x), 0.25, load(job).seed)
    pred = model.predict(x)
    assert pred.shape == (400, 2)
    assert result.final["val_r2"] == pytest.approx(r2_score(y[held_out], pred[held_out], multioutput="variance_weighted"), rel=1e-9)
    assert result.final["val_rmse"] == pytest.approx(math.sqrt(mean_squared_error(y[held_out], pred[held_out])), rel=1e-9)
    assert result.final["r2"] == pytest.approx(r2_score(y[~held_out], pred[~held_out], multioutput="variance_weighted"), rel=1e-9)
    out = CliRunner().invoke(main, ["eval", result.model_path, str(tmp_path / "again.parquet"), "--json"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output)
    assert list(figures) == ["rows", "loss", "mse", "rmse", "r2"]
    assert figures["mse"] == pytest.approx(mean_squared_error(y, pred), rel=1e-9) == pytest.approx(figures["loss"] * 2 / 2)
    assert figures["rmse"] == pytest.approx(math.sqrt(figures["mse"]), rel=1e-12)
    assert figures["r2"] == pytest.approx(r2_score(y, pred, multioutput="variance_weighted"), rel=1e-9)


def test_predict_writes_one_column_per_regression_target(ray_session, make_job, tmp_path):
    result = Trainer(load(regression_job(make_job, tmp_path))).run()
    x, _ = regression_data(tmp_path / "rows.parquet")
    out = tmp_path / "pred.csv"
    cli = CliRunner().invoke(main, ["predict", result.model_path, str(tmp_path / "rows.parquet"), "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    lines = out.read_text().splitlines()
    assert lines[0] == "prediction_y0,prediction_y1"  # no quotes
    got = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert np.array_equal(got, load_model(result.model_path).predict(x))  # shortest repr: exact round trip


def test_one_regression_target_predicts_shape_rows(ray_session, make_job, tmp_path):
    result = Trainer(load(regression_job(make_job, tmp_path, targets=1))).run()
    x, _ = regression_data(tmp_path / "rows.parquet", targets=1)
    assert load_model(result.model_path).predict(x).shape == (400,)


def test_the_model_stores_the_training_rows_mean_and_std(ray_session, make_job, tmp_path):
    job = make_job(name="std", rows=300, data={"validation": 0.2})
    result = Trainer(load(job)).run()
    source = tables.open_source(load(job).data_path())
    x = tables.features_to_numpy(source.read_rows(0, 300), ["x0", "x1"], np.float64)
    train = ~rowmath.validation_mask(0, 300, 0.2, load(job).seed)
    with np.load(result.model_path) as z:
        assert z["x_mean"] == pytest.approx(x[train].mean(axis=0), rel=1e-12)
        assert z["x_std"] == pytest.approx(x[train].std(axis=0), rel=1e-12)  # population std of the training rows only
        assert not np.allclose(z["x_std"], x.std(axis=0), rtol=1e-9)
    plain = Trainer(load(job, ["data.standardize=false", f"output.dir={tmp_path / 'plain'}"])).run()
    with np.load(plain.model_path) as z:
        assert "x_mean" not in z.files and "x_std" not in z.files


def test_predict_csv_quotes_only_what_needs_quotes(ray_session, make_job, tmp_path):
    path = tmp_path / "names.parquet"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2))
    names = np.array(["plain", "with, comma", 'with "quote"'])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1)]
    tables.write_table(pa.table({"x0": x[:, 0], "x1": x[:, 1], "label": names}), str(path))
    job = make_job(name="names", data={"path": str(path)})
    result = Trainer(load(job)).run()
    out = tmp_path / "p.csv"
    assert CliRunner().invoke(main, ["predict", result.model_path, str(path), "-o", str(out)]).exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == 'prediction,proba_plain,"proba_with ""quote""","proba_with, comma"'
    assert any(line.startswith("plain,") for line in lines[1:])  # a plain string goes bare
    with open(out, newline="") as f:
        back = list(csv.DictReader(f))
    assert {r["prediction"] for r in back} <= set(names)


def test_resuming_with_another_worker_count_warns_even_when_quiet(ray_session, make_job, tmp_path, monkeypatch):
    job = make_job(name="rw", rows=200, train={"steps": 9, "checkpoint_every": 3})
    faults._fired.clear()
    monkeypatch.setenv(faults.ENV, "checkpoint_write@6")  # stops after step 6, with the checkpoint of step 3
    assert CliRunner().invoke(main, ["run", str(job), "--quiet"]).exit_code == 1
    monkeypatch.delenv(faults.ENV)
    resumed = CliRunner().invoke(main, ["run", str(job), "--resume", "--workers", "1", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    lines = resumed.output.splitlines()
    assert "warning: resuming with 1 worker instead of 2: results will differ within float tolerance" in lines
    assert not any(line.startswith(("step ", "resuming ")) for line in lines)  # quiet: no status, no progress
    assert lines[-1].startswith("done: 9 steps")  # the last line: the job draws no plot


def test_python_api_errors_name_the_api_s_own_arguments(ray_session, make_job):
    import distbp

    job = str(make_job(name="again", rows=60, train={"steps": 3}))
    distbp.train(job)
    with pytest.raises(distbp.UsageError) as refused:
        distbp.train(job)
    text = str(refused.value)
    assert "already holds a run" in text and "resume=True" in text and "force=True" in text and "output__dir=" in text
    assert "--" not in text
    assert distbp.train(job, resume=True).already_finished


def test_resume_names_the_set_values_the_run_was_started_with(ray_session, make_job, tmp_path, monkeypatch):
    job = make_job(name="rs", rows=120, train={"steps": 9, "checkpoint_every": 3})
    faults._fired.clear()
    monkeypatch.setenv(faults.ENV, "checkpoint_write@6")
    assert CliRunner().invoke(main, ["run", str(job), "--set", "train.steps=12", "--quiet"]).exit_code == 1
    monkeypatch.delenv(faults.ENV)
    refused = CliRunner().invoke(main, ["run", str(job), "--resume"])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "train.steps is 9 here, 12 in the run (--set train.steps=12)" in refused.output
    resumed = CliRunner().invoke(main, ["run", str(job), "--resume", "--set", "train.steps=12"])
    assert resumed.exit_code == 0 and "resuming " in resumed.output and "from the checkpoint of step 3" in resumed.output


def test_a_model_changed_after_it_was_written_is_refused_by_every_command(tmp_path, monkeypatch):
    from distbp.backprop import nn
    from distbp.run import checkpoint
    from distbp.run.model import Model, load_model

    monkeypatch.chdir(tmp_path)
    spec = nn.Spec([2, 3], (), "softmax", "cross_entropy", "xavier", "float32")
    Model(spec, nn.init_params(spec, np.random.default_rng(0)), "classification", ["x0", "x1"], ["label"], [0, 1, 2]).save("model.npz")
    with np.load("model.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays[checkpoint.DIGEST] == checkpoint.digest(arrays)
    load_model("model.npz")  # as written: accepted
    arrays["W1"] = arrays["W1"] * 2
    np.savez("model.npz", **arrays)
    (tmp_path / "d.csv").write_text("x0,x1,label\n0.1,0.2,1\n")
    for args in (["eval", "model.npz", "d.csv"], ["predict", "model.npz", "d.csv", "-o", "p.csv"], ["export", "model.npz", "-o", "m.onnx"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.output.strip().splitlines() == [
            "error: model.npz: its arrays do not match the SHA-256 digest distbp wrote with them (the file was changed after it was written)"
        ], (args, result.output)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()
    del arrays[checkpoint.DIGEST]  # a model written before digests: read as it is
    np.savez("model.npz", **arrays)
    assert load_model("model.npz").params.shape == (spec.num_params,)


@pytest.mark.parametrize("args, needle", [
    (["data", "make", "xor", "-o", "x.csv"], "--rows: data make xor needs the number of rows"),
    (["plot", "nothere"], "nothere: no such run folder"),
    (["eval", "notes.txt", "d.csv"], "notes.txt: not a distbp model.npz (not an npz file)"),
    (["eval", "model.npz", "missing.parquet"], "missing.parquet"),
])
def test_small_mistakes_get_a_line_that_names_what_was_given(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model\n")
    from distbp.backprop import nn
    from distbp.run.model import Model

    spec = nn.Spec([2, 3], (), "softmax", "cross_entropy", "xavier", "float32")
    Model(spec, nn.init_params(spec, np.random.default_rng(0)), "classification", ["x0", "x1"], ["label"], [0, 1, 2]).save(str(tmp_path / "model.npz"))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and needle in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data.path" not in lines[0] and "pickle" not in lines[0]
    assert not (tmp_path / "x.csv").exists()


def test_metrics_df_without_pandas_says_what_to_install(tmp_path, monkeypatch):
    from distbp.errors import UsageError
    from distbp.run.outputs import RunResult

    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.25\n")
    result = RunResult(str(tmp_path), None, None, 2)
    assert result.metrics_df["loss"].tolist() == [0.5, 0.25]  # pandas is in the test extra
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed: import fails
    with pytest.raises(UsageError, match=r"^result.metrics_df needs pandas, which is not installed \(pip install pandas, or use result.metrics"):
        result.metrics_df
    assert result.metrics.column("step").to_pylist() == [1, 2]


def foreign_files(folder):
    """Files another tool left where distbp keeps checkpoints and TensorBoard events."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "tb").mkdir(exist_ok=True)
    (folder / "checkpoints" / "model_epoch_90.pt").write_bytes(b"torch")
    (folder / "tb" / "events.out").write_bytes(b"theirs")
    return {p: p.read_bytes() for p in [folder / "checkpoints" / "model_epoch_90.pt", folder / "tb" / "events.out"]}


def test_force_refuses_a_folder_that_holds_no_distbp_run(make_job, tmp_path):
    job = make_job(name="f1")
    out = tmp_path / "theirs"
    kept = foreign_files(out)
    result = CliRunner().invoke(main, ["run", str(job), "--out", str(out), "--force"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {out}: holds checkpoints, tb but no job.yaml of a distbp run; --force replaces only a run distbp wrote (choose another folder with --out)"
    assert {p: p.read_bytes() for p in kept} == kept and sorted(p.name for p in out.iterdir()) == ["checkpoints", "tb"]


def test_force_replaces_a_run_but_keeps_what_distbp_did_not_write(ray_session, make_job, tmp_path):
    job = make_job(name="f2", train={"steps": 6, "checkpoint_every": 2}, output={"tensorboard": True})
    first = Trainer(load(job)).run()
    out = tmp_path / "runs" / "f2"
    kept = foreign_files(out)
    old_events = sorted((out / "tb").glob("events.out.tfevents.*"))
    assert old_events and checkpoint.list_steps(str(out / "checkpoints")) == [2, 4, 6]
    second = Trainer(load(job, ["train.steps=3", "train.checkpoint_every=10"]), force=True).run()
    assert second.steps == 3 and first.steps == 6
    assert checkpoint.list_steps(str(out / "checkpoints")) == [3]  # the old run's checkpoints are gone
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # its event files too: only the new run's
    assert {p: p.read_bytes() for p in kept} == kept  # the other tool's files stay


@pytest.mark.parametrize("command", ["export", "plot"])
def test_a_file_that_cannot_be_written_is_named_in_one_line(tmp_path, monkeypatch, command):
    """/proc takes no new file, even as root: the write fails where a full disk would."""
    from distbp.backprop import nn
    from distbp.run.model import Model

    monkeypatch.chdir(tmp_path)
    spec = nn.Spec([2, 3], (), "softmax", "cross_entropy", "xavier", "float32")
    Model(spec, nn.init_params(spec, np.random.default_rng(0)), "classification", ["x0", "x1"], ["label"], [0, 1, 2]).save("model.npz")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,loss,seconds,lr\n1,0.7,0.01,0.1\n2,0.5,0.02,0.1\n")
    target = "/proc/distbp-test.onnx" if command == "export" else "/proc/distbp-test.png"
    args = ["export", "model.npz", "-o", target] if command == "export" else ["plot", "run", "-o", target]
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: cannot write {target}: ") and lines[0].endswith("(a file already there is kept as it was)"), lines
