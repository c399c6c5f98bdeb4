"""The run folder: refusing to overwrite a run, job.yaml, and the streaming metrics.csv."""

import csv
import io
import json
import os
import re
import shutil

import yaml

from distbp import faults
from distbp.errors import TrainingError, UsageError

RUN_FILES = ("job.yaml", "metrics.csv", "model.npz", "checkpoints", "plot.png", "tb", "environment.json")


# What distbp writes inside its folders; --force removes these and nothing else there.
OWN_ENTRIES = {
    "checkpoints": re.compile(r"^(step-\d{9}\.npz|\.tmp-.*\.npz)$"),
    "tb": re.compile(r"^events\.out\.tfevents\.\d+\..+\.\d{4}$"),  # tensorboardX's name, distbp's counter
}


def holds_run(out_dir):
    return any(os.path.exists(os.path.join(out_dir, name)) for name in RUN_FILES)


def is_distbp_run(out_dir):
    """Whether `out_dir` holds a job.yaml that distbp wrote: a mapping with a model and data."""
    try:
        with open(os.path.join(out_dir, "job.yaml"), encoding="utf-8") as f:
            job = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(job, dict) and isinstance(job.get("model"), dict) and isinstance(job.get("data"), dict)


def check_free(out_dir, resume, force, holds=None):
    """Refuse a folder that already holds a run unless resuming or forcing, and a path that
    cannot become a folder (a file, or under one). Changes nothing. `holds` answers for a
    run folder on object storage."""
    if resume and force:
        raise UsageError("--resume and --force exclude each other")
    _check_folder(out_dir)
    held = holds_run(out_dir) if holds is None else holds
    if held and force and holds is None and not is_distbp_run(out_dir):
        names = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
        raise UsageError(
            f"{out_dir}: holds {', '.join(names)} but no job.yaml of a distbp run; --force replaces only a run distbp wrote",
            hint="choose another folder with --out",
        )
    if held and not (resume or force):
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
    """Remove the files of an earlier run for --force: distbp's own files, and in checkpoints/
    and tb/ only the names distbp writes there (a folder left empty goes too)."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if name in OWN_ENTRIES and os.path.isdir(path):
            for entry in os.scandir(path):
                if OWN_ENTRIES[name].match(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isfile(path) or os.path.islink(path):
            os.unlink(path)


class _PlainDumper(yaml.SafeDumper):
    """No anchors or aliases, even for a value used twice: job files are read without them."""

    def ignore_aliases(self, data):
        return True


def write_job(out_dir, job_dict):
    _write_atomic(out_dir, "job.yaml", lambda f: yaml.dump(job_dict, f, Dumper=_PlainDumper, sort_keys=False))


def write_environment(out_dir, reports):
    """environment.json: per worker rank, what its bits depend on (node, BLAS library,
    version, kernel and threads)."""
    _write_atomic(out_dir, "environment.json", lambda f: json.dump({"format_version": 1, "workers": reports}, f, indent=1))


def read_environment(out_dir):
    """The worker reports of environment.json, or None when there is none or it cannot be read."""
    try:
        with open(os.path.join(out_dir, "environment.json")) as f:
            workers = json.load(f)["workers"]
        return workers if isinstance(workers, list) and all(isinstance(w, dict) for w in workers) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(out_dir, name, write):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        write(f)
    os.replace(tmp, os.path.join(out_dir, name))


def complete_rows(path, until_step):
    """The rows of metrics.csv to keep on resume: complete ones (every field present, a whole
    step number and seconds) with strictly increasing steps up to `until_step`. A last line
    without its newline was torn by a crash or a full disk and is cut."""
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    kept, last = [], 0
    for row in csv.DictReader(io.StringIO(text)):
        if None in row or None in row.values():  # too many or too few fields
            continue
        try:
            step = int(row["step"])
            float(row["seconds"])
        except (KeyError, ValueError):
            continue
        if last < step <= until_step:
            kept.append(row)
            last = step
    return kept


class MetricsWriter:
    """Appends one row per step to metrics.csv, flushed as it goes. On resume, rows after the
    checkpoint's step are dropped first (and torn or out-of-order rows: `complete_rows`), so
    the file never holds a step twice: the rows kept go to a temporary file that replaces
    metrics.csv in one rename, so a crash leaves the old file or the new one, never half of one."""

    def __init__(self, path, columns, keep_until_step=None):
        self.path, self.columns = path, list(columns)
        kept = []
        if keep_until_step is not None and os.path.exists(path):
            kept = complete_rows(path, keep_until_step)
        tmp = os.path.join(os.path.dirname(path), ".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            for i, row in enumerate(kept):
                if i == len(kept) // 2:
                    faults.hit("metrics_rewrite")
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.columns, extrasaction="ignore")
        self.last_seconds = float(kept[-1]["seconds"]) if kept else 0.0
        self.last_row = kept[-1] if kept else None  # as read: a resume that only writes model.npz reports it

    def write(self, row):
        try:
            self.writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
            self.file.flush()
        except OSError as err:
            raise TrainingError(
                f"{self.path}: cannot write the row of step {row.get('step')} ({err.strerror or err})",
                hint="the checkpoints written before are kept, and a torn row is cut on --resume",
            ) from None

    def close(self):
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:  # the write that failed was reported already; what it held is torn
                pass


class RemoteRun:
    """A run folder on object storage (any pyarrow.fs URI), mirrored from a local staging folder.

    Files are written locally as usual, then each is uploaded as one PUT under its final name;
    a checkpoint upload is followed by an updated `checkpoints/latest` marker, so a reader
    never sees half a checkpoint. Credentials come from the environment, as pyarrow.fs reads them.
    """

    def __init__(self, uri):
        from pyarrow import fs

        self.uri = uri.rstrip("/")
        try:
            self.fs, self.root = fs.FileSystem.from_uri(self.uri)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
            raise UsageError(f"output.dir: cannot open {uri}: {str(err).splitlines()[0]}") from None

    def has(self, name):
        """Whether the run folder holds `name`."""
        from pyarrow import fs

        return self.fs.get_file_info(f"{self.root}/{name}").type != fs.FileType.NotFound

    def holds_run(self):
        return any(self.has(name) for name in RUN_FILES)

    def clear(self):
        for name in RUN_FILES:
            path = f"{self.root}/{name}"
            info = self.fs.get_file_info(path)
            if info.type.name == "Directory":
                self.fs.delete_dir(path)
            elif info.type.name == "File":
                self.fs.delete_file(path)

    def put(self, local_path, name):
        """Upload one local file as one object under `name`."""
        with open(local_path, "rb") as src, self.fs.open_output_stream(f"{self.root}/{name}") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)

    def put_checkpoint(self, local_path, keep_names):
        name = os.path.basename(local_path)
        self.put(local_path, f"checkpoints/{name}")
        with self.fs.open_output_stream(f"{self.root}/checkpoints/latest") as dst:
            dst.write(name.encode())
        from pyarrow import fs

        for info in self.fs.get_file_info(fs.FileSelector(f"{self.root}/checkpoints", allow_not_found=True)):
            if info.base_name.startswith("step-") and info.base_name not in keep_names:
                self.fs.delete_file(info.path)

    def fetch(self, name, local_path):
        """Download `name` to local_path; False when it does not exist."""
        if not self.has(name):
            return False
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        with self.fs.open_input_stream(f"{self.root}/{name}") as src, open(local_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
        return True

    def fetch_for_resume(self, staging):
        """Bring the checkpoints (newest first, as the marker says) and metrics.csv down."""
        from pyarrow import fs

        self.fetch("metrics.csv", os.path.join(staging, "metrics.csv"))
        self.fetch("environment.json", os.path.join(staging, "environment.json"))
        for info in self.fs.get_file_info(fs.FileSelector(f"{self.root}/checkpoints", allow_not_found=True)):
            if info.base_name.startswith("step-"):
                self.fetch(f"checkpoints/{info.base_name}", os.path.join(staging, "checkpoints", info.base_name))
