"""The checks of a job against its data: making data.path from data.make, the schema
(columns, types, input and output widths) before Ray starts, and the workers' shard summaries
(NaN counts, classes, standardisation, row counts) once they have read their rows."""

import os
from dataclasses import dataclass
from typing import NamedTuple

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


class RowCounts(NamedTuple):
    """What reading a block of rows found (a worker's shard, or one block of --dry-run's scan):
    sums that `merge_summaries` adds up."""

    nonfinite: dict  # 'data' / 'validation' -> (columns,) counts of NaN or inf values
    dropped: int  # rows skipped by data.on_nan: drop
    labels: list  # the distinct class labels (classification), sorted
    rows: dict  # 'train' / 'val' -> row count, after on_nan: drop
    moments: tuple  # rowmath.shard_moments of the training features kept


def count_rows(parts, task, labels, on_nan, val_from_file):
    """Count and check rows read: `parts` maps 'train' (and 'val') to (the label columns as a
    table, the features as an array). The values checked for NaN or inf are the features, and
    the targets for regression; under on_nan: drop, rows holding one are dropped. Returns
    (RowCounts, the parts kept)."""
    nonfinite, dropped, found, rows, kept = {}, 0, set(), {}, {}
    for name, (table, x) in parts.items():
        values = x if task != "regression" else np.hstack([x, tables.targets_to_numpy(table, list(labels), np.float64)])
        origin = "validation" if name == "val" and val_from_file else "data"
        nonfinite[origin] = nonfinite.get(origin, 0) + rowmath.nonfinite_counts(values)
        if on_nan == "drop":
            keep = rowmath.finite_row_mask(values)
            dropped += int(len(keep) - keep.sum())
            table, x = table.filter(keep), x[keep]
        kept[name] = (table, x)
        rows[name] = len(x)
        if task == "classification":
            found |= set(tables.unique_labels(tables.label_values(table, labels[0])))
    train = kept["train"][1] if "train" in kept else np.empty((0, next(iter(parts.values()))[1].shape[1]))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or inf rows left are refused by merge_summaries
        moments = rowmath.shard_moments(train)
    return RowCounts(nonfinite, dropped, sorted(found), rows, moments), kept


def scan(job, prep):
    """--dry-run's look at the values: read every row once, block by block (Parquet row groups,
    Feather batches, CSV blocks) without Ray, and make the checks the workers' summaries get
    (`merge_summaries`: NaN or inf values, the classes against the output width, the rows
    left; validation rows for early stopping). Returns (the rows on_nan: drop skips, merge_summaries' result)."""
    fraction = job.data.validation if isinstance(job.data.validation, float) else None
    columns, dtype = [*prep.features, *prep.labels], prep.spec.np_dtype
    counts = []
    for source, val_file in ((prep.source, False), (prep.validation_source, True)):
        for start, block in source.blocks(columns) if source is not None else ():
            x = tables.features_to_numpy(block, list(prep.features), dtype)
            table = block.select(list(prep.labels))
            parts = {"val" if val_file else "train": (table, x)}
            if fraction and not val_file:
                held = rowmath.validation_mask(start, start + len(x), fraction, job.seed)
                parts = {"train": (table.filter(~held), x[~held]), "val": (table.filter(held), x[held])}
            counts.append(count_rows(parts, job.data.task, prep.labels, job.data.on_nan, val_file)[0])
    merged = merge_summaries(job, prep, counts)
    check_validation_rows(job, any(c.rows.get("val", 0) for c in counts))
    return sum(c.dropped for c in counts), merged


def merge_summaries(job, prep, summaries):
    """Turn RowCounts (the workers' shards, or --dry-run's blocks) into classes and
    standardisation statistics, after the checks on what they found."""
    columns = prep.features + (prep.labels if job.data.task == "regression" else [])
    for origin, path in (("data", prep.source.path), ("validation", job.validation_path())):
        counts = sum(s.nonfinite.get(origin, 0) for s in summaries)
        if job.data.on_nan == "error" and np.any(counts):
            bad = [f"'{c}' ({n})" for c, n in zip(columns, counts) if n]
            raise UsageError(
                f"{path}: NaN or inf values in column {', '.join(bad)}",
                hint="clean the data or set data.on_nan: drop to skip those rows",
            )
    n_train = sum(s.rows.get("train", 0) for s in summaries)  # a validation file's blocks have none
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
