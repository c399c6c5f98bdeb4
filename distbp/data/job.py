"""The job-file schema: loading, defaults, validation and the resolved, hashable form of a job.

A job file is YAML (every key: the README's "The job file"). `load_job` reads it, applies `--set key.path=value`
overrides, fills in every default and checks every value, raising a one-line `JobError` that
names the dotted key (`job.yaml: train.optimizer.lr: expected a number > 0, got -1`).
The result is a frozen tree of dataclasses; each field states its default and its check once.
Besides stdlib and yaml it reads only the name registries of the modules that implement each
name (activations, losses, initialisers, optimizers, schedules, data sets): no ray, pyarrow or click.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from distbp.backprop import activations as _activations
from distbp.backprop import losses as _losses
from distbp.backprop import nn as _nn
from distbp.backprop import optim as _optim
from distbp.backprop import schedule as _schedule
from distbp.data import datasets as _datasets
from distbp.errors import JobError

# Every name a key accepts comes from the one registry of the module that implements it.
ACTIVATIONS = tuple(_activations.ACTIVATIONS)
LOSS_FOR_OUTPUT = {loss.output: name for name, loss in _losses.LOSSES.items()}
MAKE_KINDS = tuple(_datasets.KINDS)
DEFAULT_STEPS = 500
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://: left as written
_REQUIRED = object()


# ---------------------------------------------------------------- errors and value checks

def job_error(job_or_source: Job | str, key: str, message: str, hint: str | None = None) -> JobError:
    """The one-line error `<source>: <dotted.key>: <message>`, for any module that checks a job."""
    source = job_or_source.source if isinstance(job_or_source, Job) else str(job_or_source)
    return JobError(f"{source}: {key}: {message}" if key else f"{source}: {message}", hint)


def _show(value: Any) -> str:
    """A short one-line rendering of a bad value, for messages."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    try:
        text = repr(value) if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _as_number(value: Any) -> int | float | None:
    """int, float or numeric string (plain YAML reads `1e-3` as a string) -> a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None  # True is an int in Python, but never a number in a job file
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _number(src: str, key: str, value: Any, *, integer=False, gt=None, ge=None, lt=None, le=None):
    """A checked int (integral values only: 2.0 passes, 2.5 fails) or float."""
    x = _as_number(value)
    ok = (x is not None and not (integer and x != int(x)) and (gt is None or x > gt)
          and (ge is None or x >= ge) and (lt is None or x < lt) and (le is None or x <= le))
    try:
        if ok:
            return int(x) if integer else float(x)
    except OverflowError:
        pass
    low = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else ""
    high = f"{lt})" if lt is not None else f"{le}]" if le is not None else ""
    wanted = "an integer" if integer else "a number"
    if low and high:
        wanted += f" in {low}, {high}"
    elif low:  # the schema has no upper-only bounds
        wanted += f" {'>' if gt is not None else '>='} {low[1:]}"
    raise job_error(src, key, f"expected {wanted}, got {_show(value)}")


def _choice(src: str, key: str, value: Any, options: Sequence[str]) -> str:
    if isinstance(value, str) and value in options:
        return value
    close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
    hint = f"did you mean '{close[0]}'?" if close else None
    raise job_error(src, key, f"expected one of {' | '.join(options)}, got {_show(value)}", hint)


def _mapping(src: str, key: str, value: Any, known: Sequence[str] | None) -> dict:
    """A mapping (null reads as empty) whose keys are all in `known` (None: any string keys)."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise job_error(src, key, f"expected a mapping, got {_show(value)}")
    for k in value:
        if known is None and not (isinstance(k, str) and k):
            raise job_error(src, f"{key}.{k}", "expected a name (a string) as the key")
        if known is not None and k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise job_error(src, f"{key}.{k}" if key else str(k), "unknown key", hint)
    return value


