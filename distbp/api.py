"""The Python entry points the CLI and notebooks share: load a job, dry-run it, train it,
evaluate and predict with a saved model. Each is a few lines over the library."""

import os
import re

import numpy as np

from distbp.backprop import nn
from distbp.data import tables
from distbp.data.job import Job, job_from_dict, load_job
from distbp.errors import DataError, DistbpError, UsageError
from distbp.run.model import Model, load_model


def load(job_or_path, overrides=()):
    """A checked Job from a path, a dict or a Job, with `key.path=value` overrides applied."""
    if isinstance(job_or_path, Job):
        return job_or_path if not overrides else load(_dict_of(job_or_path), overrides)
    if isinstance(job_or_path, dict):
        return job_from_dict(job_or_path, source="<dict>", base_dir=os.getcwd(), overrides=list(overrides))
    return load_job(job_or_path, list(overrides))


def _dict_of(job):
    from distbp.data.job import job_to_dict

    return job_to_dict(job, resolve_paths=True)


def spec_of(job):
    from distbp.data.checks import spec_of

    return spec_of(job)


def dry_run(job):
    """Validate the job, the data's schema (columns, types, input width) and its values (NaN
    or inf, the classes against the output width, the rows left), reading every row once,
    without Ray. Returns (the checks' Prepared, the rows data.on_nan: drop skips), or None
    when the data is still to be made by data.make."""
    from distbp.data.checks import prepare, scan

    path = job.data_path()
    if job.data.make and path and "://" not in path and not os.path.exists(path):
        return None
    prep = prepare(job)
    dropped, _ = scan(job, prep)
    return prep, dropped


def train(job_or_path, log=None, on_step=None, resume=False, force=False, ray_dataset=None, **overrides):
    """Train a job (a path, dict or Job). Keyword overrides use `__` for dots, e.g.
    `train(job, train__steps=100, cluster__workers=1)`. `ray_dataset`, a ray.data.Dataset,
    replaces data.path (Ray must be running: the Dataset lives in it). Returns the RunResult.

    The first call starts an embedded Ray (or joins cluster.address) and keeps it for the later
    calls of the process: it shuts down at exit or at `distbp.shutdown()`. A Ray you started
    with ray.init() is used and left running."""
    from distbp.trainer import Trainer

    sets = [f"{k.replace('__', '.')}={_yaml_scalar(v)}" for k, v in overrides.items()]
    try:
        job, source, keep = load(job_or_path, sets), None, None
        if ray_dataset is not None:
            from distbp.data.raydata import block_source

            source, keep = block_source(ray_dataset)
        result = Trainer(job, resume=resume, force=force, log=log, on_step=on_step, source=source, keep_ray=True).run()
        del keep  # the Dataset's blocks are no longer needed
        return result
    except DistbpError as err:  # the way out, in this API's words rather than the command's
        err.message, err.hint = _in_api_words(err.message), _in_api_words(err.hint)
        raise


_API_WORDS = [
    (re.compile(r"distbp run JOB --resume --workers (\d+)"), r"distbp.train(job, resume=True, cluster__workers=\1)"),
    (re.compile(r"--resume and --force"), "resume=True and force=True"),
    (re.compile(r"--resume"), "resume=True"),
    (re.compile(r"--force"), "force=True"),
    (re.compile(r"--out\b"), "output__dir="),
    (re.compile(r"--set ([\w.]+)="), lambda m: m.group(1).replace(".", "__") + "="),
]


def init(num_cpus=None, address=None):
    """Start now the Ray that distbp.train and the estimators keep (otherwise the first call
    does): an embedded, loopback-only Ray with `num_cpus` CPUs (default: every CPU of the
    machine), or join `address`. A Ray already running in this process is used as it is.
    Like the first call's Ray, it is distbp's: idle actors wait in it between calls, and it
    shuts down at exit or at `distbp.shutdown()`."""
    from distbp.runtime import cluster

    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise UsageError(f"distbp.init: num_cpus: expected a whole number of at least 1, got {num_cpus!r}")
    cluster.keep(address, num_cpus or 1, cpus=num_cpus)


