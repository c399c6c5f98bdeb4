"""Fuzzing the CLI: well-formed commands with bad values (numbers, paths, `--set` keys and
values, model and data files) and bad job files. Every example must end with exit code 2,
one line `error: ...` on stderr and nothing on stdout (no traceback, no "internal error"),
and nothing under the example's own folder created, changed or deleted: every file and
folder keeps its type, size and mtime_ns. That folder is also the working directory, so a
default run folder runs/<name> or a stray temporary file would show.

- run: SCHEMA_BAD holds, for every key of the job schema, values it never accepts whatever
  the other keys hold; unknown keys and malformed KEY=VALUE assignments; values the schema
  takes but the data refuses (bad data and validation files, widths, columns, formats, more
  workers than rows), the run folder (a file in the way, a run already there, --resume with
  nothing to resume) and data.make (options it refuses, a made table that does not fit).
  With --dry-run where that refuses them too, and with --force over an earlier run.
- job files: random YAML documents (random nesting, wrong types, unknown keys, garbage
  scalars) always holding one poison, broken YAML, random bytes; `run --dry-run`, `run`,
  `gradcheck`.
- eval / predict: bad model files (random bytes, missing keys, a bad spec ...), bad data
  files (corrupt parquet / csv / feather, missing or non-numeric columns, unknown labels),
  bad output paths. data make: bad rows, options, seeds and output paths. plot: bad run folders.

Every example but those of test_what_the_workers_refuse_... is refused before Ray starts: a
fixture makes `cluster.connect` fail loudly, so a case that slips through fails fast instead
of starting one. That test alone uses the session's Ray, for a few examples of what only the
workers can see (NaN with on_nan: error, classes against the output width). Unknown CLI
options alone are not fuzzed (test_bad_input has them). FIXED and ONCE_INTERNAL_ERRORS pin the bugs
these fuzzers found (model files, plots, data make), each now refused in one line.
"""

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distbp.backprop import nn, optim, schedule
from distbp.data import tables, datasets
from distbp.runtime import cluster
from distbp.cli import main
from distbp.data.job import ACTIVATIONS, LOSS_FOR_OUTPUT, ClusterCfg, DataCfg, EarlyStopCfg, ModelCfg, OptimizerCfg, OutputCfg, ScheduleCfg, TrainCfg
from distbp.run.model import Model

from test_bad_input import pick_key

ROWS = 30  # rows of every data file: 2 float features x0, x1 and an int64 label of 3 classes

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run, so CI is repeatable
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------- the harness

@pytest.fixture(autouse=True)
def no_ray(request, monkeypatch):
    """Every example must be refused before Ray: starting one here is a failure, not a slow
    pass. Only the test that asks for the session's Ray (ray_session) may reach it."""
    if "ray_session" in request.fixturenames:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("the fuzz case reached cluster.connect: it was not refused before Ray")

    monkeypatch.setattr(cluster, "connect", refuse)


