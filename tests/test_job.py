"""Tests for distbp.data.job: the job-file schema, its defaults, its checks and its error messages."""

import copy
import csv
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbp.errors import JobError
from distbp.data.job import Job, apply_override, job_error, job_from_dict, job_hash, job_to_dict, load_job

MINIMAL = {"data": {"path": "spirals.parquet"}, "model": {"layers": [2, 16, 3]}}


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**sections):
    d = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if isinstance(value, dict):
            d.setdefault(key, {}).update(value)
        else:
            d[key] = value
    return d


def error_of(d, overrides=()):
    with pytest.raises(JobError) as info:
        job_from_dict(d, source="job.yaml", overrides=overrides)
    text = str(info.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- defaults and round trip

def test_defaults_fill_in(tmp_path):
    job = load_job(write(tmp_path, """
        data: {path: spirals.parquet}
        model: {layers: [2, 16, 3]}
    """, name="spirals.yaml"))
    assert job.name == "spirals" and job.seed == 0
    assert (job.data.format, job.data.label, job.data.labels, job.data.task) == ("auto", "label", ["label"],
                                                                                 "classification")
    assert job.data.standardize is True and job.data.validation is None and job.data.on_nan == "error"
    assert (job.model.activation, job.model.activations) == ("tanh", ["tanh"])
    assert (job.model.output, job.model.loss, job.model.init, job.model.dtype) == (
        "softmax", "cross_entropy", "xavier", "float32")
    assert (job.train.steps, job.train.epochs, job.train.batch) == (500, None, "full")
    opt = job.train.optimizer
    assert (opt.name, opt.lr, opt.momentum, opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (
        "adam", 0.01, 0.9, 0.9, 0.999, 1e-8, 0)
    assert job.train.schedule is None and job.train.early_stopping is None
    assert (job.train.eval_every, job.train.checkpoint_every, job.train.keep_checkpoints) == (10, 50, 3)
    c = job.cluster
    assert (c.workers, c.cpus_per_worker, c.address, c.connect_timeout_s) == (2, 1, None, 30)
    assert c.parameter_servers == "auto"
    assert (c.parameter_resources, c.chunk_rows, c.max_failures, c.wait_for_nodes_s) == ({}, 8192, 3, 60)
    assert job.output.dir is None
    assert job.source == str(tmp_path / "spirals.yaml")


def test_sub_section_defaults():
    job = job_from_dict(minimal(
        data={"validation": 0.2},
        train={"schedule": {"name": "step", "every": 100}, "early_stopping": {}, "epochs": 3},
    ))
    assert job.train.schedule.warmup_steps == 0 and job.train.schedule.gamma == 0.1
    assert job.train.early_stopping.metric == "val_loss" and job.train.early_stopping.patience == 10
    assert job.train.early_stopping.min_delta == 0
    assert job.train.epochs == 3 and job.train.steps is None  # the 500 default only when neither is set


def test_loss_defaults_to_the_pair_of_the_output():
    job = job_from_dict(minimal(model={"layers": [2, 1], "output": "sigmoid"}))
    assert job.model.loss == "binary_cross_entropy"
    job = job_from_dict(minimal(data={"task": "regression", "label": ["a", "b"]},
                                model={"layers": [3, 2], "output": "identity"}))
    assert job.model.loss == "mse" and job.data.labels == ["a", "b"] and job.model.activations == []


def test_round_trip_through_yaml(tmp_path):
    job = load_job(write(tmp_path, """
        name: rt
        seed: 7
        data: {path: d.csv, features: [x1, x2], label: y, validation: 0.25, standardize: false}
        model: {layers: [2, 8, 4, 3], activation: [relu, tanh], init: he, dtype: float64}
        train:
          batch: 64
          optimizer: {name: nesterov, lr: 1e-3, momentum: 0.5}
          schedule: {name: cosine, warmup_steps: 5, min_lr: 0.0001}
          early_stopping: {metric: val_accuracy, patience: 3}
        cluster: {workers: 4, address: auto, parameter_resources: {head: 1}}
        output: {dir: out/rt}
    """))
    text = yaml.safe_dump(job_to_dict(job))
    again = job_from_dict(yaml.safe_load(text), base_dir=job.base_dir)
    assert again == job
    assert again.train.optimizer.lr == 0.001 and again.model.activations == ["relu", "tanh"]
    assert not {"source", "base_dir"} & set(yaml.safe_load(text))


def test_an_alias_bomb_is_refused_at_once_in_one_line(tmp_path):
    # 10 levels of 10 aliases each: 10**10 strings once expanded (the parser alone would run
    # out of memory or time); refused at the first alias, naming the file and line
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = write(tmp_path, "\n".join(["data: {path: d.parquet}", "model: {layers: [2, 3]}", *lines]) + "\n")
    assert path.stat().st_size < 1000
    with pytest.raises(JobError, match=r"job.yaml: line 4: invalid YAML: aliases \(\*name\) are not allowed in a job file") as info:
        load_job(path)
    assert "\n" not in str(info.value)
    with pytest.raises(JobError, match=r"--set model.layers=\*l0: the value is not valid YAML \(aliases"):
        apply_override({}, "model.layers=*l0")


def test_job_yaml_written_for_a_run_has_no_aliases(tmp_path):
    from distbp.run import rundir

    shared = ["x1", "x2"]  # one list in two places: yaml.safe_dump would write &id001 and *id001
    job = {"data": {"path": "d.parquet", "features": shared}, "model": {"layers": [2, 3], "activation": shared}}
    assert "&id001" in yaml.safe_dump(job)
    rundir.write_job(str(tmp_path), job)
    text = (tmp_path / "job.yaml").read_text()
    assert "&" not in text and "*" not in text
    assert yaml.safe_load(text) == job


def test_job_to_dict_has_every_key_resolved():
    d = job_to_dict(job_from_dict(MINIMAL))
    assert list(d) == ["name", "seed", "data", "model", "train", "cluster", "output"]
    assert d["train"]["steps"] == 500 and d["train"]["optimizer"]["beta2"] == 0.999
    assert d["cluster"]["wait_for_nodes_s"] == 60 and d["data"]["on_nan"] == "error"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("d, expected", [
    ({**MINIMAL, "nmae": "x"}, "job.yaml: nmae: unknown key (did you mean 'name'?)"),
    (minimal(model={"layer": [2, 3]}), "job.yaml: model.layer: unknown key (did you mean 'layers'?)"),
    (minimal(train={"optimizer": {"momentun": 1}}),
     "job.yaml: train.optimizer.momentun: unknown key (did you mean 'momentum'?)"),
    (minimal(cluster={"zzzz": 1}), "job.yaml: cluster.zzzz: unknown key (known keys: workers,"),
])
def test_unknown_keys_suggest_the_closest(d, expected):
    assert error_of(d).startswith(expected)


@pytest.mark.parametrize("d, expected", [
    (minimal(model={"layers": "2,3"}), "model.layers: expected a list of at least 2"),
    (minimal(model={"layers": [2, "x", 3]}), "model.layers[1]: expected an integer >= 1, got 'x'"),
    (minimal(data={"standardize": "yes"}), "data.standardize: expected true or false, got 'yes'"),
    (minimal(cluster=[1, 2]), "cluster: expected a mapping, got [1, 2]"),
    (minimal(train={"optimizer": {"name": "adma"}}),
     "train.optimizer.name: expected one of adam | sgd | momentum | nesterov, got 'adma' (did you mean 'adam'?)"),
    (minimal(model={"activation": ["relu", "tanh"]}),
     "model.activation: expected one activation per hidden layer (1), got 2"),
    (minimal(model={"activation": [7]}), "model.activation[0]: expected one of sigmoid"),
    (minimal(data={"label": 3}), "data.label: expected a non-empty string, got 3"),
    (minimal(data={"features": ["a", "a"]}), "data.features[1]: column 'a' is listed twice"),
    (minimal(data={"validation": [0.1]}), "data.validation: expected null, a fraction 0 < f < 1 or a path"),
    (minimal(data={"make": {"kind": "moons"}}), "data.make.kind: expected one of xor | spirals"),
    (minimal(cluster={"tcp_congestion": "cubic"}), "cluster.tcp_congestion: expected one of auto | system, got 'cubic'"),
    (minimal(train={"batch": "half"}), "train.batch: expected full or an integer >= 1, got 'half'"),
    ({"model": {"layers": [2, 3]}}, "data.path: required"),
    ({"data": {"path": "x.csv"}}, "model.layers: required"),
    (minimal(name="a/b"), "name: expected a plain name"),
])
def test_wrong_types_name_the_key(d, expected):
    assert error_of(d).startswith("job.yaml: " + expected)


@pytest.mark.parametrize("override, expected", [
    ("train.optimizer.lr=0", "train.optimizer.lr: expected a number > 0, got 0"),
    ("train.optimizer.lr=-1", "train.optimizer.lr: expected a number > 0, got -1"),
    ("train.optimizer.beta2=1", "train.optimizer.beta2: expected a number in [0, 1), got 1"),
    ("cluster.workers=0", "cluster.workers: expected an integer >= 1, got 0"),
    ("cluster.max_failures=-1", "cluster.max_failures: expected an integer >= 0, got -1"),
    ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker: expected a number > 0, got 0"),
    ("model.layers=[3]", "model.layers: expected a list of at least 2 widths"),
    ("model.layers=[2, 0, 3]", "model.layers[1]: expected an integer >= 1, got 0"),
    ("data.validation=0", "data.validation: expected a number in (0, 1), got 0"),
    ("data.validation=1", "data.validation: expected a number in (0, 1), got 1"),
    ("data.validation=1.5", "data.validation: expected a number in (0, 1), got 1.5"),
    ("train.epochs=3", None),
    ("train.schedule={name: step}", "train.schedule.every: required for the step schedule"),
    ("train.schedule={name: step, every: 2, gamma: 0}",
     "train.schedule.gamma: expected a number in (0, 1], got 0"),
    ("data.make={kind: xor, rows: 0}", "data.make.rows: expected an integer >= 1, got 0"),
    ("seed=-1", "seed: expected an integer >= 0, got -1"),
])
def test_out_of_range_values(override, expected):
    d = minimal(train={"steps": 10}) if override.startswith("train.epochs") else MINIMAL
    expected = expected or "train.epochs: cannot be set together with train.steps"
    assert error_of(d, [override]).startswith("job.yaml: " + expected)


@pytest.mark.parametrize("model, data, expected", [
    ({"output": "softmax", "loss": "mse"}, {},
     "model.loss: output softmax pairs with loss cross_entropy, got mse"),
    ({"layers": [2, 1], "output": "sigmoid", "loss": "cross_entropy"}, {},
     "model.loss: output sigmoid pairs with loss binary_cross_entropy"),
    ({"output": "identity"}, {}, "model.output: task classification needs softmax or sigmoid, got identity"),
    ({}, {"task": "regression"}, "model.output: task regression needs identity, got softmax"),
    ({"output": "sigmoid"}, {}, "model.layers[2]: expected 1 (a sigmoid output has one unit), got 3"),
    ({"layers": [3, 16, 3]}, {"features": ["a", "b"]},
     "model.layers[0]: expected 2 (the number of feature columns), got 3"),
    ({"layers": [2, 3], "output": "identity"}, {"task": "regression"},
     "model.layers[1]: expected 1 (the number of label columns), got 3"),
    ({}, {"label": ["a", "b"]}, "data.label: classification takes one label column, got 2"),
    ({}, {"features": ["x", "label"]}, "data.features[1]: 'label' is a label column"),
])
def test_keys_that_must_agree(model, data, expected):
    assert error_of(minimal(model=model, data=data)).startswith("job.yaml: " + expected)


def test_elastic_keys_default_off_and_min_workers_fits_the_workers():
    c = job_from_dict(MINIMAL).cluster
    assert (c.elastic, c.min_workers) == (False, 1)
    c = job_from_dict(minimal(cluster={"workers": 4, "elastic": True, "min_workers": 4})).cluster
    assert (c.elastic, c.min_workers) == (True, 4)
    assert error_of(minimal(cluster={"workers": 2, "min_workers": 3})) == (
        "job.yaml: cluster.min_workers: expected at most cluster.workers (2), got 3")
    assert error_of(minimal(cluster={"min_workers": 0})).startswith("job.yaml: cluster.min_workers: expected an integer >= 1")
    assert error_of(minimal(cluster={"elastic": "yes"})).startswith("job.yaml: cluster.elastic: expected true or false")


def test_early_stopping_needs_validation():
    assert "train.early_stopping: needs validation data" in error_of(minimal(train={"early_stopping": {}}))


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  path: x.csv\nmodel:\n  layers: [2, 3\n  output: softmax\n")
    with pytest.raises(JobError, match=r"^\S*job.yaml: line 5: invalid YAML: expected ',' or '\]'"):
        load_job(path)
    path = write(tmp_path, "data: {path: x}\nmodel: x: y\n")
    with pytest.raises(JobError, match=r"job.yaml: line 2: invalid YAML: mapping values are not allowed"):
        load_job(path)


def test_file_errors(tmp_path):
    with pytest.raises(JobError, match=r"nope.yaml: no such job file"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(JobError, match=r"cannot read the job file"):
        load_job(tmp_path)
    with pytest.raises(JobError, match=r"the job file is empty"):
        load_job(write(tmp_path, ""))
    with pytest.raises(JobError, match=r"job.yaml: expected a mapping of keys at the top level, got \[1, 2\]$"):
        load_job(write(tmp_path, "[1, 2]\n"))
    assert JobError("x").exit_code == 2


def test_source_is_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs").mkdir()
    write(tmp_path, "data: {path: x}\nmodel: {layers: [2, 3], nope: 1}\n", name="jobs/a.yaml")
    with pytest.raises(JobError, match=r"^jobs/a.yaml: model.nope: unknown key"):
        load_job("jobs/a.yaml")


def test_job_error_formats_one_line():
    job = job_from_dict(MINIMAL, source="job.yaml")
    err = job_error(job, "model.layers[0]", "expected 2 (the number of feature columns), got 3")
    assert isinstance(err, JobError)
    assert str(err) == "job.yaml: model.layers[0]: expected 2 (the number of feature columns), got 3"
    assert str(job_error("j.yaml", "data.path", "not found", "check\nthe path")) == \
        "j.yaml: data.path: not found (check the path)"


# ---------------------------------------------------------------- numbers

def test_numeric_strings_are_numbers():
    job = job_from_dict(minimal(train={"optimizer": {"lr": "1e-3"}, "steps": "20"},
                                cluster={"workers": "4", "cpus_per_worker": "0.5"},
                                model={"layers": ["2", 16.0, 3]}, data={"validation": "0.2"}))
    assert job.train.optimizer.lr == 0.001 and isinstance(job.train.optimizer.lr, float)
    assert job.train.steps == 20 and job.cluster.workers == 4 and isinstance(job.cluster.workers, int)
    assert job.cluster.cpus_per_worker == 0.5 and job.model.layers == [2, 16, 3]
    assert all(type(w) is int for w in job.model.layers)
    assert job.data.validation == 0.2


def test_plain_yaml_exponent_is_a_string_and_accepted(tmp_path):
    job = load_job(write(tmp_path, "data: {path: x}\nmodel: {layers: [2, 3]}\ntrain: {optimizer: {lr: 1e-3}}\n"))
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # why numeric strings must be accepted
    assert job.train.optimizer.lr == 0.001


@pytest.mark.parametrize("override, key", [
    ("cluster.workers=true", "cluster.workers"),
    ("train.optimizer.lr=true", "train.optimizer.lr"),
    ("model.layers=[2, true, 3]", "model.layers[1]"),
    ("data.validation=false", "data.validation"),
    ("seed=false", "seed"),
])
def test_booleans_are_not_numbers(override, key):
    assert error_of(MINIMAL, [override]).startswith(f"job.yaml: {key}: expected ")


@pytest.mark.parametrize("value", ["2.5", "'2.5'", ".nan", ".inf", "'1e999'", "[2]"])
def test_integers_reject_fractions_and_non_numbers(value):
    assert error_of(MINIMAL, [f"cluster.workers={value}"]).startswith(
        "job.yaml: cluster.workers: expected an integer >= 1, got ")


def test_integral_floats_are_integers():
    job = job_from_dict(MINIMAL, overrides=["cluster.workers=2.0", "train.eval_every='5'"])
    assert job.cluster.workers == 2 and job.train.eval_every == 5


# ---------------------------------------------------------------- --set

def test_set_overrides_and_creates_nested_keys(tmp_path):
    path = write(tmp_path, "data: {path: x}\nmodel: {layers: [2, 3]}\n")
    job = load_job(path, ["train.optimizer.lr=1e-4", "train.schedule.name=cosine", "cluster.workers=8",
                          "model.layers=[2, 5, 3]", "output.dir=elsewhere"])
    assert job.train.optimizer.lr == 0.0001 and job.train.optimizer.name == "adam"
    assert job.train.schedule.name == "cosine" and job.cluster.workers == 8
    assert job.model.layers == [2, 5, 3] and job.output.dir == "elsewhere"


def test_set_unknown_key_gets_a_suggestion(tmp_path):
    path = write(tmp_path, "data: {path: x}\nmodel: {layers: [2, 3]}\n")
    with pytest.raises(JobError, match=r"train.optimizer.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_job(path, ["train.optimizer.lrr=0.1"])


@pytest.mark.parametrize("assignment", ["train.optimizer.lr", "=3", "train..lr=1", "a.b=[1, 2"])
def test_set_malformed_assignment(assignment):
    with pytest.raises(JobError, match=r"^--set "):
        job_from_dict(MINIMAL, overrides=[assignment])


def test_apply_override_in_place():
    d = {"model": {"layers": [2, 3]}, "train": None}
    apply_override(d, "train.optimizer.lr=0.5")
    apply_override(d, "name=x=y")
    assert d == {"model": {"layers": [2, 3]}, "train": {"optimizer": {"lr": 0.5}}, "name": "x=y"}
    with pytest.raises(JobError, match=r"model.layers is not a mapping"):
        apply_override(d, "model.layers.x=1")


def test_overrides_leave_the_input_dict_alone():
    d = copy.deepcopy(MINIMAL)
    job_from_dict(d, overrides=["cluster.workers=3", "model.layers=[2, 9, 3]"])
    assert d == MINIMAL


# ---------------------------------------------------------------- paths

def test_relative_data_path_resolves_against_the_job_file(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    path = write(tmp_path, "data: {path: ../data/d.parquet, validation: v.csv}\nmodel: {layers: [2, 3]}\n",
                 name="jobs/j.yaml")
    monkeypatch.chdir("/")
    job = load_job(path)
    assert job.data.path == "../data/d.parquet"
    assert job.data_path() == str(tmp_path / "data" / "d.parquet")
    assert job.validation_path() == str(tmp_path / "jobs" / "v.csv")


@pytest.mark.parametrize("path", ["s3://bucket/d.parquet", "gs://b/x/*.parquet", "file:///tmp/d.csv"])
def test_uris_are_left_alone(path):
    assert job_from_dict(minimal(data={"path": path}), base_dir="/elsewhere").data_path() == path


def test_absolute_path_is_kept(tmp_path):
    job = job_from_dict(minimal(data={"path": str(tmp_path / "d.csv")}), base_dir="/elsewhere")
    assert job.data_path() == str(tmp_path / "d.csv") and job.validation_path() is None


def test_output_dir_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_from_dict(minimal(name="spirals"), base_dir="/elsewhere")
    assert job.output_dir() == str(tmp_path / "runs" / "spirals")
    job = job_from_dict(minimal(output={"dir": "out/x"}), base_dir="/elsewhere")
    assert job.output_dir() == str(tmp_path / "out" / "x")
    assert job_from_dict(minimal(output={"dir": "s3://b/runs"})).output_dir() == "s3://b/runs"


def test_resolved_dict_is_self_contained(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "run").mkdir()
    text = "name: n\ndata: {path: d.csv}\nmodel: {layers: [2, 3]}\n"
    job = load_job(write(tmp_path, text, name="jobs/j.yaml"))
    monkeypatch.chdir(tmp_path)
    resolved = job_to_dict(job, resolve_paths=True)
    assert resolved["data"]["path"] == str(tmp_path / "jobs" / "d.csv")
    assert resolved["output"]["dir"] == str(tmp_path / "runs" / "n")
    (tmp_path / "run" / "job.yaml").write_text(yaml.safe_dump(resolved))
    again = load_job(tmp_path / "run" / "job.yaml")
    assert again.data_path() == job.data_path() and again.output_dir() == job.output_dir()
    assert job_hash(again) == job_hash(job)


# ---------------------------------------------------------------- job hash

def test_job_hash_ignores_cluster_output_and_name():
    base = job_hash(job_from_dict(MINIMAL, base_dir="/b"))
    assert re.fullmatch(r"[0-9a-f]{64}", base), base  # a SHA-256, in hex
    other = minimal(name="other", cluster={"workers": 7, "address": "auto"}, output={"dir": "o"})
    same = job_from_dict(other, base_dir="/b")
    assert job_hash(same) == base
    assert job_hash(job_from_dict(MINIMAL, base_dir="/b", overrides=["train.optimizer.lr=0.02"])) != base
    assert job_hash(job_from_dict(MINIMAL, base_dir="/b", overrides=["seed=1"])) != base
    assert job_hash(job_from_dict(MINIMAL, base_dir="/c")) != base  # a different data file


def test_job_hash_sees_through_spelling():
    a = job_from_dict(MINIMAL, base_dir="/b", overrides=["train.optimizer.lr='1e-2'", "train.steps=500"])
    assert job_hash(a) == job_hash(job_from_dict(MINIMAL, base_dir="/b"))


# ---------------------------------------------------------------- imports

def test_import_does_not_pull_in_heavy_modules():
    code = ("import sys, distbp.data.job; bad = [m for m in ('ray', 'pyarrow', 'click') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- property: only JobError, one line

VALID = job_to_dict(job_from_dict(minimal(
    data={"validation": 0.2, "make": {"kind": "spirals", "rows": 100}},
    train={"schedule": {"name": "step", "every": 5}, "early_stopping": {"patience": 2}},
    cluster={"parameter_resources": {"head": 1}},
)))

values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["full", "1e-3", "2.5", "adam", "relu", "s3://x", "", "nan", "-inf", "0x10"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6) | st.integers(0, 2), inner, max_size=3),
    max_leaves=6,
)


def _slots(node, out):
    """Every (container, key) pair in the tree, so that a mutation can pick one."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in list(items):
        out.append((node, key))
        _slots(child, out)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_jobs_give_a_job_or_a_one_line_job_error(data):
    d = copy.deepcopy(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        slots = _slots(d, [])
        node, key = data.draw(st.sampled_from(slots))
        action = data.draw(st.sampled_from(["rename", "replace", "delete"]))
        if action == "replace" or isinstance(node, list):
            node[key] = data.draw(values)
        elif action == "rename":
            node[data.draw(st.text(max_size=8) | st.integers(0, 3) | st.just(f"{key}s"))] = node.pop(key)
        else:
            del node[key]
    try:
        job = job_from_dict(d, source="job.yaml")
    except JobError as err:
        assert "\n" not in str(err) and str(err).startswith("job.yaml")
    else:
        assert isinstance(job, Job)
        assert job_from_dict(job_to_dict(job)) == job
        job_hash(job)


def test_parameter_servers_takes_auto_per_worker_or_a_count():
    for value, want in (("auto", "auto"), ("per_worker", "per_worker"), (3, 3), ("2", 2), (1.0, 1)):
        assert job_from_dict(minimal(cluster={"parameter_servers": value})).cluster.parameter_servers == want
    for bad in (0, -1, 1.5, "many", True, None, [2]):
        assert error_of(minimal(cluster={"parameter_servers": bad})).startswith(
            "job.yaml: cluster.parameter_servers: expected auto, per_worker or an integer >= 1, got ")
    assert "did you mean 'per_worker'?" in error_of(minimal(cluster={"parameter_servers": "per-worker"}))


@pytest.mark.parametrize("width", [10**9, 10**21])
def test_a_model_too_large_to_hold_is_refused_at_validation(width):
    text = error_of(minimal(model={"layers": [2, width, 3]}))
    assert text.startswith("job.yaml: model.layers: these widths give ") and "distbp trains at most 2,147,483,647 (2**31 - 1)" in text, text
    assert job_from_dict(minimal(model={"layers": [2, 46000, 3]}), source="job.yaml").model.layers[1] == 46000  # 230,003 parameters: fine


COLUMNS = ["step", "seconds", "loss"]


def metrics_file(tmp_path, text):
    path = tmp_path / "metrics.csv"
    path.write_text("step,seconds,loss\n" + text)
    return path


@pytest.mark.parametrize("tail, kept", [
    ("5,0.5,0.1", 4),        # a last row torn mid-number (no newline): cut
    ("5", 4),                # torn inside the step field: cut, no bogus "5,," row
    ("5,0.5\n", 4),          # a row with a field missing: dropped
    ("3,0.5,0.2\n", 4),      # a step not after the last one: dropped
    ("x,0.5,0.2\n", 4),      # not a step: dropped
    ("5,0.5,0.1\n", 5),      # complete: kept
])
def test_resume_repairs_a_torn_metrics_csv_before_writing(tmp_path, tail, kept):
    from distbp.run import rundir

    good = "".join(f"{s},{s / 10},{1 / s}\n" for s in range(1, 5))
    path = metrics_file(tmp_path, good + tail)
    writer = rundir.MetricsWriter(str(path), COLUMNS, keep_until_step=5)
    writer.write({"step": kept + 1, "seconds": 9.0, "loss": 0.01})
    writer.close()
    rows = path.read_text().splitlines()
    assert rows[0] == "step,seconds,loss" and [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, kept + 2))
    assert all(len(r.split(",")) == 3 for r in rows)


def test_a_metrics_row_that_cannot_be_written_names_the_file(tmp_path):
    from distbp.errors import TrainingError
    from distbp.run import rundir

    writer = rundir.MetricsWriter(str(metrics_file(tmp_path, "")), COLUMNS)
    writer.file.close()
    writer.file = open("/dev/full", "a", newline="")  # a real ENOSPC on every flush
    writer.writer = csv.DictWriter(writer.file, COLUMNS)
    with pytest.raises(TrainingError, match=r"metrics.csv: cannot write the row of step 7 \(No space left on device\) \(the checkpoints written before are kept"):
        writer.write({"step": 7, "seconds": 1.0, "loss": 0.5})
    writer.close()  # the torn buffer is not reported twice