def shutdown():
    """Shut down the Ray that distbp.train or the estimators started or joined; a Ray you
    started is left alone. Runs at exit by itself."""
    from distbp.runtime import cluster

    cluster.shutdown()


def _in_api_words(text):
    for pattern, words in _API_WORDS if text else ():
        text = pattern.sub(words, text)
    return text


def _yaml_scalar(value):
    import json

    return json.dumps(value) if not isinstance(value, str) else value


def _read_for(model: Model, data_path):
    source = tables.open_source(data_path, key=None)  # DATA is an argument, not a job key
    table = source.read_rows(0, source.num_rows)
    missing = [c for c in model.features if c not in table.column_names]
    if missing:
        raise DataError(f"{data_path}: missing feature column '{missing[0]}' that the model was trained on")
    x = tables.features_to_numpy(table, model.features, model.spec.np_dtype)  # as the workers read them
    _refuse_non_finite(data_path, x, model.features)
    return table, x


def _refuse_non_finite(data_path, values, columns):
    """A missing, NaN or infinite value has no score: DataError naming the column, how many
    and the first row (0-based), instead of a NaN loss or prediction."""
    bad = ~np.isfinite(values)
    if bad.any():
        column = int(np.argmax(bad.any(axis=0)))
        rows = np.flatnonzero(bad[:, column])
        raise DataError(
            f"{data_path}: column '{columns[column]}' has {len(rows)} missing, NaN or infinite value{'s' if len(rows) > 1 else ''} "
            f"(first in row {rows[0]}); such rows cannot be scored",
            hint="drop or fill them first",
        )


def evaluate(model_path, data_path):
    """A saved model measured on a data file (one process), as the training measured it:
    {'rows', 'loss', 'accuracy'} for classification; for regression {'rows', 'loss', 'mse',
    'rmse', 'r2'}, where loss is half the mean squared error (the mse loss), mse and rmse are
    over every target value, and r2 = 1 - SSE / SST summed over the targets."""
    from distbp.runtime.messages import figures, stats_vector

    model = load_model(model_path)
    table, x = _read_for(model, data_path)
    missing = [c for c in model.labels if c not in table.column_names]
    if missing:
        raise DataError(f"{data_path}: missing label column '{missing[0]}'")
    if model.task == "classification":
        label = model.labels[0]
        y = tables.encode_labels(tables.label_values(table, label), model.classes, column=label)
    else:
        y = tables.targets_to_numpy(table, model.labels, model.spec.np_dtype)  # as the workers encode them
        _refuse_non_finite(data_path, y.reshape(len(y), -1), model.labels)
    if not len(x):
        raise DataError(f"{data_path}: no rows to evaluate")
    loss_sum, correct = nn.evaluate(model.spec, model.params, model.standardized(x), y)
    stats = stats_vector(loss_sum, len(x), correct, 0.0, [])
    sst = None
    if model.task == "regression":
        y64 = y.astype(np.float64)
        sst = float(np.sum((y64 - y64.mean(axis=0)) ** 2))
    result = {"rows": len(x), **figures(stats, model.task, model.spec.layers[-1], sst)}
    if model.task == "regression":
        result["mse"] = float(2 * loss_sum / (len(x) * model.spec.layers[-1]))
        result = {k: result[k] for k in ("rows", "loss", "mse", "rmse", "r2") if k in result}
    return result


def predict_file(model_path, data_path, out_path):
    """Write `prediction` (and `proba_<class>`) columns for every row of a data file."""
    import pyarrow as pa

    model = load_model(model_path)
    _, x = _read_for(model, data_path)
    proba = model.predict_proba(x)
    if model.task == "classification":
        columns = {"prediction": pa.array(model.predict(x).tolist())}
        columns.update({f"proba_{c}": proba[:, i] for i, c in enumerate(model.classes)})
    elif len(model.labels) == 1:
        columns = {"prediction": proba[:, 0]}
    else:
        columns = {f"prediction_{name}": proba[:, i] for i, name in enumerate(model.labels)}
    tables.write_table(pa.table(columns), out_path)
    return len(x)
