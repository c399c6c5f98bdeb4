"""The driver: validates the job against the data, starts or joins Ray, creates the shard
workers and parameter actors, runs the steps by passing object references, and writes the
run folder (job.yaml, metrics.csv, checkpoints/, model.npz). It holds no backprop math."""

import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, cluster, data, nn, rundir, sampling, schedule
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
    replacements: int = 0  # workers or parameter actors replaced after failures
    stopped_early: bool = False
    plot_path: str | None = None

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
        """metrics.csv as a pandas DataFrame, or None when pandas is not installed."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            return None
        return self.metrics.to_pandas()


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
    if job.cluster.workers > source.num_rows:
        raise job_error(job, "cluster.workers", f"more workers ({job.cluster.workers}) than rows ({source.num_rows}) in {job.data_path()}")
    if job.model.layers[0] != len(features):
        raise job_error(job, "model.layers[0]", f"expected {len(features)} (the number of feature columns), got {job.model.layers[0]}")
    if job.data.task == "regression" and job.model.layers[-1] != len(labels):
        raise job_error(job, "model.layers[-1]", f"expected {len(labels)} (the number of label columns), got {job.model.layers[-1]}")
    val_source = None
    if job.validation_path():
        val_source = data.open_source(job.validation_path(), job.data.format)
        data.select_columns(val_source, features, labels, job.data.task)
    return Prepared(spec_of(job), source, features, labels, val_source)


def spec_of(job):
    """The network spec of a job's model section."""
    m = job.model
    return nn.Spec(tuple(m.layers), tuple(m.activations), m.output, m.loss, m.init, m.dtype)


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
    columns = prep.features + (prep.labels if job.data.task == "regression" else [])
    for origin, path in (("data", job.data_path()), ("validation", job.validation_path())):
        counts = sum(s["nonfinite"].get(origin, 0) for s in summaries)
        if job.data.on_nan == "error" and np.any(counts):
            bad = [f"'{c}' ({n})" for c, n in zip(columns, counts) if n]
            raise UsageError(
                f"{path}: NaN or inf values in column {', '.join(bad)}",
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


def _layer_bounds(spec, a, b):
    """[(layer, start, stop)] of each layer's part of slice [a, b), in slice coordinates."""
    out = []
    for l, (w0, _, b1) in enumerate(spec.offsets()):
        lo, hi = max(a, w0), min(b, b1)
        if lo < hi:
            out.append((l, lo - a, hi - a))
    return out


@dataclass
class _Step:
    """One submitted step: the refs the driver reads when it records the step."""

    step: int
    lr: float
    weights: list  # refs of the weights the step's forward pass used
    info: list  # per parameter actor: summed stats, slowest compute, layer squares
    val: list | None  # per worker: validation stats at `weights`
    barrier: bool  # submit nothing after this step until it is recorded


def _recoverable():
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.RayChannelError)