def _names(src: str, key: str, value: Any) -> list[str]:
    """A non-empty list of distinct column names."""
    if not isinstance(value, list) or not value:
        raise job_error(src, key, f"expected a list of column names, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise job_error(src, f"{key}[{i}]", f"expected a column name (a string), got {_show(item)}")
        if item in value[:i]:
            raise job_error(src, f"{key}[{i}]", f"column {item!r} is listed twice")
    return list(value)


def _text(src: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise job_error(src, key, f"expected a non-empty string, got {_show(value)}")
    return value


# ---------------------------------------------------------------- field specs: default + check

Check = Callable[[str, str, Any], Any]  # (source, dotted key, raw value) -> checked value


def _spec(default: Any, check: Check) -> Any:
    """A dataclass field whose default (what a missing key reads as) and check live together."""
    meta = {"check": check, "default": default}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _num(default, integer=False, **bounds):
    """A number field; a None default means null is allowed."""
    def check(src, key, v):
        return None if v is None and default is None else _number(src, key, v, integer=integer, **bounds)
    return _spec(default, check)


def _int(default, **bounds):
    return _num(default, integer=True, **bounds)


def _one_of(*options):
    """A name from `options`; the first is the default."""
    return _spec(options[0], lambda src, key, v: _choice(src, key, v, options))


def _flag(default):
    def check(src, key, v):
        if not isinstance(v, bool):
            raise job_error(src, key, f"expected true or false, got {_show(v)}")
        return v
    return _spec(default, check)


def _opt_text():
    return _spec(None, lambda src, key, v: None if v is None else _text(src, key, v))


def _section_field(cls, optional=False):
    """A nested mapping built into `cls`; an optional one stays None unless given."""
    def check(src, key, v):
        return None if v is None and optional else _build_section(cls, src, key, v)
    if optional:
        return _spec(None, check)
    return field(default_factory=cls, metadata={"check": check, "default": None})


MAX_PARAMS = 2**31 - 1  # 8 GiB per copy in float32; every worker and parameter actor holds several


def _check_layers(src, key, v):
    if not isinstance(v, list) or len(v) < 2:
        raise job_error(src, key, f"expected a list of at least 2 widths (inputs .. outputs), got {_show(v)}")
    widths = [_number(src, f"{key}[{i}]", w, integer=True, ge=1) for i, w in enumerate(v)]
    params = sum(a * b + b for a, b in zip(widths, widths[1:]))
    if params > MAX_PARAMS:
        raise job_error(src, key, f"these widths give {params:.3g} parameters, distbp trains at most {MAX_PARAMS:,} (2**31 - 1)")
    return widths


def _check_activation(src, key, v):
    if isinstance(v, list):  # its length is checked against the layers in _check_together
        return [_choice(src, f"{key}[{i}]", a, ACTIVATIONS) for i, a in enumerate(v)]
    return _choice(src, key, v, ACTIVATIONS)


def _check_make(src, key, v):
    """data.make: {kind, rows, ...}; keys other than kind and rows pass through to the generator."""
    if v is None:
        return None
    make = dict(_mapping(src, key, v, None))
    make["kind"] = _choice(src, f"{key}.kind", make.get("kind"), MAKE_KINDS)
    if make.get("rows") is not None:
        make["rows"] = _number(src, f"{key}.rows", make["rows"], integer=True, ge=1)
    for k, item in make.items():
        try:
            json.dumps(item, allow_nan=False, sort_keys=True)  # as job_hash will
        except (TypeError, ValueError, RecursionError):
            raise job_error(src, f"{key}.{k}", f"expected a plain value, got {_show(item)}") from None
    return copy.deepcopy(make)


def _check_servers(src, key, v):
    """cluster.parameter_servers: auto, per_worker, or a count of slices (>= 1)."""
    if v in ("auto", "per_worker"):
        return v
    x = _as_number(v)
    if x is not None and x == int(x) and x >= 1:
        return int(x)
    close = difflib.get_close_matches(v, ("auto", "per_worker"), n=1) if isinstance(v, str) else []
    raise job_error(src, key, f"expected auto, per_worker or an integer >= 1, got {_show(v)}", f"did you mean '{close[0]}'?" if close else None)


def _check_kernel(src, key, v):
    """cluster.blas_kernel: auto, or an OpenBLAS kernel name (what OPENBLAS_CORETYPE takes)."""
    if not (isinstance(v, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", v)):
        raise job_error(src, key, f"expected auto or an OpenBLAS kernel name such as Haswell, got {_show(v)}")
    return v


def _check_label(src, key, v):
    return _names(src, key, v) if isinstance(v, list) else _text(src, key, v)


def _check_validation(src, key, v):
    if v is None or (isinstance(v, str) and _as_number(v) is None and v):
        return v  # none, or a path
    if _as_number(v) is None and not isinstance(v, bool):
        raise job_error(src, key, f"expected null, a fraction 0 < f < 1 or a path, got {_show(v)}")
    return _number(src, key, v, gt=0, lt=1)


def _check_batch(src, key, v):
    x = _as_number(v)
    if v != "full" and (x is None or x != int(x) or x < 1):
        raise job_error(src, key, f"expected full or an integer >= 1, got {_show(v)}")
    return v if v == "full" else int(x)


def _check_resources(src, key, v):
    return {k: _number(src, f"{key}.{k}", n, ge=0) for k, n in _mapping(src, key, v, None).items()}


# ---------------------------------------------------------------- the typed tree

@dataclass(frozen=True)
class DataCfg:
    path: str | None = _opt_text()
    make: dict | None = _spec(None, _check_make)
    format: str = _one_of("auto", "parquet", "csv", "feather")
    features: list[str] | None = _spec(None, lambda src, key, v: None if v is None else _names(src, key, v))
    label: str | list[str] = _spec("label", _check_label)  # one column, or a list (regression)
    task: str = _one_of("classification", "regression")
    standardize: bool = _flag(True)
    validation: float | str | None = _spec(None, _check_validation)  # None, a held-out fraction, or a path
    on_nan: str = _one_of("error", "drop")

    @property
    def labels(self) -> list[str]:
        return [self.label] if isinstance(self.label, str) else list(self.label)


@dataclass(frozen=True)
class ModelCfg:
    layers: list[int] = _spec(_REQUIRED, _check_layers)
    activation: str | list[str] = _spec("tanh", _check_activation)
    output: str = _one_of(*LOSS_FOR_OUTPUT)
    loss: str = _one_of(*LOSS_FOR_OUTPUT.values())  # load_job: a missing loss pairs with output
    init: str = _one_of(*_nn.INITS)
    dtype: str = _one_of("float32", "float64")

    @property
    def activations(self) -> list[str]:
        """One activation name per hidden layer: len(layers) - 2 entries."""
        hidden = len(self.layers) - 2
        return [self.activation] * hidden if isinstance(self.activation, str) else list(self.activation)


@dataclass(frozen=True)
class OptimizerCfg:
    name: str = _one_of("adam", *(n for n in _optim.OPTIMIZERS if n != "adam"))  # adam first: the default
    lr: float = _num(0.01, gt=0)
    momentum: float = _num(0.9, ge=0, lt=1)
    beta1: float = _num(0.9, ge=0, lt=1)
    beta2: float = _num(0.999, ge=0, lt=1)
    eps: float = _num(1e-8, gt=0)
    weight_decay: float = _num(0.0, ge=0)


@dataclass(frozen=True)
class ScheduleCfg:
    name: str = _one_of(*_schedule.SCHEDULES)
    warmup_steps: int = _int(0, ge=0)
    gamma: float = _num(0.1, gt=0, le=1)  # step: lr *= gamma every `every` steps
    every: int | None = _int(None, ge=1)
    min_lr: float = _num(0.0, ge=0)  # cosine: the floor reached at the last step


@dataclass(frozen=True)
class EarlyStopCfg:
    metric: str = _one_of("val_loss", "val_accuracy")
    patience: int = _int(10, ge=1)
    min_delta: float = _num(0.0, ge=0)


@dataclass(frozen=True)
class TrainCfg:
    steps: int | None = _int(None, ge=1)  # after loading, exactly one of steps / epochs is set
    epochs: int | None = _int(None, ge=1)
    batch: str | int = _spec("full", _check_batch)
    optimizer: OptimizerCfg = _section_field(OptimizerCfg)
    schedule: ScheduleCfg | None = _section_field(ScheduleCfg, optional=True)
    early_stopping: EarlyStopCfg | None = _section_field(EarlyStopCfg, optional=True)
    eval_every: int = _int(10, ge=1)
    checkpoint_every: int = _int(50, ge=1)
    keep_checkpoints: int = _int(3, ge=1)


@dataclass(frozen=True)
class ClusterCfg:
    workers: int = _int(2, ge=1)
    cpus_per_worker: float = _num(1.0, gt=0)
    address: str | None = _opt_text()
    connect_timeout_s: float = _num(30.0, gt=0)
    parameter_servers: int | str = _spec("auto", _check_servers)  # auto | per_worker | a count
    parameter_resources: dict[str, float] = _spec({}, _check_resources)
    chunk_rows: int = _int(8192, ge=1)
    max_failures: int = _int(3, ge=0)
    wait_for_nodes_s: float = _num(60.0, ge=0)
    elastic: bool = _flag(False)  # go on with fewer workers when a lost one cannot be replaced
    min_workers: int = _int(1, ge=1)  # elastic: below this many workers the run stops
    blas_kernel: str = _spec("auto", _check_kernel)  # auto, or the OpenBLAS kernel every worker runs
    engine: str = _one_of("direct", "tasks")  # how steps are carried out: links between the actors, or Ray tasks
    tcp_congestion: str = _one_of("auto", "system")  # the direct engine's links: auto (Reno) or the kernel's default


@dataclass(frozen=True)
class OutputCfg:
    dir: str | None = _opt_text()
    plot: bool = _flag(True)
    tensorboard: bool = _flag(False)


_SECTIONS = dict(data=DataCfg, model=ModelCfg, train=TrainCfg, cluster=ClusterCfg, output=OutputCfg)


@dataclass(frozen=True)
class Job:
    name: str
    seed: int
    data: DataCfg
    model: ModelCfg
    train: TrainCfg
    cluster: ClusterCfg
    output: OutputCfg
    source: str = field(default="<job>", compare=False)  # the job file as the user named it
    base_dir: str = "."  # the job file's folder: relative data paths resolve against it

    def data_path(self) -> str | None:
        """data.path, absolute (relative to the job file's folder), or a URI as written."""
        return _resolve(self.data.path, self.base_dir)

    def validation_path(self) -> str | None:
        """data.validation resolved like data.path when it is a path; None when a fraction or unset."""
        validation = self.data.validation
        return _resolve(validation, self.base_dir) if isinstance(validation, str) else None

    def output_dir(self) -> str:
        """output.dir or runs/<name>, absolute against the current working directory (URIs as written)."""
        return _resolve(self.output.dir or os.path.join("runs", self.name), os.getcwd())


def _resolve(path: str | None, base_dir: str) -> str | None:
    if path is None or _URI.match(path):
        return path
    return os.path.normpath(os.path.join(os.path.abspath(base_dir), os.path.expanduser(path)))


# ---------------------------------------------------------------- building and cross-checks

def _build_section(cls, src: str, key: str, value: Any):
    """Check a raw mapping against `cls`'s fields and fill in the defaults."""
    fields = dataclasses.fields(cls)
    raw = _mapping(src, key, value, [f.name for f in fields])
    kwargs = {}
    for f in fields:
        v = raw.get(f.name, f.metadata["default"])
        if v is _REQUIRED:
            raise job_error(src, f"{key}.{f.name}", "required")
        kwargs[f.name] = f.metadata["check"](src, f"{key}.{f.name}", v)
    return cls(**kwargs)


def _check_together(src: str, data: DataCfg, model: ModelCfg, train: TrainCfg, cluster: ClusterCfg, **_) -> None:
    """Rules that tie keys together, within a section or across sections."""
    if data.path is None and data.make is None:
        raise job_error(src, "data.path", "required", "give data.path, or data.make for a synthetic set")
    hidden = len(model.layers) - 2
    if isinstance(model.activation, list) and len(model.activation) != hidden:
        raise job_error(src, "model.activation", f"expected one activation per hidden layer ({hidden}), "
                                                 f"got {len(model.activation)}")
    if model.loss != LOSS_FOR_OUTPUT[model.output]:
        pair = LOSS_FOR_OUTPUT[model.output]
        raise job_error(src, "model.loss", f"output {model.output} pairs with loss {pair}, got {model.loss}",
                        "softmax-cross_entropy, sigmoid-binary_cross_entropy, identity-mse")
    if train.steps is not None and train.epochs is not None:
        raise job_error(src, "train.epochs", "cannot be set together with train.steps", "set one of them")
    if train.schedule is not None and train.schedule.name == "step" and train.schedule.every is None:
        raise job_error(src, "train.schedule.every", "required for the step schedule", "e.g. every: 100")
    last = f"model.layers[{hidden + 1}]"
    if data.task == "classification" and model.output == "identity":
        raise job_error(src, "model.output", "task classification needs softmax or sigmoid, got identity")
    if data.task == "regression" and model.output != "identity":
        raise job_error(src, "model.output", f"task regression needs identity, got {model.output}")
    if data.task == "classification" and len(data.labels) != 1:
        raise job_error(src, "data.label", f"classification takes one label column, got {len(data.labels)}")
    if model.output == "sigmoid" and model.layers[-1] != 1:
        raise job_error(src, last, f"expected 1 (a sigmoid output has one unit), got {model.layers[-1]}")
    if model.output == "softmax" and model.layers[-1] < 2:
        raise job_error(src, last, "expected at least 2 (one unit per class), got 1",
                        "for two classes use output: sigmoid with 1 unit, or 2 softmax units")
    if model.output == "identity" and model.layers[-1] != len(data.labels):
        raise job_error(src, last, f"expected {len(data.labels)} (the number of label columns), "
                                   f"got {model.layers[-1]}")
    if data.features is not None:
        for i, name in enumerate(data.features):
            if name in data.labels:
                raise job_error(src, f"data.features[{i}]", f"{name!r} is a label column")
        if model.layers[0] != len(data.features):
            raise job_error(src, "model.layers[0]", f"expected {len(data.features)} (the number of feature "
                                                    f"columns), got {model.layers[0]}")
    stop = train.early_stopping
    if stop is not None and data.validation is None:
        raise job_error(src, "train.early_stopping", "needs validation data", "set data.validation")
    if stop is not None and stop.metric == "val_accuracy" and data.task == "regression":
        raise job_error(src, "train.early_stopping.metric", "val_accuracy needs task classification")
    if cluster.min_workers > cluster.workers:
        raise job_error(src, "cluster.min_workers", f"expected at most cluster.workers ({cluster.workers}), "
                                                    f"got {cluster.min_workers}")


# ---------------------------------------------------------------- public API

def _build(raw: Any, source: str, base_dir: str, default_name: str) -> Job:
    top = _mapping(source, "", raw, ["name", "seed", *_SECTIONS])
    name = _text(source, "name", top.get("name", default_name))
    if name in (".", "..") or "/" in name or "\\" in name:
        raise job_error(source, "name", f"expected a plain name (the folder runs/<name>), got {_show(name)}")
    seed = _number(source, "seed", top.get("seed", 0), integer=True, ge=0)
    sections = {key: _build_section(cls, source, key, top.get(key)) for key, cls in _SECTIONS.items()}
    model, train = sections["model"], sections["train"]
    if "loss" not in (top.get("model") or {}):  # a missing loss pairs with the output
        sections["model"] = dataclasses.replace(model, loss=LOSS_FOR_OUTPUT[model.output])
    if train.steps is None and train.epochs is None:
        sections["train"] = dataclasses.replace(train, steps=DEFAULT_STEPS)
    _check_together(source, **sections)
    return Job(name, seed, **sections, source=source, base_dir=base_dir)


class _JobLoader(yaml.SafeLoader):
    """Job files are plain YAML: an alias (`*name`) is refused, since a few hundred bytes of
    nested aliases expand to gigabytes. distbp writes its own job.yaml without any."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a job file; write the value out", mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """A job file's (or a --set value's) YAML, without aliases."""
    return yaml.load(text, Loader=_JobLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_override(d: dict, assignment: str) -> None:
    """Apply `key.path=value` to the raw job dict in place; the value is parsed as YAML."""
    key, eq, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise JobError(f"--set {assignment}: expected key.path=value", "e.g. --set train.optimizer.lr=0.001")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError as err:
        raise JobError(f"--set {assignment}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
    except (ValueError, RecursionError) as err:  # e.g. an impossible date like 2024-13-40, or [[[[...
        raise JobError(f"--set {assignment}: the value is not valid YAML ({err})") from None
    node = d
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise JobError(f"--set {assignment}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = node[part]
    node[parts[-1]] = value


def job_from_dict(d: dict, source: str = "<job>", base_dir: str = ".", overrides: Sequence[str] = ()) -> Job:
    """Build and check a Job from raw YAML data; `d` itself is left unchanged."""
    if not isinstance(d, dict):
        raise job_error(source, "", f"expected a mapping of keys at the top level, got {_show(d)}")
    d = copy.deepcopy(d)
    for assignment in overrides:
        apply_override(d, assignment)
    default_name = "job" if source.startswith("<") else Path(source).stem
    return _build(d, source, base_dir, default_name)


def load_job(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Job:
    """Read, override, fill in and check the job file at `path`; raises JobError."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise JobError(f"{source}: no such job file") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise JobError(f"{source}: cannot read the job file ({reason})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or getattr(err, "context", None) or "cannot parse"
        raise JobError(f"{source}: {where}invalid YAML: {problem}") from None
    except (ValueError, RecursionError) as err:  # e.g. an impossible date like 2024-13-40
        raise JobError(f"{source}: invalid YAML: {err}") from None
    if raw is None:
        raise JobError(f"{source}: the job file is empty")
    base_dir = os.path.dirname(os.path.abspath(source))
    return job_from_dict(raw, source=source, base_dir=base_dir, overrides=overrides)


def job_to_dict(job: Job, resolve_paths: bool = False) -> dict:
    """The resolved job as plain YAML-able data, every default filled in (no source or base_dir).

    `job_from_dict(job_to_dict(job), base_dir=job.base_dir)` equals `job`. With resolve_paths
    (for the run folder's job.yaml), data.path, a validation path and output.dir are written
    absolute, so the file is self-contained wherever it is read from.
    """
    d = {"name": job.name, "seed": job.seed}
    d.update({key: dataclasses.asdict(getattr(job, key)) for key in _SECTIONS})
    if resolve_paths:
        d["data"]["path"] = job.data_path()
        if isinstance(job.data.validation, str):
            d["data"]["validation"] = job.validation_path()
        d["output"]["dir"] = job.output_dir()
    return d


def job_hash(job: Job) -> str:
    """sha256 of everything that changes results: the job minus name, cluster and output; paths resolved."""
    d = job_to_dict(job, resolve_paths=True)
    for key in ("name", "cluster", "output"):
        del d[key]
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