def snapshot(folder):
    """{relative path: (type, size, mtime_ns)} of the folder and everything under it. A folder's
    mtime changes when an entry is created or removed in it, even a temporary file."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for path in [root, *(os.path.join(root, name) for name in dirs + files)]:
            s = os.lstat(path)
            size = s.st_size if stat.S_ISREG(s.st_mode) else None
            found[os.path.relpath(path, folder)] = (stat.S_IFMT(s.st_mode), size, s.st_mtime_ns)
    return found


@contextlib.contextmanager
def working_dir(folder):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def refused(folder, args):
    """Run `distbp ARGS` in `folder`: exit 2, one line on stderr, nothing under `folder` touched."""
    args = [str(a) for a in args]
    before = snapshot(folder)
    with working_dir(folder):
        result = CliRunner().invoke(main, args)
    after = snapshot(folder)
    shown = f"cd {folder} && distbp {shlex.join(args)}\n--- output:\n{result.output}--- exception: {result.exception!r}"
    assert "Traceback" not in result.output and "internal error" not in result.output, shown
    assert result.exit_code == 2, shown
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert result.stdout == "" and result.stderr.strip() == lines[0], shown  # on stderr, nothing on stdout
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"{shown}\n--- touched: {changed}"
    return lines[0]


def new_folder(root):
    """A fresh, empty folder for one example (the function-scoped tmp_path is shared by all)."""
    return Path(tempfile.mkdtemp(dir=root))


# ---------------------------------------------------------------- assets, made once

def spirals(rows=ROWS):
    return datasets.make_dataset("spirals", rows, seed=1, classes=3)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Good data in three formats and a good model.npz for it (made without Ray)."""
    root = tmp_path_factory.mktemp("assets")
    table = spirals()
    for ext in ("parquet", "csv", "feather"):
        tables.write_table(table, str(root / f"data.{ext}"), row_group_size=8)
    spec = nn.Spec((2, 4, 3), ("tanh",), "softmax", "cross_entropy", "xavier", "float64")
    params = nn.init_params(spec, np.random.default_rng(0))
    Model(spec, params, "classification", ["x0", "x1"], ["label"], [0, 1, 2], np.zeros(2), np.ones(2)).save(str(root / "model.npz"))
    with np.load(root / "model.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return {"root": root, "table": table, "arrays": arrays, "spec": json.loads(str(arrays["spec"]))}


def put(assets, folder, name, as_name=None):
    shutil.copyfile(assets["root"] / name, folder / (as_name or name))
    return as_name or name


def base_job():
    """A tiny valid job for data.parquet; run from its folder, its run folder is runs/fz."""
    return {
        "name": "fz",
        "seed": 3,
        "data": {"path": "data.parquet", "label": "label"},
        "model": {"layers": [2, 8, 3], "activation": "tanh", "dtype": "float64"},
        "train": {"steps": 3, "optimizer": {"name": "sgd", "lr": 0.5}, "eval_every": 2},
        "cluster": {"workers": 1, "chunk_rows": 16},
    }


def yaml_text(value):
    """One YAML scalar or flow collection that reads back as `value` (for --set KEY=VALUE)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text  # a plain scalar ends its document


# ---------------------------------------------------------------- values a key never accepts

WORDS = st.from_regex(r"[A-Za-z][A-Za-z_]{0,10}", fullmatch=True)  # never a number (nor inf/nan: not finite)
NON_INTEGRAL = st.builds(lambda i, f: i + f, st.integers(-10**6, 10**6), st.sampled_from([0.5, 0.25, 0.1, 0.999, 1e-3]))
CONTAINERS = st.sampled_from([[], [1], {}, {"a": 1}, [[2]], {"x": [1, 2]}])
NULL = st.none()


def bad_number(integer=False, ge=None, gt=None, lt=None, le=None, nullable=False):
    """Values a number key with these bounds refuses, whatever the other keys say."""
    options = [WORDS, CONTAINERS, st.booleans(), st.just(float("nan")), st.sampled_from([float("inf"), float("-inf")])]
    if not nullable:
        options.append(NULL)
    if integer:
        options.append(NON_INTEGRAL)
        if ge is not None:
            options.append(st.integers(max_value=ge - 1))
    else:
        if gt is not None:
            options.append(st.floats(max_value=gt, allow_nan=False))
        if ge is not None:
            options.append(st.floats(max_value=ge, exclude_max=True, allow_nan=False))
        if lt is not None:
            options.append(st.floats(min_value=lt, allow_nan=False))
        if le is not None:
            options.append(st.floats(min_value=le, exclude_min=True, allow_nan=False))
    return st.one_of(*options)


def bad_choice(options):
    return st.one_of(WORDS.filter(lambda w: w not in options), st.integers(), st.booleans(), NULL,
                     st.sampled_from([{}, {"a": 1}, 1.5]))


def not_a_mapping():
    """Values a section (a mapping) refuses; null reads as the empty mapping, so it is left out."""
    return st.one_of(WORDS, st.integers(), st.booleans(), st.sampled_from([[], [1], ["a", "b"], 2.5]))


NOT_A_STRING = st.one_of(st.integers(), st.booleans(), st.just(""), st.sampled_from([[], ["a"], {}, {"a": 1}, 1.5]))

# dotted key -> values the job schema refuses for it whatever the other keys hold (no cross-key
# rules: the job-file fuzzer mutates the other keys at random)
SCHEMA_BAD = {
    "name": st.one_of(NOT_A_STRING, NULL, st.sampled_from([".", "..", "a/b", "a\\b", "/", "../up"])),
    "seed": bad_number(integer=True, ge=0),
    "data": not_a_mapping(),
    "data.path": NOT_A_STRING,
    "data.make": st.one_of(not_a_mapping(), st.sampled_from([
        {}, {"kind": "nope"}, {"kind": None}, {"kind": "xor", "rows": 0}, {"kind": "spirals", "rows": -3},
        {"kind": "xor", "rows": "many"}, {"kind": "xor", "rows": 2.5}, {"kind": "xor", 1: 2}, {"kind": "xor", "": 2},
        {"kind": "blobs", "spread": float("nan")}, {"kind": "blobs", "spread": float("inf")}, {"rows": 10}])),
    "data.format": bad_choice(("auto", "parquet", "csv", "feather")),
    "data.features": st.sampled_from(["x0", 5, [], [1], ["x0", "x0"], [""], [None], [["x0"]], {"x0": 1}, True]),
    "data.label": st.one_of(st.integers(), st.booleans(), NULL, st.sampled_from(["", [], [1], ["a", "a"], [""], {}, {"a": 1}])),
    "data.task": bad_choice(("classification", "regression")),
    "data.standardize": st.one_of(st.integers(), WORDS, NULL, CONTAINERS, st.floats(allow_nan=False)),
    "data.validation": st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, allow_nan=False),
                                 st.integers().filter(lambda i: i <= 0 or i >= 1), st.booleans(), CONTAINERS,
                                 st.sampled_from(["", "-0.5", "1.5", "0", "1", float("nan")])),
    "data.on_nan": bad_choice(("error", "drop")),
    "model": not_a_mapping(),
    "model.layers": st.one_of(
        st.integers(), WORDS, st.booleans(), NULL, st.just([]),
        st.lists(st.integers(1, 64), min_size=1, max_size=1),
        st.lists(st.integers(1, 64), min_size=2, max_size=5).flatmap(
            lambda ws: st.tuples(st.integers(0, len(ws) - 1), st.one_of(st.integers(max_value=0), NON_INTEGRAL, WORDS, NULL, CONTAINERS)).map(
                lambda iv: ws[: iv[0]] + [iv[1]] + ws[iv[0] + 1:]))),
    "model.activation": st.one_of(WORDS.filter(lambda w: w not in ACTIVATIONS), st.integers(), st.booleans(), NULL,
                                  st.sampled_from([{}, {"tanh": 1}, 1.5, ["nope"], [1], [None]])),
    "model.output": bad_choice(tuple(LOSS_FOR_OUTPUT)),
    "model.loss": bad_choice(tuple(LOSS_FOR_OUTPUT.values())),
    "model.init": bad_choice(tuple(nn.INITS)),
    "model.dtype": bad_choice(("float32", "float64")),
    "train": not_a_mapping(),
    "train.steps": bad_number(integer=True, ge=1, nullable=True),
    "train.epochs": bad_number(integer=True, ge=1, nullable=True),
    "train.batch": st.one_of(st.integers(max_value=0), NON_INTEGRAL, WORDS.filter(lambda w: w != "full"), NULL,
                             CONTAINERS, st.booleans(), st.sampled_from(["Full", "FULL", "half", "-1", "0.5"])),
    "train.optimizer": not_a_mapping(),
    "train.optimizer.name": bad_choice(tuple(optim.OPTIMIZERS)),
    "train.optimizer.lr": bad_number(gt=0),
    "train.optimizer.momentum": bad_number(ge=0, lt=1),
    "train.optimizer.beta1": bad_number(ge=0, lt=1),
    "train.optimizer.beta2": bad_number(ge=0, lt=1),
    "train.optimizer.eps": bad_number(gt=0),
    "train.optimizer.weight_decay": bad_number(ge=0),
    "train.schedule": not_a_mapping(),
    "train.schedule.name": bad_choice(tuple(schedule.SCHEDULES)),
    "train.schedule.warmup_steps": bad_number(integer=True, ge=0),
    "train.schedule.gamma": bad_number(gt=0, le=1),
    "train.schedule.every": bad_number(integer=True, ge=1, nullable=True),
    "train.schedule.min_lr": bad_number(ge=0),
    "train.early_stopping": not_a_mapping(),
    "train.early_stopping.metric": bad_choice(("val_loss", "val_accuracy")),
    "train.early_stopping.patience": bad_number(integer=True, ge=1),
    "train.early_stopping.min_delta": bad_number(ge=0),
    "train.eval_every": bad_number(integer=True, ge=1),
    "train.checkpoint_every": bad_number(integer=True, ge=1),
    "train.keep_checkpoints": bad_number(integer=True, ge=1),
    "cluster": not_a_mapping(),
    "cluster.workers": bad_number(integer=True, ge=1),
    "cluster.cpus_per_worker": bad_number(gt=0),
    "cluster.address": NOT_A_STRING,
    "cluster.connect_timeout_s": bad_number(gt=0),
    "cluster.parameter_servers": st.one_of(WORDS.filter(lambda w: w not in ("auto", "per_worker")), CONTAINERS, st.booleans(), NULL,
                                           NON_INTEGRAL, st.integers(max_value=0), st.sampled_from(["per-worker", "Auto", "0", "-1", "1.5"])),
    "cluster.parameter_resources": st.one_of(not_a_mapping(), st.sampled_from([
        {"CPU": -1}, {"GPU": "many"}, {"x": None}, {"x": [1]}, {1: 2}, {"": 1}, {"x": float("inf")}])),
    "cluster.chunk_rows": bad_number(integer=True, ge=1),
    "cluster.max_failures": bad_number(integer=True, ge=0),
    "cluster.wait_for_nodes_s": bad_number(ge=0),
    "cluster.elastic": st.one_of(st.integers(), WORDS, NULL, CONTAINERS, st.floats(allow_nan=False)),
    "cluster.min_workers": bad_number(integer=True, ge=1),
    "cluster.engine": bad_choice(("direct", "tasks")),
    "cluster.tcp_congestion": bad_choice(("auto", "system")),
    "cluster.blas_kernel": st.one_of(st.integers(), NULL, CONTAINERS, st.booleans(), st.sampled_from(["", "Has well", "9x", "a/b", "x" * 40])),
    "output": not_a_mapping(),
    "output.dir": NOT_A_STRING,
    "output.plot": st.one_of(st.integers(), WORDS, NULL, CONTAINERS, st.floats(allow_nan=False)),
    "output.tensorboard": st.one_of(st.integers(), WORDS, NULL, CONTAINERS, st.floats(allow_nan=False)),
}


def test_the_schema_table_covers_every_job_key():
    """SCHEMA_BAD names every key of the job schema, so a new key gets fuzzed too."""
    sections = {"data": DataCfg, "model": ModelCfg, "train": TrainCfg, "cluster": ClusterCfg, "output": OutputCfg,
                "train.optimizer": OptimizerCfg, "train.schedule": ScheduleCfg, "train.early_stopping": EarlyStopCfg}
    keys = {"name", "seed", *sections}
    for prefix, cls in sections.items():
        keys |= {f"{prefix}.{name}" for name in cls.__dataclass_fields__}
    assert keys == set(SCHEMA_BAD)


# known fields per mapping of the schema (data.make and parameter_resources take any names)
SECTION_KEYS = {
    (): ["name", "seed", "data", "model", "train", "cluster", "output"],
    ("data",): list(DataCfg.__dataclass_fields__),
    ("model",): list(ModelCfg.__dataclass_fields__),
    ("train",): list(TrainCfg.__dataclass_fields__),
    ("train", "optimizer"): list(OptimizerCfg.__dataclass_fields__),
    ("train", "schedule"): list(ScheduleCfg.__dataclass_fields__),
    ("train", "early_stopping"): list(EarlyStopCfg.__dataclass_fields__),
    ("cluster",): list(ClusterCfg.__dataclass_fields__),
    ("output",): list(OutputCfg.__dataclass_fields__),
}


def set_at(d, path, value):
    """d[path[0]]...[path[-1]] = value, turning whatever is in the way into mappings."""
    node = d
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


# ---------------------------------------------------------------- files and folders in the way

def _file_in_the_way(folder):
    (folder / "afile").write_bytes(b"keep me")


def _run_folder(folder, assets):
    """runs/fz holding a run (no checkpoint): refused without --force, and kept intact with it."""
    run = folder / "runs" / "fz"
    run.mkdir(parents=True, exist_ok=True)
    (run / "job.yaml").write_text(yaml.safe_dump(base_job()))
    (run / "metrics.csv").write_text("step,loss\n1,1.0\n")
    shutil.copyfile(assets["root"] / "model.npz", run / "model.npz")


# ---------------------------------------------------------------- bad data files

DATA_KINDS = {  # kind -> the commands that always refuse it (eval reads the labels too, predict only the features)
    "missing": "run eval predict", "missing_deep": "run eval predict", "glob": "run eval predict",
    "empty_dir": "run eval predict", "junk_dir": "run eval predict", "unknown_ext": "run eval predict",
    "random": "run eval predict", "truncated": "run eval predict", "wrong_magic": "run eval predict",
    "csv_as_binary": "run eval predict", "ragged_csv": "run eval predict", "no_rows": "run eval predict",
    "no_x1": "run eval predict", "string_x1": "run eval predict", "list_x1": "run eval predict",
    "no_label": "run eval", "alien_labels": "eval", "null_labels": "eval",
}


def data_kinds(command):
    return [kind for kind, commands in DATA_KINDS.items() if command in commands.split()]


@st.composite
def bad_data_file(draw, kind):
    """setup(folder, assets) -> the name of a data file or folder of this kind, made in `folder`."""
    table = spirals()
    ext = draw(st.sampled_from(["parquet", "csv", "feather"]), label="format")
    name = draw(WORDS, label="name")

    def write(t, fmt=ext):
        return lambda folder, assets: (tables.write_table(t, str(folder / f"{name}.{fmt}"), row_group_size=8), f"{name}.{fmt}")[1]

    def raw(as_name, content):
        return lambda folder, assets: ((folder / as_name).write_bytes(content), as_name)[1]

    if kind == "missing":
        return lambda folder, assets: f"{name}.{ext}"
    if kind == "missing_deep":
        deep = f"no/such/{name}/{'x' * draw(st.integers(1, 300))}.{ext}"
        return lambda folder, assets: deep
    if kind == "glob":
        return lambda folder, assets: f"{name}*.{ext}"
    if kind in ("empty_dir", "junk_dir"):
        def setup(folder, assets):
            (folder / name).mkdir(exist_ok=True)
            if kind == "junk_dir":
                (folder / name / "notes.txt").write_text("x0,x1,label\n1,2,0\n")
            return name
        return setup
    if kind == "unknown_ext":
        as_name = f"{name}.{draw(st.sampled_from(['txt', 'json', 'npz', 'data']))}"
        return lambda folder, assets: put(assets, folder, "data.parquet", as_name)
    if kind == "random":
        blob = draw(st.binary(max_size=400), label="bytes")
        assume(b"x0" not in blob and b"x1" not in blob and b"label" not in blob)
        return raw(f"{name}.{draw(st.sampled_from([ext, 'csv.gz', 'csv.bz2']))}", blob)
    if kind == "truncated":
        fmt = draw(st.sampled_from(["parquet", "feather"]))
        cut = draw(st.floats(0, 1, exclude_max=True), label="cut at")

        def setup(folder, assets):
            content = (assets["root"] / f"data.{fmt}").read_bytes()
            return raw(f"{name}.{fmt}", content[: int(cut * len(content))])(folder, assets)
        return setup
    if kind == "wrong_magic":  # one binary format under the other's extension
        src, dst = draw(st.sampled_from([("parquet", "feather"), ("feather", "parquet")]))
        return lambda folder, assets: put(assets, folder, f"data.{src}", f"{name}.{dst}")
    if kind == "csv_as_binary":
        as_name = f"{name}.{draw(st.sampled_from(['parquet', 'feather']))}"
        return lambda folder, assets: put(assets, folder, "data.csv", as_name)
    if kind == "ragged_csv":
        return raw(f"{name}.csv", b"x0,x1,label\n0.5,0.5,1\n" + draw(st.sampled_from([b"1,2\n", b"1,2,3,4\n", b"1\n"])))
    if kind == "no_rows":
        return write(table.slice(0, 0))
    if kind == "no_x1":
        return write(table.drop_columns(["x1"]))
    if kind == "no_label":
        return write(table.drop_columns(["label"]))
    binary = draw(st.sampled_from(["parquet", "feather"]))
    if kind == "string_x1":
        words = draw(st.lists(WORDS, min_size=ROWS, max_size=ROWS))
        return write(table.set_column(1, "x1", pa.array(words)), binary)
    if kind == "list_x1":
        return write(table.set_column(1, "x1", pa.array([[1.0, 2.0]] * ROWS)), binary)
    if kind == "alien_labels":
        labels = draw(st.sampled_from([[7] * ROWS, [-1] * ROWS, [1.5] * ROWS, ["a"] * ROWS, [0, 1, 2, 3, 4] * (ROWS // 5)]))
        return write(table.set_column(2, "label", pa.array(labels)), binary)
    assert kind == "null_labels"
    return write(table.set_column(2, "label", pa.array([None] * (ROWS - 1) + [1], pa.int64())), binary)


def bad_data_files(command):
    return st.sampled_from(data_kinds(command)).flatmap(bad_data_file)


# ---------------------------------------------------------------- run: bad values on the command line

def fault(args=(), setup=None, dry_ok=True, needle=None, no_force=False):
    """One bad thing about a `distbp run` command: `setup(folder, job_dir, assets)` makes its
    files and returns its arguments (else `args`); whether --dry-run refuses it too (dry-run
    does not look at the run folder, --resume or data.make); what the error names when it is
    the only fault; and whether --force would make it valid (a run already in the folder)."""
    return {"setup": setup or (lambda folder, job_dir, assets: list(args)), "dry_ok": dry_ok, "needle": needle, "no_force": no_force}


def set_fault(key, value, needle=None, dry_ok=True):
    return fault(["--set", f"{key}={yaml_text(value)}"], dry_ok=dry_ok, needle=needle)


def data_fault(key, setup):
    """--set KEY=<a bad data file made in the job file's folder, which relative paths resolve against>."""
    return fault(setup=lambda folder, job_dir, assets: ["--set", f"{key}={yaml_text(setup(job_dir, assets))}"])


MALFORMED_SETS = [  # misspelt keys, assignments that are not KEY=VALUE, values that are not YAML
    "model.layer=[2, 8, 3]", "trian.steps=3", "train.optimizer.momentun=0.5", "data.paht=x.parquet",
    "train.steps", "=5", "train..steps=5", ".steps=5", "train.steps.=5", " =1", "model.layers.0=5",
    "train.steps.x=1", "train.optimizer.lr.x=1", "seed=2024-13-40", "data.path=2024-02-30", "seed=[1, 2",
    "seed={a: 1", "seed=: :", "name='unterminated", "seed=!!python/object:os.system {}", "seed=*alias",
    "seed=!!int abc", "seed=!!float x", "seed=" + "[" * 600, "seed=" + "[" * 300 + "]" * 300,
    "data.path=!!binary aGVsbG8=", "data=!!set {a}", "seed=%YAML 9.9",
]

# values the job schema refuses, keys it does not know, assignments that are not KEY=VALUE
SCHEMA_FAULTS = st.one_of(
    st.sampled_from(sorted(SCHEMA_BAD)).flatmap(
        lambda key: SCHEMA_BAD[key].map(lambda value: set_fault(key, value, needle=f"job.yaml: {key}"))),
    st.sampled_from(sorted(SECTION_KEYS)).flatmap(lambda path: WORDS.filter(lambda w: w not in SECTION_KEYS[path]).map(
        lambda word: set_fault(".".join((*path, word)), 1, needle=f"job.yaml: {'.'.join((*path, word))}: unknown key"))),
    st.sampled_from(MALFORMED_SETS).map(lambda text: fault(["--set", text])),
)

# data.make writes data.path only when it is missing, and only once the job has passed the checks:
# each of these is refused before anything is written, whatever the other faults change
MAKES = [
    ({"kind": "spirals", "rows": ROWS, "classes": 1}, []), ({"kind": "xor", "rows": ROWS, "classes": 3}, []),
    ({"kind": "blobs", "rows": ROWS, "features": 0}, []), ({"kind": "teacher", "rows": ROWS, "layers": [2, 1]}, []),
    ({"kind": "xor", "rows": ROWS, "noise": -1}, []), ({"kind": "blobs", "rows": ROWS, "spread": 0}, []),
    ({"kind": "teacher", "rows": ROWS, "layers": "2,3"}, []), ({"kind": "digits", "rows": 5000}, []),
    ({"kind": "xor", "rows": ROWS, "bogus": 1}, []),
    ({"kind": "blobs", "rows": ROWS, "features": 50}, []),  # 50 features: no input width drawn below fits
    ({"kind": "teacher", "rows": ROWS, "layers": [45, 3]}, []),
    ({"kind": "xor", "rows": 1}, ["--workers", "2"]),  # fewer rows than workers
    ({"kind": "spirals", "rows": ROWS}, ["--set", "data.label=y"]),  # no such label column
]
NOT_A_COLUMN = WORDS.filter(lambda w: w not in ("x0", "x1", "label"))  # WORDS never look like x12 either

# values the schema takes but the data, the run folder, --resume or data.make refuse; one
# branch per kind, so that each is drawn about as often as the others
FIT_FAULTS = [
    *[bad_data_file(kind).map(lambda setup: data_fault("data.path", setup)) for kind in data_kinds("run")],
    bad_data_files("run").map(lambda setup: data_fault("data.validation", setup)),
    st.tuples(st.integers(1, 40).filter(lambda n: n != 2), st.lists(st.integers(1, 16), min_size=1, max_size=3)).map(
        lambda wh: set_fault("model.layers", [wh[0], *wh[1], 3], needle="model.layers[0]: expected 2")),
    NOT_A_COLUMN.map(lambda w: set_fault("data.label", w, needle=f"data.label: column '{w}' not found")),
    NOT_A_COLUMN.map(lambda w: set_fault("data.features", ["x0", w], needle=f"data.features: column '{w}' not found")),
    st.integers(ROWS + 1, 10**6).map(lambda n: fault(["--workers", str(n)], needle=f"more workers ({n}) than rows ({ROWS})")),
    st.sampled_from(["csv", "feather"]).map(lambda fmt: set_fault("data.format", fmt, needle=f"as {fmt}")),  # parquet read as another format
    st.one_of(st.integers(max_value=0).map(str), NON_INTEGRAL.map(repr), WORDS,
              st.sampled_from(["", "[2]", "{a: 1}", "1 2", "0x", "2024-13-40"])).map(lambda w: fault(["--workers", w], needle="cluster.workers")),
    st.sampled_from(["afile", "afile/run", "afile/deeper/run"]).map(lambda out: fault(
        setup=lambda folder, job_dir, assets: (_file_in_the_way(folder), ["--out", out])[1], dry_ok=False, needle="output.dir")),
    st.just(fault(["--resume"], dry_ok=False, needle="--resume found no checkpoint")),
    st.just(fault(["--resume", "--force"], dry_ok=False, needle="--resume and --force exclude each other")),
    st.just(fault(setup=lambda folder, job_dir, assets: (_run_folder(folder, assets), [])[1], dry_ok=False,
                  no_force=True, needle="already holds a run")),
    *[st.just(fault(["--set", "data.path=made.parquet", "--set", f"data.make={yaml_text(make)}", *more], dry_ok=False))
      for make, more in MAKES],
]


def run_refused(tmp_path, assets, faults, dry_run, flags, with_run=False, job_name="job.yaml"):
    folder = new_folder(tmp_path)
    job = folder / job_name
    job.parent.mkdir(exist_ok=True)
    put(assets, job.parent, "data.parquet")
    job.write_text(yaml.safe_dump(base_job(), sort_keys=False))
    if with_run:  # an earlier run that --force would replace: a refused job must leave it as it was
        _run_folder(folder, assets)
        flags = [*flags, "--force"] if "--force" not in flags else flags
    args = ["run", job_name]
    for f in faults:
        args += f["setup"](folder, job.parent, assets)
    if any(f["no_force"] for f in faults):
        flags = [flag for flag in flags if flag != "--force"]
    dry = dry_run and all(f["dry_ok"] for f in faults)
    line = refused(folder, args + flags + (["--dry-run"] if dry else []))
    if len(faults) == 1 and faults[0]["needle"] and not (with_run and "--resume" in args):
        assert faults[0]["needle"] in line, (faults[0]["needle"], line)


FLAGS = st.lists(st.sampled_from(["--quiet", "--verbose", "--force"]), unique=True, max_size=2)


@settings(FUZZ, max_examples=60)
@given(first=SCHEMA_FAULTS, more=st.lists(SCHEMA_FAULTS, max_size=1), dry_run=st.booleans(), flags=FLAGS)
def test_run_refuses_bad_job_values(tmp_path, assets, first, more, dry_run, flags):
    """`distbp run job.yaml --set KEY=VALUE` with values the job schema never accepts, keys it
    does not know, and assignments that are not KEY=VALUE."""
    run_refused(tmp_path, assets, [first, *more], dry_run, flags)


@settings(FUZZ, max_examples=100)  # all of them
@given(assignment=st.sampled_from(MALFORMED_SETS), command=st.sampled_from([["run", "--dry-run"], ["run"], ["gradcheck"]]))
def test_malformed_set_assignments_are_refused(tmp_path, assets, assignment, command):
    """Every assignment of MALFORMED_SETS, on each command that takes --set."""
    folder = new_folder(tmp_path)
    put(assets, folder, "data.parquet")
    (folder / "job.yaml").write_text(yaml.safe_dump(base_job(), sort_keys=False))
    refused(folder, [command[0], "job.yaml", *command[1:], "--set", assignment])


@settings(FUZZ, max_examples=80)
@given(first=st.one_of(*FIT_FAULTS), more=st.lists(st.one_of(*FIT_FAULTS), max_size=1), dry_run=st.booleans(),
       flags=FLAGS, with_run=st.booleans(), job_name=st.sampled_from(["job.yaml", "job.yml", "a job.yaml", "sub/job.yaml"]))
def test_run_refuses_values_that_do_not_fit(tmp_path, assets, first, more, dry_run, flags, with_run, job_name):
    """`distbp run JOB` with values the schema takes but the data, the run folder or data.make
    refuse; with --dry-run where that refuses them too, and with or without an earlier run in
    the run folder (which --force must leave as it was)."""
    run_refused(tmp_path, assets, [first, *more], dry_run, flags, with_run, job_name)


# ---------------------------------------------------------------- job files

VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
              st.sampled_from(["1e-3", "full", "tanh", "x0", "label", "data.parquet", [2, 8, 3], {}])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)),
    max_leaves=10)


