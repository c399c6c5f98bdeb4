"""The shard worker actor: owns rows [start, stop) of the data, reads them itself, and returns
gradient sums for the weights it is sent. A thin wrapper over data.py and nn.py; what it
returns is defined in messages.py."""

import os
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from distbp import faults
from distbp.backprop import nn
from distbp.data import checks, rowmath, sampling, tables
from distbp.errors import UsageError
from distbp.runtime import blas
from distbp.runtime.direct import DirectWorker
from distbp.runtime.messages import ShardSummary, Sums, stats_vector, step_returns


@dataclass(frozen=True)
class ShardPlan:
    """Everything a worker needs to load its shard; small and picklable."""

    rank: int
    source: object  # tables.TableSource
    start: int
    stop: int
    features: tuple
    labels: tuple
    task: str
    spec: nn.Spec
    chunk_rows: int
    threads: int
    seed: int
    on_nan: str = "error"
    validation_fraction: float | None = None
    validation_source: object = None  # a separate validation TableSource, sharded the same way
    validation_range: tuple = (0, 0)
    batch: int | None = None  # global mini-batch size; None = full batch
    env: tuple = ()  # ((key, value or None), ...): environment the worker sets for itself first
    blas_kernel: str = "auto"  # cluster.blas_kernel: the kernel this worker was started with, checked at load


