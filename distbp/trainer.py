"""The driver: validates the job against the data, starts or joins Ray, creates the shard
workers and parameter actors, runs the steps by passing object references, and writes the
run folder (job.yaml, metrics.csv, checkpoints/, model.npz). It holds no backprop math."""

import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, cluster, data, nn, rundir
from .errors import DistbpError, TrainingError, UsageError
from .job import job_error, job_hash, job_to_dict
from .model import Model
from .server import ParameterServer
from .workers import CORRECT, COUNT, DELTAS, LOSS, SECONDS, ShardPlan, ShardWorker

MAX_STEPS_IN_FLIGHT = 3  # steps queued ahead of the one whose metrics are being read


@dataclass
class RunResult:
    out_dir: str
    model_path: str | None
    checkpoint_path: str | None
    steps: int
    final: dict = field(default_factory=dict)  # the last metrics row
    resumed_from: int | None = None
    already_finished: bool = False


@dataclass
class Prepared:
    """What validating the job against the data's schema produces, before any Ray work."""

    spec: nn.Spec
    source: object
    features: list
    labels: list
    validation_source: object = None


def ensure_data(job, log):
    """Generate data.path from data.make when the file is missing (and say so)."""
    path = job.data_path()
    if job.data.make and path and "://" not in path and not os.path.exists(path):
        options = {k: v for k, v in job.data.make.items() if k not in ("kind", "rows")}
        table = data.make_dataset(job.data.make["kind"], job.data.make.get("rows"), seed=job.seed, **options)
        data.write_table(table, path)
        log(f"made {job.data.make['kind']} data: {table.num_rows} rows -> {path}")


def prepare(job):
    """Check the job against the data's schema: columns, types and the input width."""
    if not job.data_path():
        raise job_error(job, "data.path", "no data file given")
    source = data.open_source(job.data_path(), job.data.format)
    features, labels = data.select_columns(source, job.data.features, job.data.labels, job.data.task)
    if job.model.layers[0] != len(features):
        raise job_error(job, "model.layers[0]", f"expected {len(features)} (the number of feature columns), got {job.model.layers[0]}")
    if job.data.task == "regression" and job.model.layers[-1] != len(labels):
        raise job_error(job, "model.layers[-1]", f"expected {len(labels)} (the number of label columns), got {job.model.layers[-1]}")
    val_source = None
    if job.validation_path():
        val_source = data.open_source(job.validation_path(), job.data.format)
        data.select_columns(val_source, features, labels, job.data.task)
    m = job.model
    spec = nn.Spec(tuple(m.layers), tuple(m.activations), m.output, m.loss, m.init, m.dtype)
    return Prepared(spec, source, features, labels, val_source)


def _unwrap(err):
    """A DistbpError raised inside an actor, as itself; anything else unchanged."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, DistbpError) else err


def _get(refs):
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        raise _unwrap(err) from None


def _merge_summaries(job, prep, summaries):
    """Turn the workers' shard summaries into classes and standardisation statistics."""
    nonfinite = sum(s["nonfinite"] for s in summaries)
    if job.data.on_nan == "error" and nonfinite.sum():
        bad = [f"'{c}' ({n})" for c, n in zip(prep.features, nonfinite) if n]
        raise UsageError(
            f"{job.data_path()}: NaN or inf values in column {', '.join(bad)}",
            hint="clean the data or set data.on_nan: drop to skip those rows",
        )
    n_train = sum(s["rows"]["train"] for s in summaries)
    if n_train < job.cluster.workers:
        raise job_error(job, "cluster.workers", f"more workers ({job.cluster.workers}) than training rows ({n_train})")
    classes = sorted(set().union(*(s["labels"] for s in summaries)), key=lambda c: (str(type(c)), c))
    if job.data.task == "classification":
        width = 1 if job.model.output == "sigmoid" else len(classes)
        if job.model.output == "sigmoid" and len(classes) != 2:
            raise job_error(job, "model.output", f"sigmoid needs exactly 2 classes in '{prep.labels[0]}', found {len(classes)}", hint="use softmax")
        if job.model.layers[-1] != width:
            raise job_error(job, "model.layers[-1]", f"expected {width} (the number of classes in '{prep.labels[0]}'), got {job.model.layers[-1]}")
    mean = std = None
    if job.data.standardize:
        mean, std = data.merge_moments([s["moments"] for s in summaries])
    return classes, mean, std, n_train