@st.composite
def noisy(draw, job):
    """A few random edits anywhere: delete, rename, replace with random nesting, add a key."""
    for _ in range(draw(st.integers(0, 3))):
        picked = pick_key(draw, job)
        if picked is None:
            break
        node, path = picked
        action = draw(st.sampled_from(["delete", "rename", "replace", "add"]))
        if action == "delete":
            del node[path[-1]]
        elif action == "rename":
            node[draw(st.one_of(st.text(min_size=1, max_size=10), st.integers()))] = node.pop(path[-1])
        elif action == "replace":
            node[path[-1]] = draw(VALUES)
        else:
            node[draw(st.text(max_size=8))] = draw(VALUES)
    return job


@st.composite
def poisoned(draw, job):
    """At least one edit that the job schema always refuses: an unknown key in one of its
    mappings, or a value a key never accepts."""
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            path = draw(st.sampled_from(sorted(SECTION_KEYS)))
            key = draw(st.one_of(WORDS, st.text(min_size=1, max_size=12), st.integers(), st.sampled_from([True, None, 1.5])))
            assume(key not in SECTION_KEYS[path])
            set_at(job, (*path, key), draw(VALUES))
        else:
            key = draw(st.sampled_from(sorted(SCHEMA_BAD)))
            set_at(job, tuple(key.split(".")), draw(SCHEMA_BAD[key]))
    return job