class ShardWorker(DirectWorker):
    """Created with a ShardPlan; `load` reads and summarises the shard, `prepare` encodes it,
    then `step` runs forward and backward over it for each step: called once per step by the
    task engine, or from `serve`, which takes a window of steps over direct links."""

    def __init__(self, plan, param_slices):
        for key, value in plan.env:
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.plan = plan
        self.slices = param_slices  # [(start, stop)] of the S parameter actors
        self._limits = threadpool_limits(limits=max(1, int(plan.threads)), user_api="blas")
        self.raw = {}
        self.workspace = None
        self.gathered = None  # the slices put together, for a step or evaluation sent as tasks
        self.links = []  # one per parameter actor, for the direct engine

    def ping(self):
        return True

    def park(self):
        """Drop the run's links, rows and weights: the process waits, idle, for a later run of
        the same process on the Ray that distbp keeps for it (cluster.keep) to `renew` it."""
        if self.__dict__:
            self.disconnect()
            self.__dict__.clear()
        return True

    def renew(self, plan, param_slices):
        """Start over as a new run's worker, exactly as a new actor would."""
        self.park()
        faults.reset()
        self.__init__(plan, param_slices)
        return True

    def set_slices(self, slices):
        """Where the parameter actors' slices now lie (cut anew when their count changed)."""
        self.slices = [tuple(s) for s in slices]
        return True

    def peak_rss_mb(self):
        """This worker process's peak resident memory, in MB."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def where(self):
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def blas_report(self):
        """{'rank', 'node', 'library', 'version', 'kernel', 'threads'}: what this worker's bits
        depend on. Raises UsageError when the pinned cluster.blas_kernel does not run here."""
        import ray

        node = ray.util.get_node_ip_address()
        if self.plan.blas_kernel != blas.AUTO:
            problem = blas.pin_problem(self.plan.blas_kernel, f"node {node}")
            if problem:
                raise UsageError(f"cluster.blas_kernel: {problem}", hint="pin a kernel every node runs, or use auto")
        return {"rank": self.plan.rank, "node": node, **blas.describe()}

    def _read(self, source, start, stop):
        """(label columns, features (rows, n_0) in the model's dtype): the only copy kept."""
        table = source.read_rows(start, stop, columns=[*self.plan.features, *self.plan.labels])
        x = tables.features_to_numpy(table, list(self.plan.features), self.plan.spec.np_dtype)
        return table.select(list(self.plan.labels)), x

    def load(self, plan=None):
        """Read the shard (that of `plan` instead, when the rows are resharded: it replaces
        this worker's plan, rank included). Returns its ShardSummary: non-finite counts per
        feature, label values, feature moment sums over training rows, row counts, its BLAS."""
        if plan is not None:
            self.plan, self.sets, self.batch_x = plan, {}, None
        p = self.plan
        report = self.blas_report()  # before any product: a kernel the CPU lacks would kill the process
        table, x = self._read(p.source, p.start, p.stop)
        parts = {"train": (table, x)}
        if p.validation_fraction:
            is_val = rowmath.validation_mask(p.start, p.stop, p.validation_fraction, p.seed)
            parts = {"train": (table.filter(~is_val), x[~is_val]), "val": (table.filter(is_val), x[is_val])}
        elif p.validation_source is not None:
            parts["val"] = self._read(p.validation_source, *p.validation_range)
        counts, self.raw = checks.count_rows(parts, p.task, p.labels, p.on_nan, p.validation_source is not None)
        return ShardSummary(counts, report)

    def prepare(self, classes, mean, std, offset=0, n_train=0):
        """Standardise, cast to the model dtype and encode targets; drop the raw table.
        `offset` is the ordinal of this shard's first training row among all training rows
        (n_train of them), which is how mini-batches are split between workers."""
        p, dtype = self.plan, self.plan.spec.np_dtype
        self.offset, self.n_train = offset, n_train
        self.sets = {}
        for name, (tab, x) in self.raw.items():
            if mean is not None:  # in place: x is this worker's own copy
                x -= mean.astype(dtype)
                x /= std.astype(dtype)
            x = np.ascontiguousarray(x, dtype=dtype)
            if p.task == "classification":
                y = tables.encode_labels(tables.label_values(tab, p.labels[0]), classes)
            else:
                y = np.ascontiguousarray(tables.targets_to_numpy(tab, list(p.labels), dtype))
            self.sets[name] = (x, y)
        self.raw = {}
        rows = min(p.chunk_rows, max(len(self.sets["train"][0]), 1))
        self.workspace = nn.Workspace(p.spec, rows)
        counts = {name: len(x) for name, (x, _) in self.sets.items()}
        if p.task == "regression":  # for R^2: per target, the sum of y and of y^2 (float64)
            counts["targets"] = {name: (y.sum(axis=0, dtype=np.float64), np.square(y, dtype=np.float64).sum(axis=0)) for name, (_, y) in self.sets.items()}
        return counts

    def _params(self, weights):
        if len(weights) == 1:
            return weights[0]  # zero-copy, read-only view of the object-store buffer
        if self.gathered is None:
            self.gathered = np.empty(self.plan.spec.num_params, self.plan.spec.np_dtype)
        for (a, b), part in zip(self.slices, weights):
            self.gathered[a:b] = part
        return self.gathered

    def batch_rows(self, step):
        """Ordinals (among all training rows) of this worker's rows in step `step`."""
        if self.plan.batch is None:
            return np.arange(self.offset, self.offset + len(self.sets["train"][0]))
        return self._ordinals(step)

    def _ordinals(self, step):
        epoch, index = sampling.epoch_and_index(step, self.n_train, self.plan.batch)
        ordinals = sampling.batch_ordinals(self.plan.seed, epoch, index, self.plan.batch, self.n_train)
        return sampling.in_range(ordinals, self.offset, self.offset + len(self.sets["train"][0]))

    def _rows(self, name, step):
        """(x, y) of this worker's rows in step `step`: all of them for the full batch, else
        the rows of the step's global mini-batch that fall in this shard."""
        x, y = self.sets.get(name, (np.empty((0, self.plan.spec.layers[0])), np.empty(0, np.int64)))
        if name != "train" or self.plan.batch is None:
            return x, y
        rows = self._ordinals(step) - self.offset
        if getattr(self, "batch_x", None) is None:  # reused every step: no fresh pages to fault in
            self.batch_x = np.empty((self.plan.batch, x.shape[1]), x.dtype)
            self.batch_y = np.empty((self.plan.batch, *y.shape[1:]), y.dtype)
        n = len(rows)
        return np.take(x, rows, axis=0, out=self.batch_x[:n]), np.take(y, rows, axis=0, out=self.batch_y[:n])

    def step(self, order, *weights):
        """Gradient sums of this shard's rows of step `order.step` at `weights` (one array per
        parameter actor). Returns S gradient slices, one per parameter actor, then the Sums;
        on evaluate steps these include the validation rows' sums (forward pass only)."""
        out = self._step(order, self._params(weights))
        if order.evaluate and self.plan.rank == 1:
            faults.hit("worker_after_eval", order.step)  # (under the task engine: before it returns)
        return out

    def _step(self, order, params, out=None):
        spec = self.plan.spec
        x, y = self._rows("train", order.step)
        start = time.perf_counter()
        result = nn.grad_rows(spec, params, x, y, self.plan.chunk_rows, self.workspace, order.evaluate, out)
        train = stats_vector(result.loss_sum, result.count, result.correct, time.perf_counter() - start, result.delta_abs)
        val = None
        if order.evaluate and "val" in self.sets:
            xv, yv = self.sets["val"]
            loss_sum, correct = nn.evaluate(spec, params, xv, yv, self.plan.chunk_rows)
            val = stats_vector(loss_sum, len(xv), correct, 0.0, np.zeros(spec.num_layers))
        return step_returns([result.grad[a:b] for a, b in self.slices], Sums(train, val))

    def evaluate(self, *weights):
        """Sums over all this shard's training rows and its validation rows at `weights`,
        forward pass only: how the run's closing summary measures the weights it saved."""
        spec, params = self.plan.spec, self._params(weights)
        out = []
        for name in ("train", "val"):
            x, y = self.sets.get(name, (np.empty((0, spec.layers[0]), spec.np_dtype), None))
            loss_sum, correct = nn.evaluate(spec, params, x, y, self.plan.chunk_rows) if len(x) else (0.0, 0)
            out.append(stats_vector(loss_sum, len(x), correct, 0.0, np.zeros(spec.num_layers)))
        return Sums(*out)