class Trainer:
    """One run of a job. `run()` returns a RunResult; errors are DistbpError subclasses."""

    def __init__(self, job, resume=False, force=False, log=None, on_step=None):
        self.job, self.resume, self.force = job, resume, force
        self.log = log or (lambda msg: None)
        self.on_step = on_step or (lambda row: None)
        self.out_dir = job.output_dir()
        self.remote = None  # a RemoteRun when output.dir is a URI; files are staged locally
        if "://" in self.out_dir:
            import tempfile

            self.remote = rundir.RemoteRun(self.out_dir)
            self.out_dir = tempfile.mkdtemp(prefix="distbp-run-")
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.stop_requested = None  # a signal number: checkpoint after the current step and stop
        self.replacements = 0  # workers and parameter actors replaced after a failure
        self.workers, self.servers = [], []

    # -- set-up ------------------------------------------------------------------------
    def _start_checkpoint(self):
        if not self.resume:
            return None
        ckpt = checkpoint.load_latest(self.ckpt_dir, warn=self.log)
        if ckpt is None:
            raise UsageError(f"{self.out_dir}: --resume found no checkpoint to continue from")
        if ckpt.job_hash != job_hash(self.job):
            raise UsageError(
                f"{self.out_dir}: the checkpoint of step {ckpt.step} belongs to a different job",
                hint="only cluster.* and output.* may change on --resume; use --force to start over",
            )
        if ckpt.workers and ckpt.workers != self.job.cluster.workers:
            self.log(f"warning: resuming with {self.job.cluster.workers} workers instead of {ckpt.workers}: results will differ within float tolerance")
        return ckpt

    def _plans(self, prep):
        job, K = self.job, self.job.cluster.workers
        ranges = data.shard_ranges(prep.source.num_rows, K)
        val_ranges = [(0, 0)] * K
        if prep.validation_source is not None:
            n = prep.validation_source.num_rows
            val_ranges = [(n * k // K, n * (k + 1) // K) for k in range(K)]
        fraction = job.data.validation if isinstance(job.data.validation, float) else None
        batch = None if job.train.batch == "full" else int(job.train.batch)
        return [
            ShardPlan(
                rank, prep.source, a, b, tuple(prep.features), tuple(prep.labels), job.data.task, prep.spec,
                job.cluster.chunk_rows, max(1, int(job.cluster.cpus_per_worker)), job.seed, job.data.on_nan,
                fraction, prep.validation_source, val_ranges[rank], batch,
            )
            for rank, (a, b) in enumerate(ranges)
        ]

    def _new_worker(self, plan):
        import ray

        cls = ray.remote(ShardWorker).options(num_cpus=self.job.cluster.cpus_per_worker, scheduling_strategy="SPREAD")
        return cls.remote(plan, self.slices)

    def setup(self, prep, ckpt=None):
        """Create the actors, load and check the shards, and start the parameter actors from
        a fresh init or from `ckpt`. Needs Ray; touches nothing on disk."""
        job, spec = self.job, prep.spec
        self.spec = spec
        self.slices = data.shard_ranges(spec.num_params, job.cluster.parameter_servers)
        self.plans = self._plans(prep)
        self.workers = [self._new_worker(plan) for plan in self.plans]
        summaries = _get([w.load.remote() for w in self.workers])
        self.classes, mean, std, self.n_train = _merge_summaries(job, prep, summaries)
        offsets = np.cumsum([0] + [s["rows"]["train"] for s in summaries])
        self.prepare_args = [(self.classes, mean, std, int(offsets[k]), self.n_train) for k in range(len(self.workers))]
        rows = _get([w.prepare.remote(*args) for w, args in zip(self.workers, self.prepare_args)])
        self.has_val = any(r.get("val", 0) for r in rows)
        if job.train.early_stopping and not self.has_val:
            raise job_error(job, "train.early_stopping", "needs validation rows (data.validation)")
        batch = self.n_train if job.train.batch == "full" else int(job.train.batch)
        self.total_steps = job.train.steps or job.train.epochs * sampling.steps_per_epoch(self.n_train, batch)
        self.best = None  # early stopping: (value, step, weight refs or params)
        if ckpt is not None:
            if ckpt.params.shape != (spec.num_params,):
                raise UsageError(f"{self.out_dir}: the checkpoint holds {ckpt.params.size} parameters, the model needs {spec.num_params}")
            self._start_servers(ckpt.params, ckpt.opt_state, ckpt.step)
            if ckpt.best is not None:
                self.best = (ckpt.best[0], int(ckpt.best[1]), ckpt.best_params, int(ckpt.best[2]))
        else:
            self._start_servers(nn.init_params(spec, np.random.default_rng(job.seed)), None, 0)
        classes = self.classes if job.data.task == "classification" else []
        self.model = Model(spec, None, job.data.task, prep.features, prep.labels, classes, mean, std)

    def _start_servers(self, params, opt_state, step):
        import ray

        opt = self.job.train.optimizer
        kwargs = dict(name=opt.name, momentum=opt.momentum, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay)
        placement = {"resources": dict(self.job.cluster.parameter_resources)}
        if not placement["resources"]:  # default: the driver's node, which a run cannot outlive anyway
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}
        cls = ray.remote(ParameterServer).options(num_cpus=0, **placement)
        self.servers = [
            cls.remote(params[a:b], kwargs, _slice_state(opt_state, a, b, params.size), _layer_bounds(self.spec, a, b), step)
            for a, b in self.slices
        ]

    # -- the compiled step graph -----------------------------------------------------------
    def _graph_wanted(self):
        """DISTBP_ENGINE=graph (experimental) moves each step over a Ray compiled graph's
        shared-memory channels instead of Ray tasks, which removes most of a step's fixed cost.
        It needs one parameter actor and no early stopping (which keeps weight references).
        On a failure the run tears the graph down and goes on with tasks."""
        return (
            os.environ.get("DISTBP_ENGINE") == "graph" and not getattr(self, "graph_failed", False)
            and len(self.servers) == 1 and self.job.train.early_stopping is None
        )

    def _compile(self):
        self.graph, self.engine = None, "tasks"
        if not self._graph_wanted():
            return
        from ray.dag import InputNode

        try:
            with InputNode() as order:
                weights = self.servers[0].graph_weights.bind(order)
                outs = [w.graph_step.bind(order, weights) for w in self.workers]
                info = self.servers[0].graph_apply.bind(order, *outs)
            self.graph = info.experimental_compile(_max_inflight_executions=MAX_STEPS_IN_FLIGHT + 1)
            self.engine = "graph"
        except Exception as err:  # fall back to plain tasks: slower, same bits
            self.log(f"compiled step graph unavailable ({type(err).__name__}); using tasks")
            self.graph = None

    def _teardown(self):
        graph, self.graph = getattr(self, "graph", None), None
        if graph is not None:
            try:
                graph.teardown()
            except Exception:  # a graph with a dead actor may fail to tear down cleanly
                pass

    def close(self):
        """Stop this run's actors."""
        self._teardown()
        for actor in self.workers + self.servers:
            _kill(actor)
        self.workers, self.servers = [], []

    # -- the run -------------------------------------------------------------------------
    def run(self):
        job = self.job
        if self.remote is None:
            rundir.check_free(self.out_dir, self.resume, self.force)
        else:
            rundir.check_free(self.remote.uri, self.resume, self.force, holds=self.remote.holds_run())
            if self.resume:
                self.remote.fetch_for_resume(self.out_dir)
        ckpt = self._start_checkpoint()
        if ckpt is not None and ckpt.finished:
            self.log(f"{self.out_dir}: run already finished at step {ckpt.step}; nothing to do")
            return RunResult(self._where(""), self._where("model.npz"), None, ckpt.step, already_finished=True)
        ensure_data(job, self.log)
        prep = prepare(job)
        started = cluster.connect(job.cluster.address, job.cluster.workers * job.cluster.cpus_per_worker, job.cluster.connect_timeout_s)
        try:
            cluster.check_capacity(job.cluster.workers, job.cluster.cpus_per_worker)
            t_setup = time.perf_counter()
            self.setup(prep, ckpt)
            # From here on the run folder changes: every check above has passed.
            if self.force:
                rundir.clear(self.out_dir)
                if self.remote:
                    self.remote.clear()
            rundir.write_job(self.out_dir, job_to_dict(job, resolve_paths=True))
            self._publish("job.yaml")
            self.log(f"setup: {len(self.workers)} workers, {self.n_train} training rows, {self.spec.num_params} parameters, {time.perf_counter() - t_setup:.1f} s")
            self.resumed_from = ckpt.step if ckpt else None
            self.metrics = self._open_metrics(self.resumed_from)
            try:
                return self._loop(ckpt.step + 1 if ckpt else 1)
            finally:
                self.metrics.close()
        finally:
            self.close()
            if self.remote:  # everything worth keeping has been uploaded
                import shutil

                shutil.rmtree(self.out_dir, ignore_errors=True)
            if started:
                import ray

                ray.shutdown()

    def _open_metrics(self, keep_until_step):
        L, task = self.spec.num_layers, self.job.data.task
        columns = ["step", "loss"] + (["accuracy"] if task == "classification" else []) + ["seconds", "lr"]
        if self.has_val:
            columns += ["val_loss"] + (["val_accuracy"] if task == "classification" else [])
        columns += [f"grad_norm_{l}" for l in range(1, L + 1)] + [f"delta_mean_{l}" for l in range(1, L + 1)]
        return rundir.MetricsWriter(os.path.join(self.out_dir, "metrics.csv"), columns, keep_until_step)

    def _submit(self, step, weights):
        job, K, S = self.job, len(self.workers), len(self.servers)
        evaluate = step % job.train.eval_every == 0 or step == self.total_steps
        lr = schedule.learning_rate(step, job.train.optimizer.lr, job.train.schedule, self.total_steps)
        barrier = (
            step % job.train.checkpoint_every == 0
            or step == self.total_steps
            or bool(self.stop_requested)
            or (evaluate and job.train.early_stopping is not None)
        )
        if self.graph is not None:
            return _Step(step, lr, None, self.graph.execute((step, lr, evaluate)), "graph", barrier), weights
        outs = [w.compute.options(num_returns=S + 1).remote(step, evaluate, *weights) for w in self.workers]
        stats = [o[S] for o in outs]
        val = [w.evaluate.remote(*weights) for w in self.workers] if evaluate and self.has_val else None
        applied = [
            s.apply.options(num_returns=2).remote(step, lr, K, evaluate, *[o[i] for o in outs], *stats)
            for i, s in enumerate(self.servers)
        ]
        return _Step(step, lr, weights, [a[1] for a in applied], val, barrier), [a[0] for a in applied]

    def _loop(self, first):
        job = self.job
        self._compile()
        weights = [s.weights.remote() for s in self.servers]
        inflight, step, last_row = deque(), first, {}
        self.t0 = time.perf_counter() - self.metrics.last_seconds
        stop_at = None  # a step after which the run ends early (signal or early stopping)
        while True:
            try:
                while step <= self.total_steps and stop_at is None and len(inflight) < MAX_STEPS_IN_FLIGHT and not (inflight and inflight[-1].barrier):
                    entry, weights = self._submit(step, weights)
                    inflight.append(entry)
                    step += 1
                if not inflight:
                    break
                entry = inflight[0]
                last_row = self._record(entry)
                inflight.popleft()
            except _recoverable() as err:
                if self.graph is not None:
                    self.graph_failed = True  # the rest of the run uses tasks
                self._teardown()
                step = self._recover(err)
                self._compile()
                inflight.clear()
                weights = [s.weights.remote() for s in self.servers]
                continue
            if stop_at is None and (self._early_stop(entry, last_row) or self.stop_requested):
                stop_at = entry.step
            at_end = entry.step == self.total_steps or (stop_at is not None and not inflight)
            if (at_end or entry.step % job.train.checkpoint_every == 0) and not inflight:
                early = stop_at is not None and not self.stop_requested
                path = self._checkpoint(entry.step, done=entry.step == self.total_steps or early)
                if entry.step == self.total_steps or early:
                    self._write_model()
                    self.metrics.close()
                    plot = self._plot()
                    for name in ("model.npz", "metrics.csv", "plot.png"):
                        self._publish(name)
                    return RunResult(
                        self._where(""), self._where("model.npz"), path, entry.step, last_row,
                        resumed_from=self.resumed_from, replacements=self.replacements, stopped_early=early,
                        plot_path=plot and self._where("plot.png"),
                    )
                if self.stop_requested:
                    raise Interrupted(self.stop_requested, entry.step, path)
        raise TrainingError("the step loop ended without finishing")  # unreachable by design

    def _early_stop(self, entry, row):
        rule = self.job.train.early_stopping
        if rule is None or row.get("val_loss") is None:
            return False
        value = row["val_loss"] if rule.metric == "val_loss" else -row["val_accuracy"]
        if self.best is None or value < self.best[0] - rule.min_delta:
            self.best = (value, entry.step, entry.weights, 0)
            return False
        self.best = (*self.best[:3], self.best[3] + 1)
        if self.best[3] >= rule.patience:
            self.log(f"early stopping at step {entry.step}: best {rule.metric} at step {self.best[1]}")
            return True
        return False

    def _best_params(self):
        refs = self.best[2]
        return refs if isinstance(refs, np.ndarray) else np.concatenate(_get(refs))

    def _checkpoint(self, step, done):
        snaps = _get([s.snapshot.remote() for s in self.servers])
        params = np.concatenate([s["params"] for s in snaps])
        opt_state = _join_state([{k[4:]: v for k, v in s.items() if k.startswith("opt_")} for s in snaps], params.size)
        best = best_params = None
        if self.best is not None:
            best, best_params = np.array([self.best[0], self.best[1], self.best[3]]), self._best_params()
        self.final_params = params
        ckpt = checkpoint.Checkpoint(step, params, opt_state, job_hash(self.job), self.job.seed, done, self.job.cluster.workers, best, best_params)
        path = checkpoint.save(self.ckpt_dir, ckpt, self.job.train.keep_checkpoints)
        if self.remote:
            self._publish("metrics.csv")
            self.remote.put_checkpoint(path, set(os.listdir(self.ckpt_dir)))
            return f"{self.remote.uri}/checkpoints/{os.path.basename(path)}"
        return path

    def _publish(self, name):
        """Upload a finished file of the run folder when the run folder is a URI."""
        if self.remote and os.path.exists(os.path.join(self.out_dir, name)):
            if name == "metrics.csv" and not self.metrics.file.closed:
                self.metrics.file.flush()
            self.remote.put(os.path.join(self.out_dir, name), name)

    def _where(self, name):
        """Where a run-folder file lives for the user: the URI, or the local path."""
        return f"{self.remote.uri}/{name}" if self.remote else os.path.join(self.out_dir, name)

    def _plot(self):
        """plot.png of the run's curves, when matplotlib is installed."""
        from .plot import plot_run

        try:
            return plot_run(self.out_dir)
        except UsageError as err:
            self.log(f"no plot: {err}")
            return None

    def _write_model(self):
        """model.npz: the best validation weights under early stopping, else the last."""
        self.model.params = self._best_params() if self.job.train.early_stopping and self.best else self.final_params
        self.model.save(os.path.join(self.out_dir, "model.npz"))

    def _record(self, entry):
        """Read a finished step's sums (small arrays only) and write its metrics row."""
        spec, L = self.spec, self.spec.num_layers
        val = None
        if entry.val == "graph":
            info, val = _get(entry.info)
            infos = [info]
        else:
            infos = _get(entry.info)
            val = np.sum(_get(entry.val), axis=0) if entry.val is not None else None
        totals = infos[0]
        n = totals[COUNT]
        row = {"step": entry.step, "loss": totals[LOSS] / n, "seconds": round(time.perf_counter() - self.t0, 4), "lr": entry.lr}
        if self.job.data.task == "classification":
            row["accuracy"] = totals[CORRECT] / n
        row["compute_sec"] = infos[0][DELTAS + L]
        if val is not None:
            v = val
            row["val_loss"] = v[LOSS] / v[COUNT] if v[COUNT] else None
            if self.job.data.task == "classification":
                row["val_accuracy"] = v[CORRECT] / v[COUNT] if v[COUNT] else None
        squares = np.zeros(L)
        for info, (a, b) in zip(infos, self.slices):
            for (l, _, _), sq in zip(_layer_bounds(spec, a, b), info[DELTAS + L + 1 :]):
                squares[l] += sq
        if len(infos[0]) > DELTAS + L + 1:
            for l in range(L):
                row[f"grad_norm_{l + 1}"] = float(np.sqrt(squares[l]))
                row[f"delta_mean_{l + 1}"] = float(totals[DELTAS + l] / (n * spec.layers[l + 1]))
        self.metrics.write(row)
        self.on_step(row)
        return row

    # -- failures ------------------------------------------------------------------------
    def _dead(self, actors):
        import ray

        dead = []
        for i, actor in enumerate(actors):
            try:
                ray.get(actor.ping.remote(), timeout=60)
            except _recoverable():
                dead.append(i)
            except ray.exceptions.GetTimeoutError:
                dead.append(i)
        return dead

    def _count_failure(self, what):
        self.replacements += 1
        limit = self.job.cluster.max_failures
        if self.replacements > limit:
            raise TrainingError(
                f"{what}: more than cluster.max_failures ({limit}) failures in this run; stopping",
                hint=f"checkpoints are kept in {self.ckpt_dir}; continue with --resume",
            )

    def _recover(self, err):
        """Replace lost workers (they re-read their shards) and, if a parameter actor was
        lost, restore all of them from the newest checkpoint. Returns the step to redo."""
        import ray

        first = getattr(err, "__class__", type(err)).__name__
        dead_servers = self._dead(self.servers)
        dead_workers = self._dead(self.workers)
        if not dead_servers and not dead_workers:
            raise err  # nothing was lost: a real error, not a failure to recover from
        for k in dead_workers:
            self._count_failure(f"worker {k} lost ({first})")
            self.log(f"worker {k} lost; starting a replacement ({self.replacements} of at most {self.job.cluster.max_failures})")
            worker = self._new_worker(self.plans[k])
            try:
                ray.get(worker.ping.remote(), timeout=self.job.cluster.wait_for_nodes_s)  # placed?
            except ray.exceptions.GetTimeoutError:
                _kill(worker)
                self._save_before_giving_up(dead_servers)
                raise TrainingError(
                    f"no capacity for a replacement of worker {k} within cluster.wait_for_nodes_s ({self.job.cluster.wait_for_nodes_s:g} s)",
                    hint=f"add nodes, or continue with fewer workers: distbp run JOB --resume --workers {len(self.workers) - 1}",
                ) from None
            _get(worker.load.remote())
            _get(worker.prepare.remote(*self.prepare_args[k]))
            self.workers[k] = worker
        steps = set(ray.get([s.applied_step.remote() for i, s in enumerate(self.servers) if i not in dead_servers]))
        if dead_servers or len(steps) > 1:
            self._count_failure(f"parameter actor lost ({first})")
            return self._restore_servers()
        (applied,) = steps
        self.log(f"recovered: redoing from step {applied + 1}")
        self._reopen_metrics(applied)
        return applied + 1

    def _save_before_giving_up(self, dead_servers):
        if not dead_servers:
            try:
                step = _get(self.servers[0].applied_step.remote())
                self._reopen_metrics(step)
                self._checkpoint(step, False)
            except Exception:  # keep the checkpoints already there
                pass

    def _restore_servers(self):
        for s in self.servers:
            _kill(s)
        ckpt = checkpoint.load_latest(self.ckpt_dir, warn=self.log)
        if ckpt is None:
            params, opt_state, step = nn.init_params(self.spec, np.random.default_rng(self.job.seed)), None, 0
        else:
            params, opt_state, step = ckpt.params, ckpt.opt_state, ckpt.step
            if ckpt.best is not None:
                self.best = (ckpt.best[0], int(ckpt.best[1]), ckpt.best_params, int(ckpt.best[2]))
        if ckpt is None:
            self.best = None
        self._start_servers(params, opt_state, step)
        self.log(f"parameter actors restored from step {step}; replaying from step {step + 1}")
        self._reopen_metrics(step)
        return step + 1

    def _reopen_metrics(self, keep_until_step):
        self.metrics.close()
        self.metrics = self._open_metrics(keep_until_step)


def _slice_state(opt_state, a, b, size):
    """The part of a flat optimizer state that belongs to slice [a, b); scalars whole."""
    if opt_state is None:
        return None
    return {k: v[a:b] if v.size == size else v for k, v in opt_state.items()}


def _join_state(states, size):
    """The inverse of _slice_state: slices concatenated, scalars (same on every actor) once."""
    names = states[0].keys()
    joined = {k: np.concatenate([s[k] for s in states]) for k in names}
    return {k: (v if v.size == size else states[0][k]) for k, v in joined.items()}


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