BROKEN_YAML = st.sampled_from([
    "model: [2, 8\n", "data: {path: x\n", "a: b: c\n", "- a\nb: c\n", "name: 'unterminated\n", "\tname: x\n",
    "name: !!python/object:os.system {}\n", "name: *nowhere\n", "? [a, b]\n: 1\n", "seed: 2024-13-40\n",
    "model: " + "[" * 600 + "\n", "model: " + "[" * 400 + "]" * 400 + "\n", "name: x\nname: y\n: z\n",
    "%YAML 9.9\n---\nname: x\n", "name: x\n---\nname: y\n", "&a [*a]\n", "data: &a {path: *a}\n", "{\n",
    "name: !!int abc\n", "seed: !!float x\n", "data: !!set {a, b}\n", "\ufeffname: [\n",
])


@st.composite
def bad_job_files(draw):
    """Bytes of a job file the CLI must refuse: not a mapping, broken YAML, random bytes, a
    poisoned job truncated anywhere, or a valid job with random noise and at least one poison."""
    kind = draw(st.sampled_from(["not_a_mapping", "broken", "bytes", "truncated", "poisoned", "poisoned", "poisoned"]))
    if kind == "not_a_mapping":
        value = draw(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                               st.lists(VALUES, max_size=3)))
        return yaml.safe_dump(value, allow_unicode=True).encode()
    if kind == "broken":
        return draw(BROKEN_YAML).encode("utf-8")
    if kind == "bytes":
        blob = draw(st.binary(max_size=300))
        return blob if draw(st.booleans()) else b"\xff\xfe" + blob  # the second is never UTF-8
    job = base_job()
    if kind == "truncated":  # an unknown key first, so every prefix is refused too
        text = yaml.safe_dump({"bogus": 1, **job}, sort_keys=False)
        return text[: draw(st.integers(0, len(text)))].encode()
    job = draw(poisoned(draw(noisy(job))))
    flow = draw(st.sampled_from([None, True, False]))
    return yaml.safe_dump(job, sort_keys=False, allow_unicode=True, default_flow_style=flow).encode()


