"""The run's outputs: the run folder (local, or staged locally and uploaded to object storage),
job.yaml, the metrics rows, checkpoints, model.npz, plot.png, and the RunResult."""

import glob
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from distbp import faults
from distbp.data.job import job_hash, job_to_dict
from distbp.errors import TrainingError, UsageError, WriteFailed
from distbp.run import checkpoint, rundir
from distbp.run.plot import import_in_background, plot_run
from distbp.runtime import blas
from distbp.runtime.messages import delta_means, figures, layer_norms, rows_of
from distbp.text import count


@dataclass
class RunResult:
    out_dir: str
    model_path: str | None
    checkpoint_path: str | None
    steps: int
    final: dict = field(default_factory=dict)  # the saved weights measured: see `Trainer._final`
    last_row: dict = field(default_factory=dict)  # the last metrics row written
    best_step: int | None = None  # early stopping: model.npz holds the weights evaluated at this step
    resumed_from: int | None = None
    already_finished: bool = False
    replacements: int = 0  # workers or parameter actors replaced after failures
    stopped_early: bool = False
    plot_path: str | None = None
    engine: str | None = None  # the step engine that ran: direct or tasks
    phases: dict = field(default_factory=dict)  # start-up and finish, in seconds

    @property
    def metrics_path(self):
        return f"{self.out_dir.rstrip('/')}/metrics.csv" if "://" in self.out_dir else os.path.join(self.out_dir, "metrics.csv")

    @property
    def metrics(self):
        """metrics.csv as a pyarrow Table (read from object storage when the run is there)."""
        import pyarrow.csv
        from pyarrow import fs

        if "://" not in self.metrics_path:
            return pyarrow.csv.read_csv(self.metrics_path)
        filesystem, path = fs.FileSystem.from_uri(self.metrics_path)
        with filesystem.open_input_stream(path) as f:
            return pyarrow.csv.read_csv(f)

    @property
    def metrics_df(self):
        """metrics.csv as a pandas DataFrame; UsageError when pandas is not installed."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise UsageError("result.metrics_df needs pandas, which is not installed", hint="pip install pandas, or use result.metrics, a pyarrow Table") from None
        return self.metrics.to_pandas()


class RunOutputs:
    """Everything a run writes. Nothing is written before `begin`, so a run that fails its
    checks leaves the folder as it was."""

    def __init__(self, job, resume, force, log):
        self.job, self.resume, self.force, self.log = job, resume, force, log
        self.out_dir = job.output_dir()
        self.remote = None  # a RemoteRun when output.dir is a URI; files are staged locally
        if "://" in self.out_dir:
            self.remote = rundir.RemoteRun(self.out_dir)
            self.out_dir = tempfile.mkdtemp(prefix="distbp-run-")
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.metrics = None
        self.tb = None  # output.tensorboard: a tensorboardX SummaryWriter on tb/
        self.plotter, self.plot_path = None, None  # the thread that draws plot.png, and where it is
        if job.output.tensorboard:
            try:
                import tensorboardX  # noqa: F401 (now, before anything is written)
            except ImportError:
                raise UsageError("output.tensorboard: needs the tensorboardX package", hint="pip install 'distbp[tensorboard]'") from None

    # -- before the run ---------------------------------------------------------------------
    def start_checkpoint(self):
        """Refuse a folder that holds a run unless resuming or forcing; on --resume the newest
        checkpoint that reads cleanly, checked against the job."""
        if self.remote is None:
            rundir.check_free(self.out_dir, self.resume, self.force)
        else:
            rundir.check_free(self.remote.uri, self.resume, self.force, holds=self.remote.holds_run())
            if self.resume:
                self.remote.fetch_for_resume(self.out_dir)
        if not self.resume:
            return None
        ckpt = checkpoint.load_latest(self.ckpt_dir, warn=self.log)
        if ckpt is None:
            raise UsageError(f"{self.out_dir}: --resume found no checkpoint to continue from")
        if ckpt.job_hash != job_hash(self.job):
            raise UsageError(
                f"{self.out_dir}: the checkpoint of step {ckpt.step} belongs to a different job{self._differences()}",
                hint="only cluster.* and output.* may change on --resume, so repeat the run's --set values; use --force to start over",
            )
        if ckpt.workers and ckpt.workers != self.job.cluster.workers:
            self.log(f"warning: resuming with {count(self.job.cluster.workers, 'worker')} instead of {ckpt.workers}: results will differ within float tolerance")
        return ckpt

    def _differences(self):
        """': train.steps is 500 here, 20000 in the run (--set train.steps=20000)', read from the
        run's job.yaml; empty when there is none or nothing shows."""
        import yaml

        try:
            with open(os.path.join(self.out_dir, "job.yaml")) as f:
                theirs = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return ""
        ours = job_to_dict(self.job, resolve_paths=True)

        def flat(d, prefix=""):
            out = {}
            for k, v in (d or {}).items() if isinstance(d, dict) else ():
                key = f"{prefix}{k}"
                out.update(flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
            return out

        mine, run = flat(ours), flat(theirs)
        keys = [k for k in sorted(set(mine) | set(run)) if k.split(".")[0] not in ("name", "cluster", "output") and mine.get(k) != run.get(k)]
        if not keys:
            return ""
        shown = "; ".join(f"{k} is {mine.get(k)!r} here, {run.get(k)!r} in the run (--set {k}={run.get(k)})" for k in keys[:3])
        return f": {shown}"

    def begin(self, columns, keep_until_step):
        """The run folder changes from here: clear it for --force, write job.yaml, open metrics.csv."""
        self.created = not os.path.exists(self.out_dir)
        if self.force:
            rundir.clear(self.out_dir)
            if self.remote:
                self.remote.clear()
        rundir.write_job(self.out_dir, job_to_dict(self.job, resolve_paths=True))
        self.publish("job.yaml")
        self.columns = columns
        self.open_metrics(keep_until_step)

    def undo_begin(self):
        """Take back what `begin` wrote to a new run's folder (a signal came before the first
        step): distbp's files, and the folder when `begin` made it."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        rundir.clear(self.out_dir)
        if self.remote:
            self.remote.clear()
        if self.created and not os.listdir(self.out_dir):
            os.rmdir(self.out_dir)

    def record_environment(self, reports):
        """Write environment.json (what each worker's bits depend on); warn when the workers'
        BLAS differ, between each other or from the run being resumed."""
        previous = rundir.read_environment(self.out_dir) if self.resume else None
        differs = blas.differences(reports, previous)
        if differs:
            self.log(f"warning: {differs}")
        rundir.write_environment(self.out_dir, reports)
        self.publish("environment.json")

    def open_metrics(self, keep_until_step):
        """(Re)open metrics.csv, keeping only the rows up to `keep_until_step`."""
        if self.metrics is not None:
            self.metrics.close()
        self.metrics = rundir.MetricsWriter(os.path.join(self.out_dir, "metrics.csv"), self.columns, keep_until_step)
        if self.job.output.tensorboard:
            self._open_tensorboard(keep_until_step)
        return self.metrics.last_seconds

    def _open_tensorboard(self, keep_until_step):
        """tb/ event files, flushed every few seconds so TensorBoard shows the run live. When
        steps after `keep_until_step` are to be written again (--resume, a replay), the new
        file starts with tensorboardX's purge_step: TensorBoard drops every earlier point from
        that step on, so no point is shown twice or stale."""
        from tensorboardX import SummaryWriter

        if self.tb is not None:
            self.tb.close()
        purge = None if keep_until_step is None else keep_until_step + 1
        # tensorboardX names a file by the second it was opened, and TensorBoard reads a
        # folder's files in name order: a replay within the same second would reuse (truncate)
        # the name. A counter after it keeps every file, in the order written.
        folder = os.path.join(self.out_dir, "tb")
        n = len(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
        self.tb = SummaryWriter(folder, purge_step=purge, flush_secs=5, filename_suffix=f".{n:04d}")

    def _scalars(self, row):
        for name in self.columns:
            if name not in ("step", "seconds") and row.get(name) is not None:
                self.tb.add_scalar(name, row[name], row["step"])

    # -- during the run ---------------------------------------------------------------------
    def row(self, order, infos, spec, bounds, task, t0, sst=None):
        """The metrics row of an applied step, from its StepInfos (one per parameter actor)."""
        info = infos[0]
        train = {k: v for k, v in figures(info.train, task, spec.layers[-1]).items() if k in ("loss", "accuracy")}  # no rmse for training rows
        row = {"step": order.step, **train, "seconds": round(info.applied_at - t0, 6), "lr": float(order.lr), "workers": info.workers}
        row["compute_sec"] = float(info.slowest)  # on_step sees it (bench uses it); metrics.csv does not
        if info.val is not None and rows_of(info.val):
            row.update(figures(info.val, task, spec.layers[-1], (sst or {}).get("val"), prefix="val_"))
        if order.evaluate:
            norms = layer_norms(infos, bounds, spec.num_layers)
            for l, mean in enumerate(delta_means(info.train, spec.layers[1:])):
                row[f"grad_norm_{l + 1}"] = float(norms[l])
                row[f"delta_mean_{l + 1}"] = mean
        self.metrics.write(row)
        if self.tb is not None:
            self._scalars(row)
        return row

    def checkpoint(self, step, snap, stopping, done, workers):
        """Write a checkpoint of `step` from `snap` (the parameter actors' Snapshot) and
        `stopping` (the early-stopping record, or None), and upload it with its marker; returns where it
        is. `workers`: the worker count that computed it (an elastic run's may be below
        cluster.workers)."""
        if stopping is None or snap.best_params is None:
            stopping = None
        ckpt = checkpoint.Checkpoint(step, snap.params, snap.opt_state, job_hash(self.job), self.job.seed, done, workers,
                                     stopping, None if stopping is None else snap.best_params)
        try:
            faults.hit("checkpoint_write", step)  # tests: a full disk, here
            path = checkpoint.save(self.ckpt_dir, ckpt, self.job.train.keep_checkpoints)
        except OSError as err:
            raise TrainingError(
                f"cannot write the checkpoint of step {step} to {self.ckpt_dir}: {err.strerror or err}",
                hint="the checkpoints written before are kept; free the space or fix the folder, then continue with --resume",
            ) from None
        if self.tb is not None:
            self.tb.flush()
        if self.remote:
            self.publish("metrics.csv")
            self.publish_tensorboard()
            self.remote.put_checkpoint(path, set(os.listdir(self.ckpt_dir)))
            return f"{self.remote.uri}/checkpoints/{os.path.basename(path)}"
        return path

    def latest_checkpoint(self):
        return checkpoint.load_latest(self.ckpt_dir, warn=self.log)

    # -- the end ------------------------------------------------------------------------------
    def write_model(self, model, params):
        """Write model.npz; OSError when it cannot be written (the trainer then keeps a
        final checkpoint and says so)."""
        model.params = np.asarray(params)
        faults.hit("model_write")  # tests: a full disk, here
        model.save(os.path.join(self.out_dir, "model.npz"))

    def has_model(self):
        """Whether the run folder holds model.npz."""
        if self.remote:
            return self.remote.has("model.npz")
        return os.path.isfile(os.path.join(self.out_dir, "model.npz"))

    def prepare_plot(self):
        """Import matplotlib in the background now, if the run draws a plot: the run calls this
        as Ray starts (cluster.connect's `beside`)."""
        if self.job.output.plot:
            import_in_background()

    def finish(self, phases):
        """Close metrics.csv and upload the last files; plot.png is drawn in a thread, beside
        the shut-down of the actors and Ray: `plot_done` waits for it."""
        import threading

        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            self.publish_tensorboard()
        for name in ("model.npz", "metrics.csv"):
            self.publish(name)

        def draw():
            t = time.perf_counter()
            self.plot_path = self._plot() and self.where("plot.png")
            self.publish("plot.png")
            phases["plot"] = time.perf_counter() - t

        self.plotter = threading.Thread(target=draw, name="distbp-plot")
        self.plotter.start()

    def plot_done(self):
        """Where plot.png is once drawn (None without matplotlib or before `finish`)."""
        if self.plotter is None:
            return None
        self.plotter.join()
        return self.plot_path

    def _plot(self):
        """plot.png of the run's curves (unless output.plot is false)."""
        if not self.job.output.plot:
            return None
        try:
            return plot_run(self.out_dir)
        except UsageError as err:
            self.log(f"warning: no plot: {err}")
        except WriteFailed as err:  # a full disk: the model and checkpoints are written already
            self.log(f"warning: no plot: cannot write {err.filename}: {err.strerror}")
        return None

    def publish(self, name):
        """Upload a finished file of the run folder when the run folder is a URI."""
        if self.remote and os.path.exists(os.path.join(self.out_dir, name)):
            if name == "metrics.csv" and self.metrics is not None and not self.metrics.file.closed:
                self.metrics.file.flush()
            self.remote.put(os.path.join(self.out_dir, name), name)

    def publish_tensorboard(self):
        """Upload the tb/ event files when the run folder is a URI."""
        folder = os.path.join(self.out_dir, "tb")
        if self.remote and os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                self.remote.put(os.path.join(folder, name), f"tb/{name}")

    def where(self, name):
        """Where a run-folder file lives for the user: the URI, or the local path."""
        return f"{self.remote.uri}/{name}" if self.remote else os.path.join(self.out_dir, name)

    def close(self):
        self.plot_done()
        if self.tb is not None:
            self.tb.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.remote:  # everything worth keeping has been uploaded
            shutil.rmtree(self.out_dir, ignore_errors=True)
