"""The checks of a job against its data: making data.path from data.make, the schema
(columns, types, input and output widths) before Ray starts, and the workers' shard summaries
(NaN counts, classes, standardisation, row counts) once they have read their rows."""

import os
from dataclasses import dataclass

import numpy as np

from distbp.backprop import nn
from distbp.data import datasets, rowmath, tables
from distbp.data.job import job_error
from distbp.errors import UsageError
from distbp.text import count


@dataclass
class Prepared:
    """What validating the job against the data's schema produces, before any Ray work."""

    spec: nn.Spec
    source: object
    features: list
    labels: list
    validation_source: object = None


def ensure_data(job, log):
    """Generate data.path from data.make when the file is missing (and say so). The table
    made is checked against the job as `prepare` checks a file, before it is written, so a
    job that fails those checks leaves no data file behind."""
    path = job.data_path()
    if job.data.make and path and "://" not in path and not os.path.exists(path):
        options = {k: v for k, v in job.data.make.items() if k not in ("kind", "rows")}
        table = datasets.make_dataset(job.data.make["kind"], job.data.make.get("rows"), seed=job.seed, **options)
        _check_source(job, tables.TableSource(path, job.data.format, (path,), (table.num_rows,), table.schema))
        tables.write_table(table, path)
        log(f"made {job.data.make['kind']} data: {count(table.num_rows, 'row')} -> {path}")


def prepare(job, source=None):
    """Check the job against the data's schema: columns, types and the input width. `source`
    replaces data.path (a ray.data.Dataset's BlockSource)."""
    if source is not None:
        return _check_source(job, source)
    if not job.data_path():
        raise job_error(job, "data.path", "no data file given")
    return _check_source(job, tables.open_source(job.data_path(), job.data.format))


def _check_source(job, source):
    """The checks of `prepare` on a described table (on storage, or made and not yet written)."""
    features, labels = tables.select_columns(source, job.data.features, job.data.labels, job.data.task)
    if job.cluster.workers > source.num_rows:
        raise job_error(job, "cluster.workers", f"more workers ({job.cluster.workers}) than rows ({source.num_rows}) in {job.data_path()}")
    if job.model.layers[0] != len(features):
        raise job_error(job, "model.layers[0]", f"expected {len(features)} (the number of feature columns), got {job.model.layers[0]}")
    if job.data.task == "regression" and job.model.layers[-1] != len(labels):
        raise job_error(job, "model.layers[-1]", f"expected {len(labels)} (the number of label columns), got {job.model.layers[-1]}")
    val_source = None
    if job.validation_path():
        val_source = tables.open_source(job.validation_path(), job.data.format, key="data.validation")
        tables.select_columns(val_source, features, labels, job.data.task)
    return Prepared(spec_of(job), source, features, labels, val_source)


def spec_of(job):
    """The network spec of a job's model section."""
    m = job.model
    return nn.Spec(tuple(m.layers), tuple(m.activations), m.output, m.loss, m.init, m.dtype)


def merge_summaries(job, prep, summaries):
    """Turn the workers' ShardSummary tuples into classes and standardisation statistics."""
    columns = prep.features + (prep.labels if job.data.task == "regression" else [])
    for origin, path in (("data", prep.source.path), ("validation", job.validation_path())):
        counts = sum(s.nonfinite.get(origin, 0) for s in summaries)
        if job.data.on_nan == "error" and np.any(counts):
            bad = [f"'{c}' ({n})" for c, n in zip(columns, counts) if n]
            raise UsageError(
                f"{path}: NaN or inf values in column {', '.join(bad)}",
                hint="clean the data or set data.on_nan: drop to skip those rows",
            )
    n_train = sum(s.rows["train"] for s in summaries)
    if n_train < job.cluster.workers:
        raise job_error(job, "cluster.workers", f"more workers ({job.cluster.workers}) than training rows ({n_train})")
    classes = sorted(set().union(*(s.labels for s in summaries)), key=lambda c: (str(type(c)), c))
    if job.data.task == "classification":
        width = 1 if job.model.output == "sigmoid" else len(classes)
        if job.model.output == "sigmoid" and len(classes) != 2:
            raise job_error(job, "model.output", f"sigmoid needs exactly 2 classes in '{prep.labels[0]}', found {len(classes)}", hint="use softmax")
        if job.model.layers[-1] != width:
            raise job_error(job, "model.layers[-1]", f"expected {width} (the number of classes in '{prep.labels[0]}'), got {job.model.layers[-1]}")
    mean = std = None
    if job.data.standardize:
        mean, std = rowmath.merge_moments([s.moments for s in summaries])
    return classes, mean, std, n_train


def check_validation_rows(job, has_val):
    if job.train.early_stopping and not has_val:
        raise job_error(job, "train.early_stopping", "needs validation rows (data.validation)")