@settings(FUZZ, max_examples=60)
@given(content=bad_job_files(), command=st.sampled_from([["run", "--dry-run"], ["gradcheck"], ["run", "--quiet", "--force"]]))
def test_bad_job_files_are_refused(tmp_path, assets, content, command):
    folder = new_folder(tmp_path)
    put(assets, folder, "data.parquet")
    (folder / "job.yaml").write_bytes(content)
    refused(folder, [command[0], "job.yaml", *command[1:]])


@FUZZ
@given(which=st.sampled_from(["missing", "folder", "data", "model", "empty", "long"]),
       command=st.sampled_from([["run", "--dry-run"], ["gradcheck"], ["run"]]))
def test_bad_job_paths_are_refused(tmp_path, assets, which, command):
    folder = new_folder(tmp_path)
    put(assets, folder, "data.parquet")
    put(assets, folder, "model.npz")
    (folder / "adir").mkdir()
    (folder / "empty.yaml").write_bytes(b"")
    job = {"missing": "nosuch.yaml", "folder": "adir", "data": "data.parquet", "model": "model.npz",
           "empty": "empty.yaml", "long": "x" * 300 + ".yaml"}[which]
    refused(folder, [command[0], job, *command[1:]])


# ---------------------------------------------------------------- eval and predict: bad model and data files

MODEL_KINDS = ["missing", "folder", "random", "data_file", "no_key", "spec_not_json", "format_version", "bad_spec",
               "features", "text_weights", "ndim"]