def _slices(num_params, servers):
    return data.shard_ranges(num_params, servers)


def _layer_bounds(spec, a, b):
    """[(layer, start, stop)] of each layer's part of slice [a, b), in slice coordinates."""
    out = []
    for l, (w0, _, b1) in enumerate(spec.offsets()):
        lo, hi = max(a, w0), min(b, b1)
        if lo < hi:
            out.append((l, lo - a, hi - a))
    return out


class Trainer:
    """One run of a job. `run()` returns a RunResult; errors are DistbpError subclasses."""

    def __init__(self, job, resume=False, force=False, log=None, on_step=None):
        self.job, self.resume, self.force = job, resume, force
        self.log = log or (lambda msg: None)
        self.on_step = on_step or (lambda row: None)
        self.out_dir = job.output_dir()
        self.stop_requested = None  # set to a signal number to stop after the current step

    # -- set-up ------------------------------------------------------------------------
    def _start_checkpoint(self):
        if not self.resume:
            return None
        ckpt = checkpoint.load_latest(os.path.join(self.out_dir, "checkpoints"), warn=self.log)
        if ckpt is None:
            raise UsageError(f"{self.out_dir}: --resume found no checkpoint to continue from")
        if ckpt.job_hash != job_hash(self.job):
            raise UsageError(
                f"{self.out_dir}: the checkpoint of step {ckpt.step} belongs to a different job",
                hint="only cluster.* and output.* may change on --resume; use --force to start over",
            )
        return ckpt

    def _start_actors(self, prep):
        import ray

        job, K = self.job, self.job.cluster.workers
        ranges = data.shard_ranges(prep.source.num_rows, K)
        val_ranges = [(0, 0)] * K
        if prep.validation_source is not None:
            n = prep.validation_source.num_rows
            val_ranges = [(n * k // K, n * (k + 1) // K) for k in range(K)]
        slices = _slices(prep.spec.num_params, job.cluster.parameter_servers)
        fraction = job.data.validation if isinstance(job.data.validation, float) else None
        worker_cls = ray.remote(ShardWorker).options(num_cpus=job.cluster.cpus_per_worker, scheduling_strategy="SPREAD", max_concurrency=1)
        self.workers = [
            worker_cls.remote(
                ShardPlan(
                    rank, prep.source, a, b, tuple(prep.features), tuple(prep.labels), job.data.task, prep.spec,
                    job.cluster.chunk_rows, max(1, int(job.cluster.cpus_per_worker)), job.seed, job.data.on_nan,
                    fraction, prep.validation_source, val_ranges[rank],
                ),
                slices,
            )
            for rank, (a, b) in enumerate(ranges)
        ]
        self.slices = slices
        return _get([w.load.remote() for w in self.workers])

    def _start_servers(self, spec, params, opt_state):
        import ray

        opt = self.job.train.optimizer
        kwargs = dict(name=opt.name, momentum=opt.momentum, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay)
        server_cls = ray.remote(ParameterServer).options(num_cpus=0, resources=dict(self.job.cluster.parameter_resources) or None)
        self.servers = [
            server_cls.remote(params[a:b], kwargs, {k: v[a:b] if v.size == params.size else v for k, v in opt_state.items()} if opt_state else None, _layer_bounds(spec, a, b))
            for a, b in self.slices
        ]

    # -- the loop ------------------------------------------------------------------------
    def run(self):
        job = self.job
        rundir.check_free(self.out_dir, self.resume, self.force)
        ckpt = self._start_checkpoint()
        if ckpt is not None and ckpt.finished:
            self.log(f"{self.out_dir}: run already finished at step {ckpt.step}; nothing to do")
            return RunResult(self.out_dir, os.path.join(self.out_dir, "model.npz"), None, ckpt.step, already_finished=True)
        ensure_data(job, self.log)
        prep = prepare(job)
        started = cluster.connect(job.cluster.address, job.cluster.workers * job.cluster.cpus_per_worker, job.cluster.connect_timeout_s)
        try:
            cluster.check_capacity(job.cluster.workers, job.cluster.cpus_per_worker)
            return self._run(prep, ckpt)
        finally:
            self.close()
            if started:
                import ray

                ray.shutdown()

    def setup(self, prep, ckpt=None):
        """Create the actors, load and check the shards, and start the parameter actors from
        a fresh init or from `ckpt`. Needs Ray; touches nothing on disk."""
        job, spec = self.job, prep.spec
        summaries = self._start_actors(prep)
        classes, mean, std, self.n_train = _merge_summaries(job, prep, summaries)
        rows = _get([w.prepare.remote(classes, mean, std) for w in self.workers])
        self.has_val = any(r.get("val", 0) for r in rows)
        if ckpt is not None:
            params, opt_state = ckpt.params, ckpt.opt_state
            if params.shape != (spec.num_params,):
                raise UsageError(f"{self.out_dir}: the checkpoint holds {params.size} parameters, the model needs {spec.num_params}")
        else:
            params, opt_state = nn.init_params(spec, np.random.default_rng(job.seed)), None
        self._start_servers(spec, params, opt_state)
        classes = classes if job.data.task == "classification" else []
        self.model = Model(spec, params, job.data.task, prep.features, prep.labels, classes, mean, std)

    def close(self):
        """Stop this run's actors."""
        for actor in getattr(self, "workers", []) + getattr(self, "servers", []):
            _kill(actor)
        self.workers, self.servers = [], []

    def _run(self, prep, ckpt):
        job, spec = self.job, prep.spec
        t_setup = time.perf_counter()
        self.setup(prep, ckpt)
        # From here on the run folder changes: every check above has passed.
        if self.force:
            rundir.clear(self.out_dir)
        rundir.write_job(self.out_dir, job_to_dict(job, resolve_paths=True))
        L, task = spec.num_layers, job.data.task
        columns = ["step", "loss"] + (["accuracy"] if task == "classification" else []) + ["seconds", "lr"]
        if self.has_val:
            columns += ["val_loss"] + (["val_accuracy"] if task == "classification" else [])
        columns += [f"grad_norm_{l}" for l in range(1, L + 1)] + [f"delta_mean_{l}" for l in range(1, L + 1)]
        metrics = rundir.MetricsWriter(os.path.join(self.out_dir, "metrics.csv"), columns, ckpt.step if ckpt else None)
        self.log(f"setup: {len(self.workers)} workers, {self.n_train} training rows, {spec.num_params} parameters, {time.perf_counter() - t_setup:.1f} s")
        try:
            return self._loop(spec, ckpt.step + 1 if ckpt else 1, metrics, self.has_val, ckpt)
        finally:
            metrics.close()

    def _loop(self, spec, first, metrics, has_val, ckpt):
        job, K, S = self.job, len(self.workers), len(self.servers)
        steps, ckpt_dir = job.train.steps, os.path.join(self.out_dir, "checkpoints")
        w_refs = [s.weights.remote() for s in self.servers]
        inflight, last_row, last_ckpt = deque(), {}, None
        t0 = time.perf_counter() - metrics.last_seconds
        for step in range(first, steps + 1):
            evaluate = step % job.train.eval_every == 0 or step == steps
            lr = job.train.optimizer.lr
            outs = [w.compute.options(num_returns=S + 1).remote(step, evaluate, *w_refs) for w in self.workers]
            stats = [o[S] for o in outs]
            val = [w.evaluate.remote(*w_refs) for w in self.workers] if evaluate and has_val else None
            applied = [
                s.apply.options(num_returns=2).remote(step, lr, K, evaluate, *[o[i] for o in outs], *stats)
                for i, s in enumerate(self.servers)
            ]
            w_refs = [a[0] for a in applied]
            inflight.append((step, lr, stats, val, [a[1] for a in applied] if evaluate else None))
            save = step % job.train.checkpoint_every == 0 or step == steps or self.stop_requested
            while inflight and (len(inflight) > MAX_STEPS_IN_FLIGHT or save):
                last_row = self._record(spec, inflight.popleft(), metrics, t0)
            if save:
                snaps = _get([s.snapshot.remote() for s in self.servers])
                params = np.concatenate([s["params"] for s in snaps])
                names = [k for k in snaps[0] if k.startswith("opt_")]
                opt_state = {k[4:]: np.concatenate([s[k] for s in snaps]) if snaps[0][k].size > 1 or S == 1 else snaps[0][k] for k in names}
                done = step == steps
                last_ckpt = checkpoint.save(ckpt_dir, checkpoint.Checkpoint(step, params, opt_state, job_hash(job), job.seed, done), job.train.keep_checkpoints)
                if done:
                    self.model.params = params
                    self.model.save(os.path.join(self.out_dir, "model.npz"))
                if self.stop_requested and not done:
                    raise Interrupted(self.stop_requested, step, last_ckpt)
        return RunResult(self.out_dir, os.path.join(self.out_dir, "model.npz"), last_ckpt, steps, last_row, ckpt.step if ckpt else None)

    def _record(self, spec, entry, metrics, t0):
        step, lr, stats_refs, val_refs, norm_refs = entry
        totals = np.sum(_get(stats_refs), axis=0)
        n = totals[COUNT]
        row = {"step": step, "loss": totals[LOSS] / n, "seconds": round(time.perf_counter() - t0, 4), "lr": lr}
        if self.job.data.task == "classification":
            row["accuracy"] = totals[CORRECT] / n
        row["compute_sec"] = max(s[SECONDS] for s in _get(stats_refs))
        if val_refs is not None:
            v = np.sum(_get(val_refs), axis=0)
            row["val_loss"] = v[LOSS] / v[COUNT] if v[COUNT] else None
            if self.job.data.task == "classification":
                row["val_accuracy"] = v[CORRECT] / v[COUNT] if v[COUNT] else None
        if norm_refs is not None:
            squares = np.zeros(spec.num_layers)
            for server_squares, (a, b) in zip(_get(norm_refs), self.slices):
                for (l, _, _), sq in zip(_layer_bounds(spec, a, b), server_squares):
                    squares[l] += sq
            widths = np.array(spec.layers[1:])
            for l in range(spec.num_layers):
                row[f"grad_norm_{l + 1}"] = float(np.sqrt(squares[l]))
                row[f"delta_mean_{l + 1}"] = float(totals[DELTAS + l] / (n * widths[l]))
        if not np.isfinite(row["loss"]):
            raise TrainingError(f"training diverged at step {step}: the loss is {row['loss']}", hint="lower train.optimizer.lr")
        metrics.write(row)
        self.on_step(row)
        return row


class Interrupted(DistbpError):
    """The run stopped on a signal after writing a checkpoint; exit code 128 + signal."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint {path}", hint="continue with --resume")
        self.exit_code = 128 + signum


def _kill(actor):
    import ray

    try:
        ray.kill(actor)
    except Exception:  # already gone
        pass


def train_job(job, **kwargs):
    """Run `job` (a job.Job) and return its RunResult."""
    return Trainer(job, **kwargs).run()
