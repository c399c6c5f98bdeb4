"""Bad input: a bad job file, bad data or a bad argument exits 2 with one line that names
the file, the dotted key or the column, and leaves an existing run folder byte-for-byte
unchanged, even under --force. Plus a fuzzer over mutated job files."""

import copy
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbp.data import tables, rowmath, datasets
from distbp.api import load
from distbp.cli import main
from distbp.errors import UsageError
from distbp.data.job import Job, load_job
from distbp.trainer import Trainer

from conftest import model_arrays

ROWS = 60


def base_job(data_path, out_dir, **sections):
    """A tiny valid job: 2 features, 3 classes, a few SGD steps on 2 workers."""
    job = {
        "name": "bad",
        "seed": 3,
        "data": {"path": str(data_path), "label": "label"},
        "model": {"layers": [2, 8, 3], "activation": "tanh", "dtype": "float64"},
        "train": {"steps": 4, "optimizer": {"name": "sgd", "lr": 0.5}, "eval_every": 2, "checkpoint_every": 2},
        "cluster": {"workers": 2, "chunk_rows": 64},
        "output": {"dir": str(out_dir)},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def spirals_table(rows=ROWS):
    return datasets.make_dataset("spirals", rows, seed=1, classes=3)


def snapshot(folder):
    """{relative path: bytes} of every file, and None for every folder, under `folder`."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return found


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """One finished run (job.yaml, metrics.csv, model.npz, checkpoints/), made once."""
    root = tmp_path_factory.mktemp("finished")
    tables.write_table(spirals_table(), str(root / "spirals.parquet"), row_group_size=16)
    job_path = root / "good.yaml"
    job_path.write_text(yaml.safe_dump(base_job(root / "spirals.parquet", root / "run")))
    Trainer(load(job_path)).run()
    assert {"job.yaml", "metrics.csv", "model.npz", "checkpoints"} <= set(os.listdir(root / "run"))
    return root


class Bench:
    """A copy of the finished run at tmp_path/run, its snapshot, and ways to run bad jobs at it."""

    def __init__(self, finished, tmp_path):
        self.tmp = tmp_path
        self.data = finished / "spirals.parquet"
        self.out = tmp_path / "run"
        shutil.copytree(finished / "run", self.out)
        self.before = snapshot(self.out)
        assert any(k.startswith("checkpoints" + os.sep) for k in self.before)

    def job(self, **sections):
        return base_job(self.data, self.out, **sections)

    def write(self, job, name="job.yaml"):
        """Write a job dict (as YAML) or text; returns the path."""
        path = self.tmp / name
        path.write_text(job if isinstance(job, str) else yaml.safe_dump(job, sort_keys=False))
        return path

    def table(self, table, name="data.parquet"):
        path = self.tmp / name
        tables.write_table(table, str(path), row_group_size=16)
        return path

    def run(self, job, *args):
        path = job if isinstance(job, Path) else self.write(job)
        flags = list(args) or ["--force"]
        return CliRunner().invoke(main, ["run", str(path), *flags, "--quiet"])

    def refused(self, result, *needles):
        """Exit 2, one line holding every needle, no traceback, the run folder unchanged."""
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, result.output
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: ") and "Traceback" not in result.output and "internal error" not in lines[0]
        for needle in needles:
            assert str(needle) in lines[0], (needle, lines[0])
        assert snapshot(self.out) == self.before, "the run folder changed"
        return lines[0]

    def refused_also_dry(self, job, *needles):
        """Refused by the run, and by --dry-run (which reads every row, without Ray) in the
        same words: a dry run that says ok is a run that starts."""
        path = job if isinstance(job, Path) else self.write(job)
        line = self.refused(self.run(path), *needles)
        assert self.refused(self.run(path, "--dry-run"), *needles) == line
        return line


@pytest.fixture
def bench(finished, tmp_path):
    return Bench(finished, tmp_path)


# ---------------------------------------------------------------- the job file

def test_malformed_yaml_names_the_file_and_line(bench):
    text = yaml.safe_dump(bench.job(), sort_keys=False, default_flow_style=None).splitlines()
    at = text.index("  activation: tanh")  # 0-based
    text[at] = "  activation: tanh: relu"  # a mapping value where none is allowed
    path = bench.write("\n".join(text) + "\n")
    bench.refused(bench.run(path), path, f"line {at + 1}: invalid YAML")


@pytest.mark.parametrize("edit,needles", [
    ({"model": {"layer": [2, 8, 3]}}, ["model.layer: unknown key", "did you mean 'layers'?"]),
    ({"trian": {"steps": 3}}, ["trian: unknown key", "did you mean 'train'?"]),
    ({"train": {"optimizer": {"name": "sgd", "lr": 0.5, "momentun": 0.5}}},
     ["train.optimizer.momentun: unknown key", "did you mean 'momentum'?"]),
])
def test_unknown_key_suggests_the_closest(bench, edit, needles):
    path = bench.write(bench.job(**edit))
    bench.refused(bench.run(path), path, *needles)


@pytest.mark.parametrize("edit,key", [
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"model": {"layers": "2,8,3"}}, "model.layers"),
    ({"model": {"layers": [2, "eight", 3]}}, "model.layers[1]"),
    ({"data": {"standardize": "yes"}}, "data.standardize"),
    ({"cluster": {"workers": [2]}}, "cluster.workers"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
    ({"data": {"label": 7}}, "data.label"),
])
def test_wrong_type_names_the_key(bench, edit, key):
    path = bench.write(bench.job(**edit))
    bench.refused(bench.run(path), path, f"{key}: expected")


@pytest.mark.parametrize("edit,key", [
    ({"train": {"optimizer": {"name": "sgd", "lr": 0}}}, "train.optimizer.lr"),
    ({"train": {"optimizer": {"name": "adam", "lr": -0.01}}}, "train.optimizer.lr"),
    ({"train": {"optimizer": {"name": "sgd", "lr": "-1e-3"}}}, "train.optimizer.lr"),
    ({"cluster": {"workers": 0}}, "cluster.workers"),
    ({"model": {"layers": [2]}}, "model.layers"),
    ({"model": {"layers": []}}, "model.layers"),
    ({"data": {"validation": 0}}, "data.validation"),
    ({"data": {"validation": 1}}, "data.validation"),
    ({"data": {"validation": 1.5}}, "data.validation"),
    ({"data": {"validation": -0.2}}, "data.validation"),
])
def test_out_of_range_values_name_the_key(bench, edit, key):
    path = bench.write(bench.job(**edit))
    bench.refused(bench.run(path), path, f"{key}: expected")


# ---------------------------------------------------------------- the data

def test_missing_data_file(bench):
    missing = bench.tmp / "nowhere.parquet"
    bench.refused(bench.run(bench.job(data={"path": str(missing)})), missing, "does not exist")


def test_empty_data_file(bench):
    empty = bench.table(spirals_table().slice(0, 0), "empty.parquet")
    assert pq.ParquetFile(empty).metadata.num_rows == 0  # a valid parquet file
    bench.refused(bench.run(bench.job(data={"path": str(empty)})), empty, "no rows")


def test_corrupt_data_file(bench):
    corrupt = bench.tmp / "corrupt.parquet"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    bench.refused(bench.run(bench.job(data={"path": str(corrupt)})), corrupt, "cannot read")


def test_truncated_data_file(bench):
    good = bench.data.read_bytes()
    cut = bench.tmp / "cut.parquet"
    cut.write_bytes(good[: len(good) // 2])
    bench.refused(bench.run(bench.job(data={"path": str(cut)})), cut, "cannot read")


def test_corrupt_pages_behind_a_good_footer(bench):
    """The metadata reads, so the damage shows only when the workers read their rows."""
    raw = bytearray(bench.data.read_bytes())
    raw[8: len(raw) // 2] = bytes((b * 7 + 13) % 256 for b in raw[8: len(raw) // 2])
    damaged = bench.tmp / "pages.parquet"
    damaged.write_bytes(bytes(raw))
    assert tables.open_source(str(damaged)).num_rows == ROWS
    bench.refused(bench.run(bench.job(data={"path": str(damaged)})), damaged, "cannot read")


def test_missing_label_values(bench):
    table = spirals_table()
    labels = table.column("label").to_pylist()
    labels[5] = labels[40] = None
    path = bench.table(table.set_column(2, "label", pa.array(labels, pa.int64())))
    bench.refused(bench.run(bench.job(data={"path": str(path)})), "data.label", "'label'", "missing values")


def test_missing_label_column(bench):
    bench.refused(bench.run(bench.job(data={"label": "target"})), "data.label", "'target'", "not found")


@pytest.mark.parametrize("features", [None, ["x0", "color"]])
def test_string_feature_column(bench, features):
    table = spirals_table().append_column("color", pa.array(["red", "green", "blue"] * (ROWS // 3)))
    path = bench.table(table)
    job = bench.job(data={"path": str(path), "features": features}, model={"layers": [3, 8, 3] if features is None else [2, 8, 3]})
    bench.refused(bench.run(job), "'color'", "not numeric")


def table_with_nonfinite(nan_rows=(3, 10, 41), inf_rows=(10, 20)):
    """The spirals table with NaN in x0 and +-inf in x1 at the given rows."""
    table = spirals_table()
    x0, x1 = table.column("x0").to_numpy().copy(), table.column("x1").to_numpy().copy()
    x0[list(nan_rows)] = np.nan
    x1[list(inf_rows)] = [np.inf, -np.inf][: len(inf_rows)]
    return table.set_column(0, "x0", pa.array(x0)).set_column(1, "x1", pa.array(x1))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_nan_and_inf_name_the_columns_and_counts(bench, fmt):
    path = bench.table(table_with_nonfinite(), f"data.{fmt}")
    bench.refused_also_dry(bench.job(data={"path": str(path)}), path, "'x0' (3)", "'x1' (2)", "data.on_nan: drop")


def test_nan_in_a_validation_file_is_refused(bench):
    path = bench.table(table_with_nonfinite(), "val.parquet")
    bench.refused_also_dry(bench.job(data={"validation": str(path)}), path, "'x0' (3)", "'x1' (2)", "data.on_nan: drop")


def test_nan_in_a_regression_target_is_refused(bench):
    table = spirals_table()
    y = table.column("label").to_numpy().astype(np.float64)
    y[[4, 9]] = np.nan
    path = bench.table(table.drop_columns(["label"]).append_column("y", pa.array(y)))
    job = bench.job(data={"path": str(path), "label": "y", "task": "regression"}, model={"layers": [2, 8, 1], "output": "identity"})
    bench.refused_also_dry(job, "'y' (2)", "data.on_nan: drop")


def test_on_nan_drop_trains_on_the_finite_rows_only(ray_session, tmp_path):
    dirty = tmp_path / "dirty.parquet"
    table = table_with_nonfinite()  # rows 3, 10, 20 and 41 hold NaN or inf
    tables.write_table(table, str(dirty), row_group_size=16)
    job = tmp_path / "drop.yaml"
    job.write_text(yaml.safe_dump(base_job(dirty, tmp_path / "drop", data={"on_nan": "drop"}, cluster={"workers": 1})))
    result = CliRunner().invoke(main, ["run", str(job), "--verbose"])
    assert result.exit_code == 0, result.output
    assert f"{ROWS - 4} training rows" in result.output and "engine direct" in result.output
    assert f"data.on_nan: drop: skipped 4 rows holding NaN or inf values; {ROWS - 4} training rows left" in result.output.splitlines()
    dry = CliRunner().invoke(main, ["run", str(job), "--dry-run"])
    assert dry.exit_code == 0 and dry.output.strip().splitlines() == [
        f"ok: {job}: {ROWS} rows, 2 features, 51 parameters; data.on_nan: drop will skip 4 rows holding NaN or inf values"], dry.output

    keep = np.setdiff1d(np.arange(ROWS), [3, 10, 20, 41])
    clean = tmp_path / "clean.parquet"
    tables.write_table(table.take(keep), str(clean), row_group_size=16)
    trainer = Trainer(load(base_job(clean, tmp_path / "clean", cluster={"workers": 1})))
    trainer.run()
    assert trainer.actors.n_train == ROWS - 4
    got, want = model_arrays(tmp_path / "drop" / "model.npz"), model_arrays(tmp_path / "clean" / "model.npz")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    assert np.all(np.isfinite(got["W1"]))


def test_input_width_must_match_the_features(bench):
    path = bench.write(bench.job(model={"layers": [3, 8, 3]}))
    bench.refused(bench.run(path), path, "model.layers[0]: expected 2 (the number of feature columns), got 3")


@pytest.mark.parametrize("model,needle", [
    ({"layers": [2, 8, 4]}, "model.layers[-1]: expected 3 (the number of classes in 'label'), got 4"),
    ({"layers": [2, 8, 2]}, "model.layers[-1]: expected 3 (the number of classes in 'label'), got 2"),
    ({"layers": [2, 8, 1], "output": "sigmoid"}, "model.output: sigmoid needs exactly 2 classes in 'label', found 3"),
])
def test_output_width_must_match_the_classes(bench, model, needle):
    path = bench.write(bench.job(model=model))
    bench.refused_also_dry(path, path, needle)


@pytest.mark.parametrize("rows,nan_rows,data_edit,workers", [
    (3, (), {}, 4),  # fewer rows in the file than workers
    (3, (), {"validation": 0.5}, 2),  # rows 1 and 2 are held out: 1 training row
    (4, (0, 2, 3), {"on_nan": "drop"}, 2),  # 3 of 4 rows dropped: 1 training row
])
def test_more_workers_than_training_rows(bench, rows, nan_rows, data_edit, workers):
    path = bench.table(table_with_nonfinite(nan_rows, ()).slice(0, rows), "few.parquet")
    held_out = rowmath.validation_mask(0, rows, data_edit.get("validation", 0.0), 3).sum()
    assert rows - held_out - len(nan_rows) < workers
    job = bench.job(data={"path": str(path), **data_edit}, cluster={"workers": workers, "cpus_per_worker": 0.5})
    bench.refused_also_dry(job, "cluster.workers", f"more workers ({workers}) than")


# ---------------------------------------------------------------- the run folder

def test_a_good_forced_run_does_replace_the_folder(bench):
    """The harness itself: --force on a good job rewrites the run, so `unchanged` means something."""
    result = bench.run(bench.job())
    assert result.exit_code == 0, result.output
    assert snapshot(bench.out) != bench.before


def test_folder_with_a_run_is_refused_without_force_or_resume(bench):
    line = bench.refused(bench.run(bench.job(), "--workers", "2"), "already holds a run", "--force", "--resume")
    assert str(bench.out) in line


@pytest.mark.parametrize("args", [
    ["run", "{tmp}", "--force"],  # the job file is a folder
    ["run", "{job}", "--force", "--bogus"],
    ["run", "--force"],
    ["rnu", "{job}"],
])
def test_click_usage_errors_are_one_line(bench, args):
    job = bench.write(bench.job())
    result = CliRunner().invoke(main, [a.format(tmp=bench.tmp, job=job) for a in args])
    bench.refused(result, "--help")


@pytest.mark.parametrize("under", [False, True])
def test_output_path_that_cannot_be_a_folder(ray_session, bench, under):
    file = bench.tmp / "a-file"
    file.write_bytes(b"keep me")
    out = file / "run" if under else file
    line = bench.refused(bench.run(bench.job(output={"dir": str(out)})), "output.dir", out, "not a folder")
    assert file.read_bytes() == b"keep me" and "internal error" not in line


def test_resume_and_force_together_are_refused(bench):
    bench.refused(bench.run(bench.job(), "--resume", "--force"), "--resume", "--force")


def test_resume_with_a_different_model_is_refused(bench):
    bench.refused(bench.run(bench.job(model={"layers": [2, 5, 3]}), "--resume"), bench.out, "different job")


# ---------------------------------------------------------------- fuzzing

PLAUSIBLE = [  # values that are right somewhere in a job, so that mutations get deep
    "1e-3", "full", "nan", ".inf", "~", "-0", "0.5", "adam", "x0", "x1", "label", "drop", "csv", "feather",
    "regression", "sigmoid", "identity", "relu", "float32", "small.parquet", "*.parquet", ".", "/",
    "file:///no/such.parquet", "data.parquet", 2**63, -1, 0, 1, 3, 0.5, 1e300, [2, 3], [2, 8, 1],
    [1, 3], [2, 3, 3], ["x0"], ["x0", "x1"], ["label"], ["x0", "x0"], {"kind": "spirals", "rows": 5}, {},
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(PLAUSIBLE).map(copy.deepcopy),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)


def _paths(d, prefix=()):
    """Every key path of a nested dict."""
    for key, value in d.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def pick_key(draw, job):
    """(the mapping, one of its keys) drawn from anywhere in `job`, or None when it is empty."""
    paths = list(_paths(job))
    if not paths:
        return None
    path = draw(st.sampled_from(paths))
    node = job
    for key in path[:-1]:
        node = node[key]
    return node, path


def _mutate(draw, job):
    """Delete, rename or replace a few keys of `job` in place."""
    for _ in range(draw(st.integers(1, 3))):
        picked = pick_key(draw, job)
        if picked is None:
            break
        node, path = picked
        action = draw(st.sampled_from(["delete", "rename", "replace", "replace", "add"]))
        if action == "add":
            node[draw(st.one_of(st.text(max_size=8), st.sampled_from(["make", "on_nan", "features", "steps"])))] = draw(VALUES)
        elif action == "delete":
            del node[path[-1]]
        elif action == "rename":
            node[draw(st.text(min_size=1, max_size=10))] = node.pop(path[-1])
        else:
            node[path[-1]] = draw(VALUES)


@st.composite
def job_texts(draw, data_path):
    """A job file's bytes: a mutated valid job, truncated YAML text, or random bytes."""
    valid = base_job(data_path, "out", cluster={"workers": 1})
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "truncated", "bytes", "valid"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    text = yaml.safe_dump(valid, sort_keys=False)
    if kind == "truncated":
        return text[: draw(st.integers(0, len(text)))].encode()
    if kind == "mutated":
        _mutate(draw, valid)
        try:
            text = yaml.safe_dump(valid, sort_keys=False, allow_unicode=True)
        except yaml.YAMLError:
            text = repr(valid)
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def small_parquet(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "small.parquet"
    tables.write_table(spirals_table(30), str(path))
    return path


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_job_files_give_a_job_or_one_line_exit_2(small_parquet, drawn):
    content = drawn.draw(job_texts(small_parquet), label="job file")
    sets = drawn.draw(st.lists(st.builds("{}={}".format, st.sampled_from(
        ["train.steps", "model.layers", "data.path", "cluster.workers", "data.validation", "x.y", "model"]),
        st.text(max_size=10)), max_size=1), label="--set")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_bytes(content)
        try:
            loaded = load_job(path, sets)
            assert isinstance(loaded, Job)
        except UsageError as err:
            loaded = err
            assert "\n" not in str(err) and str(err).strip()
        result = CliRunner().invoke(main, ["run", str(path), "--dry-run", *[f"--set={s}" for s in sets]])
        lines = result.output.strip().splitlines()
        assert "Traceback" not in result.output and "internal error" not in result.output, result.output
        assert len(lines) == 1, result.output
        if isinstance(loaded, UsageError):  # the CLI says what the library says
            assert result.exit_code == 2 and lines[0] == f"error: {loaded}", (lines, str(loaded))
        else:  # then the data check: fine, or a bad column or width
            assert result.exit_code in (0, 2), result.output
            assert lines[0].startswith("ok: " if result.exit_code == 0 else "error: "), lines


def test_early_stopping_without_a_validation_row_is_refused_by_the_run_and_the_dry_run(bench):
    held = rowmath.validation_mask(0, ROWS, 0.001, 3).sum()
    assert held == 0  # a fraction so small that no row of 60 is held out
    job = bench.job(data={"validation": 0.001}, train={"early_stopping": {"patience": 2}})
    bench.refused_also_dry(job, "train.early_stopping", "needs validation rows")


def test_dry_run_reads_a_validation_file_as_the_run_does(bench):
    good = bench.table(spirals_table(), "val.parquet")
    result = bench.run(bench.job(data={"validation": str(good)}), "--dry-run")
    assert result.exit_code == 0 and result.output.startswith("ok: "), result.output