@st.composite
def bad_model_file(draw, kind):
    """setup(folder, assets) -> the name of a model file of this kind, which load_model refuses."""

    def npz(**changes):
        def setup(folder, assets):
            arrays = {**assets["arrays"], **{k: v(assets) if callable(v) else v for k, v in changes.items()}}
            np.savez(folder / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
            return "bad.npz"
        return setup

    def spec(**fields):
        return npz(spec=lambda assets: np.array(json.dumps({**assets["spec"], **fields})))

    if kind == "missing":
        missing = draw(st.sampled_from(["nosuch.npz", "no/such/model.npz", "x" * 300 + ".npz"]))
        return lambda folder, assets: missing
    if kind == "folder":
        return lambda folder, assets: ((folder / "m.npz").mkdir(), "m.npz")[1]
    if kind == "random":
        blob = draw(st.binary(min_size=1, max_size=400), label="bytes")
        assume(not blob.startswith((b"PK", b"\x93NUMPY")))  # zip and npy magic: ONCE_INTERNAL_ERRORS has those
        return lambda folder, assets: ((folder / "bad.npz").write_bytes(blob), "bad.npz")[1]
    if kind == "data_file":
        fmt = draw(st.sampled_from(["parquet", "csv", "feather"]))
        return lambda folder, assets: put(assets, folder, f"data.{fmt}", f"model.{fmt}")
    if kind == "no_key":
        return npz(**{draw(st.sampled_from(["spec", "W1", "b1", "W2", "b2"])): None})
    if kind == "spec_not_json":
        return npz(spec=np.array("<" + draw(st.text(max_size=40))))
    if kind == "format_version":
        return spec(format_version=draw(st.sampled_from([0, 2, -1, "1", None, [1], "one", 1.5])))
    if kind == "bad_spec":
        field, value = draw(st.sampled_from([
            ("layers", [2, 0, 3]), ("layers", [2, -4, 3]), ("layers", [2]), ("layers", []), ("layers", ["a", 4, 3]),
            ("activations", ["nope"]), ("activations", ["tanh", "tanh"]), ("activations", []), ("output", "nope"),
            ("output", "sigmoid"), ("loss", "mse"), ("loss", "nope"), ("dtype", "float16"), ("dtype", "int8"), ("init", "nope")]))
        return spec(**{field: value})
    if kind == "features":  # names the data does not have
        names = draw(st.lists(WORDS.filter(lambda w: w not in ("x0", "x1")), min_size=1, max_size=2, unique=True))
        return spec(features=(names + ["x0", "x1"])[:2])
    if kind == "text_weights":
        return npz(W1=np.array([["a"] * 4] * 2))
    assert kind == "ndim"
    return npz(b1=np.zeros((4, 1)))


OUT_FAULTS = ["out.txt", "out.csv.gz", "out.parquet.bz2", "out", "afile/out.csv", "odir.parquet", "foo://out.csv", "mock://out.csv"]


@settings(FUZZ, max_examples=80)
@given(command=st.sampled_from(["eval", "predict"]), draws=st.data())
def test_eval_and_predict_refuse_bad_files(tmp_path, assets, command, draws):
    """`distbp eval MODEL DATA` and `distbp predict MODEL DATA -o OUT` with one or two of
    MODEL, DATA and OUT bad, the others good."""
    kinds = [("model", k) for k in MODEL_KINDS] + [("data", k) for k in data_kinds(command)]
    kinds += [("out", o) for o in OUT_FAULTS] if command == "predict" else []
    bad = dict([draws.draw(st.sampled_from(kinds), label="bad"), *draws.draw(st.lists(st.sampled_from(kinds), max_size=1), label="also bad")])
    folder = new_folder(tmp_path)
    _file_in_the_way(folder)
    (folder / "odir.parquet").mkdir()
    model = draws.draw(bad_model_file(bad["model"]), label="model")(folder, assets) if "model" in bad else put(assets, folder, "model.npz")
    good = st.sampled_from(["data.parquet", "data.csv", "data.feather"]).map(lambda name: lambda folder, assets: put(assets, folder, name))
    data_name = draws.draw(bad_data_file(bad["data"]) if "data" in bad else good, label="data")(folder, assets)
    out = ["-o", bad.get("out") or draws.draw(st.sampled_from(["out.csv", "out.parquet", "sub/out.feather"]))] if command == "predict" else []
    refused(folder, [command, model, data_name, *out])


# ---------------------------------------------------------------- data make

@st.composite
def bad_data_make(draw):
    """`distbp data make KIND ...` with one (sometimes two) bad values, everything else valid and small."""
    kind = draw(st.sampled_from(["xor", "spirals", "blobs", "teacher", "digits"]))
    options = {"--rows": str(draw(st.integers(1, 40))), "-o": draw(st.sampled_from(["out.parquet", "out.csv", "out.feather", "sub/out.csv"]))}
    if kind == "teacher":
        options["--layers"] = draw(st.sampled_from(["3,2", "4,3,2"]))
    if kind in ("spirals", "blobs") and draw(st.booleans()):
        options["--classes"] = str(draw(st.integers(2, 4)))
    if kind == "blobs" and draw(st.booleans()):
        options["--features"] = str(draw(st.integers(1, 4)))
    faults = ["rows", "rows_text", "seed", "seed_text", "out", "classes", "features", "layers"]
    faults += ["no_rows"] if kind != "digits" else ["too_many_rows"]
    for f in dict.fromkeys(draw(st.sampled_from(faults)) for _ in range(draw(st.sampled_from([1, 1, 1, 2])))):
        if f == "rows":
            options["--rows"] = str(draw(st.integers(max_value=0)))
        elif f == "rows_text":
            options["--rows"] = draw(st.one_of(WORDS, NON_INTEGRAL.map(repr), st.sampled_from(["", "1e3", "10 rows"])))
        elif f == "no_rows":
            options.pop("--rows")
        elif f == "too_many_rows":
            options["--rows"] = str(draw(st.integers(1798, 10**6)))
        elif f == "seed":
            options["--seed"] = str(draw(st.integers(max_value=-1)))
        elif f == "seed_text":
            options["--seed"] = draw(st.one_of(WORDS, NON_INTEGRAL.map(repr)))
        elif f == "out":
            options["-o"] = draw(st.sampled_from(OUT_FAULTS))
        elif f == "classes":  # too few, or an option the kind does not take
            options["--classes"] = str(draw(st.integers(max_value=1) if kind in ("spirals", "blobs") else st.integers()))
        elif f == "features":
            options["--features"] = str(draw(st.integers(max_value=0) if kind == "blobs" else st.integers()))
        elif kind == "teacher":
            options["--layers"] = draw(st.sampled_from(["5", "5,1", "0,3", "5,-1,3", "3,0", "-3,2"]))
        else:
            options["--layers"] = draw(st.sampled_from(["3,2", "4,3,2"]))
    return ["data", "make", kind] + [part for item in options.items() for part in item]


@settings(FUZZ, max_examples=60)
@given(args=bad_data_make())
def test_data_make_refuses_bad_values(tmp_path, args):
    folder = new_folder(tmp_path)
    _file_in_the_way(folder)
    (folder / "odir.parquet").mkdir()
    refused(folder, args)


# ---------------------------------------------------------------- what only the workers see (a few examples, on Ray)

@st.composite
def worker_faults(draw):
    """(table, job edits, what the error names): data whose fault the workers find once they read
    their rows, after the run folder check and before the run folder changes."""
    table = spirals()
    kind = draw(st.sampled_from(["nonfinite", "null_labels", "output_width", "sigmoid", "too_few_rows"]))
    if kind in ("nonfinite", "too_few_rows"):
        columns = {c: table.column(c).to_numpy().copy() for c in ("x0", "x1")}
        if kind == "nonfinite":
            cells = draw(st.lists(st.tuples(st.integers(0, ROWS - 1), st.sampled_from(["x0", "x1"]),
                                            st.sampled_from([np.nan, np.inf, -np.inf])), min_size=1, max_size=4))
        else:  # on_nan: drop leaves fewer training rows than workers
            kept = draw(st.integers(0, 1))
            cells = [(r, "x0", np.nan) for r in range(kept, ROWS)]
        for row, column, value in cells:
            columns[column][row] = value
        table = table.set_column(0, "x0", pa.array(columns["x0"])).set_column(1, "x1", pa.array(columns["x1"]))
        if kind == "nonfinite":
            return table, {}, "NaN or inf values in column"
        return table, {"data": {"on_nan": "drop"}, "cluster": {"workers": 2}}, "more workers (2) than training rows"
    if kind == "null_labels":
        rows = draw(st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=3, unique=True))
        labels = [None if i in rows else v for i, v in enumerate(table.column("label").to_pylist())]
        return table.set_column(2, "label", pa.array(labels, pa.int64())), {}, "missing values"
    if kind == "output_width":
        width = draw(st.sampled_from([2, 4, 5]))
        return table, {"model": {"layers": [2, 8, width]}}, f"model.layers[-1]: expected 3 (the number of classes in 'label'), got {width}"
    return table, {"model": {"layers": [2, 8, 1], "output": "sigmoid"}}, "sigmoid needs exactly 2 classes"


