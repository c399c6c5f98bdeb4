"""The run folder: refusing to overwrite a run, job.yaml, and the streaming metrics.csv."""

import csv
import os
import shutil

import yaml

from .errors import UsageError

RUN_FILES = ("job.yaml", "metrics.csv", "model.npz", "checkpoints", "plot.png")


def holds_run(out_dir):
    return any(os.path.exists(os.path.join(out_dir, name)) for name in RUN_FILES)


def check_free(out_dir, resume, force):
    """Refuse a folder that already holds a run unless resuming or forcing, and a path that
    cannot become a folder (a file, or under one). Changes nothing."""
    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    _check_folder(out_dir)
    if holds_run(out_dir) and not (resume or force):
        raise UsageError(
            f"{out_dir}: already holds a run",
            hint="pass --resume to continue it, --force to replace it, or --out for another folder",
        )


def _check_folder(out_dir):
    """UsageError now, not an OSError after setup, when `out_dir` cannot be a run folder."""
    if "://" in out_dir:  # object storage: there are no folders to check
        return
    path = os.path.abspath(out_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)  # the nearest part of out_dir that exists
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(out_dir) else f"is under the file {path}"
        raise UsageError(f"output.dir: {out_dir} {where}, not a folder", hint="choose another folder with --out")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"output.dir: cannot write to {path}", hint="choose another folder with --out")


def clear(out_dir):
    """Remove the files of an earlier run (only distbp's own files) for --force."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def write_job(out_dir, job_dict):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".job.yaml.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(job_dict, f, sort_keys=False)
    os.replace(tmp, os.path.join(out_dir, "job.yaml"))


class MetricsWriter:
    """Appends one row per step to metrics.csv, flushed as it goes. On resume, rows after the
    checkpoint's step are dropped first, so the file never holds a step twice."""

    def __init__(self, path, columns, keep_until_step=None):
        self.path, self.columns = path, list(columns)
        kept = []
        if keep_until_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= keep_until_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.last_seconds = float(kept[-1]["seconds"]) if kept else 0.0

    def write(self, row):
        self.writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self.file.flush()

    def close(self):
        if not self.file.closed:
            self.file.close()