@settings(FUZZ, max_examples=6)
@given(case=worker_faults(), fmt=st.sampled_from(["parquet", "csv", "feather"]))
def test_what_the_workers_refuse_leaves_the_run_folder_alone(ray_session, tmp_path, assets, case, fmt):
    """Data faults found only once the workers have read their rows: exit 2, one line, and an
    earlier run in the run folder left as it was although --force was given."""
    table, edits, needle = case
    folder = new_folder(tmp_path)
    tables.write_table(table, str(folder / f"bad.{fmt}"), row_group_size=8)
    job = base_job()
    job["data"]["path"] = f"bad.{fmt}"
    for key, value in edits.items():
        job[key].update(value)
    (folder / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    _run_folder(folder, assets)
    line = refused(folder, ["run", "job.yaml", "--force", "--quiet"])
    assert needle in line, (needle, line)


# ---------------------------------------------------------------- plot

GOOD_METRICS = "step,loss,accuracy,lr\n1,1.0,0.3,0.1\n2,0.9,0.4,0.1\n"


@st.composite
def bad_plots(draw):
    """(setup(folder) -> args) of `distbp plot RUN_DIR [-o PNG]` that is always refused."""
    kind = draw(st.sampled_from(["missing", "no_metrics", "empty", "header_only", "not_a_number", "no_step_or_loss",
                                 "not_utf8", "metrics_folder", "out_nowhere"]))
    columns = ["step", "loss"] + draw(st.lists(st.sampled_from(["accuracy", "lr", "val_loss", "grad_norm_1"]), unique=True, max_size=2))

    def metrics(text):
        def setup(folder):
            (folder / "run").mkdir()
            if isinstance(text, bytes):
                (folder / "run" / "metrics.csv").write_bytes(text)
            else:
                (folder / "run" / "metrics.csv").write_text(text)
            return ["plot", "run"]
        return setup

    if kind == "missing":
        missing = draw(st.sampled_from(["nosuch", "no/such/run", "x" * 300]))
        return lambda folder: ["plot", missing]
    if kind == "no_metrics":
        return lambda folder: ((folder / "run").mkdir(), ["plot", "run"])[1]
    if kind == "empty":
        return metrics("")
    if kind == "header_only":
        return metrics(",".join(columns) + "\n")
    if kind == "not_a_number":
        rows = draw(st.integers(1, 4))
        cells = [[str(draw(st.floats(-10, 10))) for _ in columns] for _ in range(rows)]
        cells[draw(st.integers(0, rows - 1))][draw(st.integers(0, len(columns) - 1))] = draw(WORDS.filter(lambda w: w.lower() not in ("nan", "inf", "infinity")))
        return metrics(",".join(columns) + "\n" + "".join(",".join(r) + "\n" for r in cells))
    if kind == "no_step_or_loss":
        names = draw(st.lists(WORDS.filter(lambda w: w not in ("step", "loss")), min_size=1, max_size=3, unique=True))
        keep = draw(st.sampled_from([[], ["step"], ["loss"]]))
        names = keep + names
        return metrics(",".join(names) + "\n" + ",".join("1" for _ in names) + "\n")
    if kind == "not_utf8":
        return metrics(b"step,loss\n1," + b"\xff" + draw(st.binary(max_size=50)) + b"\n")
    if kind == "metrics_folder":
        return lambda folder: ((folder / "run" / "metrics.csv").mkdir(parents=True), ["plot", "run"])[1]
    assert kind == "out_nowhere"

    out = draw(st.sampled_from(["no/such/plot.png", "afile/plot.png"]))

    def setup(folder):
        metrics(GOOD_METRICS)(folder)
        _file_in_the_way(folder)
        return ["plot", "run", "-o", out]
    return setup


@settings(FUZZ, max_examples=30)
@given(case=bad_plots())
def test_plot_refuses_bad_run_folders(tmp_path, case):
    folder = new_folder(tmp_path)
    refused(folder, case(folder))


# ---------------------------------------------------------------- bugs the fuzzers found, fixed

def _bench(folder, assets):
    """The files the cases below name: good data, model and job, a file and a folder in the way,
    and data with a string and a list feature column."""
    put(assets, folder, "data.parquet")
    put(assets, folder, "model.npz")
    (folder / "job.yaml").write_text(yaml.safe_dump(base_job(), sort_keys=False))
    _file_in_the_way(folder)
    (folder / "odir.csv").mkdir()
    table = assets["table"]
    tables.write_table(table.set_column(1, "x1", pa.array(["red", "green", "blue"] * (ROWS // 3))), str(folder / "words.parquet"))
    tables.write_table(table.set_column(1, "x1", pa.array([[1.0, 2.0]] * ROWS)), str(folder / "lists.parquet"))


MADE = ["--set", "data.path=made.parquet", "--set"]
FIXED = {  # id -> (args, what the one line says); each was an internal error or left a file behind
    "set-impossible-date": (["run", "job.yaml", "--set", "seed=2024-13-40"], "--set seed=2024-13-40: the value is not valid YAML"),
    "set-deep-nesting": (["run", "job.yaml", "--dry-run", "--set", "seed=" + "[" * 600], "the value is not valid YAML"),
    "workers-impossible-date": (["run", "job.yaml", "--workers", "2024-13-40"], "cluster.workers=2024-13-40"),
    "predict-out-under-a-file": (["predict", "model.npz", "data.parquet", "-o", "afile/p.csv"], "cannot write afile/p.csv"),
    "predict-out-is-a-folder": (["predict", "model.npz", "data.parquet", "-o", "odir.csv"], "cannot write odir.csv: it is a folder"),
    "predict-out-unknown-uri": (["predict", "model.npz", "data.parquet", "-o", "foo://p.csv"], "cannot write foo://p.csv"),
    "make-out-under-a-file": (["data", "make", "xor", "--rows", "5", "-o", "afile/x.csv"], "cannot write afile/x.csv"),
    "make-out-is-a-folder": (["data", "make", "xor", "--rows", "5", "-o", "odir.csv"], "cannot write odir.csv: it is a folder"),
    "make-negative-seed": (["data", "make", "xor", "--rows", "5", "-o", "x.csv", "--seed", "-1"], "seed: expected an integer >= 0, got -1"),
    "eval-string-feature": (["eval", "model.npz", "words.parquet"], "column 'x1' is string, not numeric"),
    "predict-list-feature": (["predict", "model.npz", "lists.parquet", "-o", "p.csv"], "column 'x1' is list<"),
    # data.make wrote data.path, then the checks refused the job
    "run-made-data-too-wide": (["run", "job.yaml", *MADE, "data.make={kind: blobs, rows: 30, features: 5}"], "model.layers[0]: expected 5"),
    "run-made-data-too-few-rows": (["run", "job.yaml", *MADE, "data.make={kind: xor, rows: 1}", "--workers", "2"], "more workers (2) than rows (1)"),
    "run-made-data-no-such-label": (["run", "job.yaml", *MADE, "data.make={kind: xor, rows: 30}", "--set", "data.label=y"], "data.label: column 'y' not found"),
    "run-made-data-bad-validation": (["run", "job.yaml", *MADE, "data.make={kind: spirals, rows: 30}", "--set", "data.validation=v.csv"], "data.validation: "),
    # the message named data.path for the validation file
    "validation-file-missing": (["run", "job.yaml", "--dry-run", "--set", "data.validation=v.parquet"], "data.validation: "),
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_fixed_bugs_stay_fixed(tmp_path, assets, case):
    folder = new_folder(tmp_path)
    _bench(folder, assets)
    args, needle = FIXED[case]
    line = refused(folder, args)
    assert needle in line, (needle, line)


# ---------------------------------------------------------------- known bugs outside this suite's reach

def _npz(assets, folder, **changes):
    arrays = {**assets["arrays"], **changes}
    np.savez(folder / "bad.npz", **{k: v for k, v in arrays.items() if v is not None})
    return "bad.npz"


def _spec(assets, folder, **fields):
    return _npz(assets, folder, spec=np.array(json.dumps({k: v for k, v in {**assets["spec"], **fields}.items() if v is not ...})))


def _raw(folder, name, content):
    (folder / name).write_bytes(content)
    return name


ONCE_INTERNAL_ERRORS = {  # id -> setup(folder, assets) -> args; each was an internal error (or exit 0) and now exits 2 in one line
    # distbp/run/model.py load_model catches OSError, ValueError, KeyError, JSONDecodeError only:
    "model-truncated-npz": lambda f, a: ["eval", _raw(f, "m.npz", (a["root"] / "model.npz").read_bytes()[:100]), "data.parquet"],  # BadZipFile
    "model-empty-file": lambda f, a: ["eval", _raw(f, "m.npz", b""), "data.parquet"],  # EOFError
    "model-is-an-npy": lambda f, a: ["eval", (np.save(f / "m.npy", np.zeros(3)), "m.npy")[1], "data.parquet"],  # ndarray is no context manager
    "model-spec-json-list": lambda f, a: ["eval", _npz(a, f, spec=np.array("[1, 2]")), "data.parquet"],  # AttributeError
    "model-spec-json-number": lambda f, a: ["eval", _npz(a, f, spec=np.array("5")), "data.parquet"],
    "model-spec-layers-int": lambda f, a: ["eval", _spec(a, f, layers=5), "data.parquet"],  # TypeError
    "model-spec-activation-list": lambda f, a: ["eval", _spec(a, f, activations=[["tanh"]]), "data.parquet"],  # unhashable
    "model-spec-no-task": lambda f, a: ["eval", _spec(a, f, task=...), "data.parquet"],  # KeyError outside the try
    "model-spec-features-int": lambda f, a: ["eval", _spec(a, f, features=3), "data.parquet"],
    "model-spec-no-labels": lambda f, a: ["eval", _spec(a, f, labels=[]), "data.parquet"],  # IndexError in api.evaluate
    "model-spec-no-classes": lambda f, a: ["predict", _spec(a, f, classes=[]), "data.parquet", "-o", "p.csv"],  # IndexError in Model.predict
    "model-x-mean-length": lambda f, a: ["eval", _npz(a, f, x_mean=np.zeros(5)), "data.parquet"],  # broadcast ValueError
    "model-weights-shape": lambda f, a: ["eval", _npz(a, f, W1=np.zeros((3, 4))), "data.parquet"],  # accepted: exit 0
    # distbp/cli.py data make --layers: int() unguarded
    "data-make-layers-text": lambda f, a: ["data", "make", "teacher", "--rows", "5", "--layers", "a,b", "-o", "x.csv"],
    "data-make-layers-empty-item": lambda f, a: ["data", "make", "teacher", "--rows", "5", "--layers", "3,,2", "-o", "x.csv"],
    # distbp/run/plot.py
    "plot-out-is-a-folder": lambda f, a: ((f / "run").mkdir(), (f / "run" / "metrics.csv").write_text(GOOD_METRICS), (f / "pdir").mkdir(),
                                           ["plot", "run", "-o", "pdir"])[-1],  # IsADirectoryError, and pdir.tmp-<pid> made and removed
    "plot-ragged-row": lambda f, a: ((f / "run").mkdir(), (f / "run" / "metrics.csv").write_text("step,loss\n1,2,3\n"), ["plot", "run"])[-1],  # TypeError
    "plot-huge-field": lambda f, a: ((f / "run").mkdir(), (f / "run" / "metrics.csv").write_text("step,loss\n1," + "9" * 200000 + "\n"), ["plot", "run"])[-1],  # csv.Error
}


@pytest.mark.parametrize("bug", sorted(ONCE_INTERNAL_ERRORS))
def test_found_bugs_in_models_plots_and_data_make(tmp_path, assets, bug):
    folder = new_folder(tmp_path)
    put(assets, folder, "data.parquet")
    refused(folder, ONCE_INTERNAL_ERRORS[bug](folder, assets))


@pytest.mark.parametrize("value", [float("nan"), None, float("inf")])
def test_eval_and_predict_refuse_rows_they_cannot_score(tmp_path, assets, value):
    folder = new_folder(tmp_path)
    put(assets, folder, "model.npz")
    table = assets["table"]
    x1 = table.column("x1").to_pylist()
    x1[5] = x1[9] = value
    tables.write_table(table.set_column(table.column_names.index("x1"), "x1", pa.array(x1, pa.float64())), str(folder / "holes.parquet"))
    (folder / "pred.csv").write_text("kept\n")  # an earlier output is never damaged
    for command in (["eval", "model.npz", "holes.parquet"], ["eval", "model.npz", "holes.parquet", "--json"], ["predict", "model.npz", "holes.parquet", "-o", "pred.csv"]):
        line = refused(folder, command)
        assert line == "error: holes.parquet: column 'x1' has 2 missing, NaN or infinite values (first in row 5); such rows cannot be scored (drop or fill them first)", line
    assert (folder / "pred.csv").read_text() == "kept\n"


@pytest.mark.parametrize("name", ["W1", "b2", "x_std"])
def test_a_model_with_nan_weights_is_refused_by_eval_predict_and_export(tmp_path, assets, name):
    folder = new_folder(tmp_path)
    put(assets, folder, "data.parquet")
    arrays = dict(assets["arrays"])
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan
    np.savez(folder / "model.npz", **arrays)
    for command in (["eval", "model.npz", "data.parquet"], ["predict", "model.npz", "data.parquet", "-o", "p.csv"], ["export", "model.npz", "-o", "m.onnx"]):
        line = refused(folder, command)
        assert line.startswith(f"error: model.npz: {name}: holds NaN or infinite values; a model must hold finite numbers"), line


def test_a_fifo_as_data_is_refused_at_once_instead_of_hanging(tmp_path, assets):
    folder = new_folder(tmp_path)
    put(assets, folder, "model.npz")
    os.mkfifo(folder / "rows.csv")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    for args in (["eval", "model.npz", "rows.csv"], ["predict", "model.npz", "rows.csv", "-o", "p.csv"]):
        proc = subprocess.run([sys.executable, "-m", "distbp", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr == "error: rows.csv is not a regular file or a folder (copy the rows into a file first)\n", proc.stderr
    (folder / "job.yaml").write_text(yaml.safe_dump({**base_job(), "data": {"path": "rows.csv", "label": "label"}}))
    proc = subprocess.run([sys.executable, "-m", "distbp", "run", "job.yaml"], cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == f"error: data.path: {folder / 'rows.csv'} is not a regular file or a folder (copy the rows into a file first)\n", proc.stderr
    assert not (folder / "runs").exists()


def test_a_model_whose_header_declares_more_than_the_file_holds_is_refused_before_reading(tmp_path, assets):
    import io
    import zipfile

    folder = new_folder(tmp_path)
    put(assets, folder, "data.parquet")
    with zipfile.ZipFile(folder / "model.npz", "w") as zf:
        for name, array in assets["arrays"].items():
            buf = io.BytesIO()
            header = np.lib.format.header_data_from_array_1_0(array)
            if name == "W1":  # 745 GiB declared, 64 bytes of data behind it
                header["shape"] = (10**10, 10)
            np.lib.format.write_array_header_1_0(buf, header)
            buf.write(array.tobytes())
            zf.writestr(f"{name}.npy", buf.getvalue())
    for command in (["eval", "model.npz", "data.parquet"], ["export", "model.npz", "-o", "m.onnx"]):
        line = refused(folder, command)
        assert line == "error: model.npz: W1: its header declares float64 (10000000000, 10) (800,000,000,000 bytes), the file holds 192", line
    os.mkfifo(folder / "pipe.npz")
    assert refused(folder, ["eval", "pipe.npz", "data.parquet"]) == "error: pipe.npz: not a regular file (a pipe, socket or device)"
