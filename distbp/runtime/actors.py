"""The run's Ray actors: one ShardWorker per shard and one ParameterServer per slice of the
flat parameter vector. Creating and placing them, loading the shards, starting the parameter
actors from fresh or saved weights, replacing a lost worker, changing the worker count
(an elastic run) with the rows resharded, snapshots for checkpoints."""

import time
from dataclasses import dataclass

import numpy as np

from distbp import faults
from distbp.backprop import nn
from distbp.data import rowmath, sampling
from distbp.data.checks import check_validation_rows, merge_summaries
from distbp.errors import TrainingError, UsageError
from distbp.runtime import blas, cluster
from distbp.runtime.calls import CONTROL, get, kill, ping, placed, remote_class
from distbp.runtime.messages import Snapshot, add_sums
from distbp.runtime.server import ParameterServer
from distbp.runtime.workers import ShardPlan, ShardWorker
from distbp.text import count

# Idle actors kept between the runs of one process on the Ray that distbp started and keeps for
# it (distbp.init, distbp.train, the estimators: cluster.keep), whatever kind of run made them:
# a later run with the same worker options renews them instead of starting new processes
# (about 1 s a run on 2 cores). {"job": the Ray job they belong to, "key": their options,
# "workers": [...], "servers": [...]}. A run takes them all at its start and kills the ones it
# cannot use, so no idle actor holds a CPU while a run places its own.
_IDLE = {"job": None, "key": None, "workers": [], "servers": []}
PARK_S = 5  # an actor that does not park within this is killed instead
START_S = 60  # what starting a worker process may take, before cluster.wait_for_nodes_s counts


def _ray_job():
    """This driver's job on this Ray start (job ids begin anew with each Ray; node ids do not)."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_job_id(), ctx.get_node_id()


def take_idle(key):
    """The idle (workers, servers) of this Ray job with worker options `key`; every other
    idle actor is killed. The pool is empty afterwards."""
    idle = dict(_IDLE)
    _IDLE.update(job=None, key=None, workers=[], servers=[])
    if idle["job"] != _ray_job():  # another Ray (or none kept): those handles are gone with it
        return [], []
    if idle["key"] != key:
        for actor in idle["workers"] + idle["servers"]:
            kill(actor)
        return [], []
    # One that died while it waited (killed, out of memory) is left out: the run starts a new one.
    alive = placed(idle["workers"] + idle["servers"], PARK_S, dead_ok=True)
    return [a for a in idle["workers"] if a in alive], [a for a in idle["servers"] if a in alive]


def end_idle():
    """End every idle actor this process keeps: their CPUs go back to the Ray they hold them in
    (before another driver, joining that Ray, places its own)."""
    take_idle(object())  # no key matches: every idle actor is killed


def park_idle(key, workers, servers):
    """Keep the actors that park within PARK_S for the next run; kill the rest."""
    import ray

    refs = [a.park.remote() for a in workers + servers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PARK_S)
    parked = []
    for actor, ref in zip(workers + servers, refs):
        try:
            if ref in ready and ray.get(ref):
                parked.append(actor)
                continue
        except ray.exceptions.RayError:  # it failed or was lost: not kept
            kill(actor)
            continue
        kill(actor)
    _IDLE.update(job=_ray_job(), key=key, workers=[a for a in workers if a in parked], servers=[a for a in servers if a in parked])


@dataclass
class Start:
    """Where the parameter actors start: weights, optimizer state, the last applied step and
    the best weights so far (early stopping)."""

    params: np.ndarray
    opt_state: dict | None = None
    step: int = 0
    best_params: np.ndarray | None = None


class Actors:
    """The workers and parameter actors of one run, and what the driver learned loading them."""

    def __init__(self, job, prep, phases=None, log=None, reuse=False):
        self.job, self.prep, self.spec = job, prep, prep.spec
        self.phases = phases if phases is not None else {}
        self.log = log or (lambda msg: None)
        self.blas = []  # by rank: what each worker's bits depend on (blas.describe, with rank and node)
        # cluster.parameter_servers: a count, per_worker (one beside each worker, S = K), or
        # auto (per_worker when the workers can span nodes, else 1)
        layout = job.cluster.parameter_servers
        if layout == "auto":
            layout = "per_worker" if cluster.spans_nodes(job.cluster.cpus_per_worker) else 1
        self.per_worker = layout == "per_worker"
        self._cut(job.cluster.workers if self.per_worker else layout)
        self.plans = self._plans(job.cluster.workers)
        self.workers, self.servers = [], []
        self.reshard_due = False  # the worker count changed and not every worker holds its new rows yet
        # Idle actors of an earlier run are reused on one node, with the parameter actors on the
        # driver's node (on several nodes, placement decides where a run's actors go).
        self.reuse = reuse and not self.per_worker and not job.cluster.parameter_resources
        self.idle_workers, self.idle_servers = [], []

    def _cut(self, S):
        """Cut the flat vector into S slices, one per parameter actor."""
        if S > self.spec.num_params:
            raise UsageError(f"cluster.parameter_servers: {S} parameter actors for {count(self.spec.num_params, 'parameter')}",
                             hint="at most one per parameter; use fewer")
        self.slices = nn.param_slices(self.spec.num_params, S)
        self.bounds = [nn.slice_layers(self.spec, a, b) for a, b in self.slices]

    def _plans(self, K):
        """One ShardPlan per worker rank when the rows are split over K workers."""
        job, prep = self.job, self.prep
        ranges = rowmath.shard_ranges(prep.source.num_rows, K)
        val_ranges = [(0, 0)] * K
        if prep.validation_source is not None:
            n = prep.validation_source.num_rows
            val_ranges = [(n * k // K, n * (k + 1) // K) for k in range(K)]
        fraction = job.data.validation if isinstance(job.data.validation, float) else None
        batch = None if job.train.batch == "full" else int(job.train.batch)
        return [
            ShardPlan(
                rank, prep.source, a, b, tuple(prep.features), tuple(prep.labels), job.data.task, self.spec,
                job.cluster.chunk_rows, max(1, int(job.cluster.cpus_per_worker)), job.seed, job.data.on_nan,
                fraction, prep.validation_source, val_ranges[rank], batch, cluster.worker_env(),
                job.cluster.blas_kernel,
            )
            for rank, (a, b) in enumerate(ranges)
        ]

    # -- start ---------------------------------------------------------------------------
    def _reuse_key(self):
        c = self.job.cluster
        return (c.cpus_per_worker, c.blas_kernel)

    def _new_worker(self, plan):
        if self.idle_workers:
            worker = self.idle_workers.pop()
            worker.renew.remote(plan, self.slices)  # before any call of the run (one queue)
            return worker
        options = dict(num_cpus=self.job.cluster.cpus_per_worker, scheduling_strategy="SPREAD")
        pin = blas.runtime_env(self.job.cluster.blas_kernel)  # set before the process loads numpy
        if pin:
            options["runtime_env"] = pin
        return remote_class(ShardWorker).options(**options).remote(plan, self.slices)

    def _wait_placed(self, workers):
        """Wait for the workers to start. On a cluster whose CPUs other work holds they stay
        pending: after START_S + cluster.wait_for_nodes_s the run stops in one line instead of
        waiting forever (their CPUs are there, since check_capacity passed, but not free)."""
        import ray

        c = self.job.cluster
        refs = [ping(a) for a in workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=START_S + c.wait_for_nodes_s)
        if len(ready) < len(refs):
            total, free = ray.cluster_resources().get("CPU", 0), ray.available_resources().get("CPU", 0)
            other = max(total - free - len(ready) * c.cpus_per_worker, 0)
            for actor in workers:
                kill(actor)
            raise TrainingError(
                f"{len(refs) - len(ready)} of {count(len(refs), 'worker')} could not start within {START_S + c.wait_for_nodes_s:g} s: "
                f"each needs {count(c.cpus_per_worker, 'CPU')}, and other work holds {other:g} of the cluster's {total:g} CPUs",
                hint="wait for that work to finish, lower cluster.workers, or raise cluster.wait_for_nodes_s",
            )
        get(refs)  # an actor that died starting raises its own error

    def start(self, start):
        """Create every actor, read and check the shards, then start the parameter actors
        at `start` (the seeded init, or a checkpoint). Touches no disk."""
        job = self.job
        t = time.perf_counter()
        if _IDLE["workers"] or _IDLE["servers"]:  # none of them holds a CPU while this run places its own
            self.idle_workers, self.idle_servers = take_idle(self._reuse_key() if self.reuse else None)
        self.workers = [self._new_worker(plan) for plan in self.plans]
        if not self.per_worker:
            self.start_servers(start)  # they start while the workers start and read
        self._wait_placed(self.workers)
        if self.per_worker:  # each beside its worker: the workers' nodes are known now
            self.start_servers(start)
        get([ping(a) for a in self.servers])
        for actor in self.idle_workers + self.idle_servers:  # more than this run needs
            kill(actor)
        self.idle_workers, self.idle_servers = [], []
        self.phases["actor_start"] = time.perf_counter() - t
        t = time.perf_counter()
        summaries = get([w.load.remote() for w in self.workers])
        self.blas = [s.blas for s in summaries]
        self.classes, mean, std, self.n_train = merge_summaries(job, self.prep, [s.counts for s in summaries])
        self.mean, self.std = mean, std
        dropped = sum(s.counts.dropped for s in summaries)
        if dropped:
            self.log(f"data.on_nan: drop: skipped {count(dropped, 'row')} holding NaN or inf values; {count(self.n_train, 'training row')} left")
        rows = self._prepare(summaries)
        self.phases["data_read"] = time.perf_counter() - t
        self.has_val = any(r.get("val", 0) for r in rows)
        self.sst = total_sum_of_squares(rows) if job.data.task == "regression" else {}
        check_validation_rows(job, self.has_val)
        batch = self.n_train if job.train.batch == "full" else int(job.train.batch)
        self.steps_per_epoch = None if job.train.steps else sampling.steps_per_epoch(self.n_train, batch)
        self.total_steps = job.train.steps or job.train.epochs * self.steps_per_epoch

    def _prepare(self, summaries):
        """Encode every worker's loaded shard; each learns where its training rows start among
        all of them (their ordinals pick the rows of a mini-batch). Returns the row counts."""
        offsets = np.cumsum([0] + [s.counts.rows["train"] for s in summaries])
        self.prepare_args = [(self.classes, self.mean, self.std, int(offsets[k]), self.n_train) for k in range(len(self.workers))]
        return get([w.prepare.remote(*args) for w, args in zip(self.workers, self.prepare_args)])

    def start_servers(self, start):
        """Parameter actors holding `start`, one per slice: with per_worker, slice k beside
        worker k on its node (cut anew for the workers there are now, and the workers told);
        else on the driver's node unless cluster.parameter_resources places them."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if start.params.shape != (self.spec.num_params,):
            raise UsageError(f"the checkpoint holds {count(start.params.size, 'parameter')}, the model needs {self.spec.num_params}")
        opt = self.job.train.optimizer
        kwargs = dict(name=opt.name, momentum=opt.momentum, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay)
        if self.per_worker:
            if len(self.slices) != len(self.workers):
                self._cut(len(self.workers))
                get([w.set_slices.remote(self.slices) for w in self.workers])
            nodes = [w["node_id"] for w in get([w.where.remote() for w in self.workers])]
            placements = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)} for node in nodes]
        elif self.job.cluster.parameter_resources:
            placements = [{"resources": dict(self.job.cluster.parameter_resources)}] * len(self.slices)
        else:  # the driver's node, which a run cannot outlive anyway
            placements = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}] * len(self.slices)
        cls = remote_class(ParameterServer)
        size = start.params.size

        def new_server(placement, *args):
            if self.idle_servers:
                server = self.idle_servers.pop()
                server.renew.remote(*args)
                return server
            return cls.options(num_cpus=0, **placement).remote(*args)

        self.servers = [
            new_server(
                placement, start.params[a:b], kwargs, slice_state(start.opt_state, a, b, size), bounds, start.step,
                None if start.best_params is None else start.best_params[a:b], self.spec.num_layers,
            )
            for (a, b), bounds, placement in zip(self.slices, self.bounds, placements)
        ]

    def reslice(self):
        """per_worker, after the worker count changed with every step recorded: the parameter
        actors' state moves to one actor beside each worker now there, cut anew. No-op otherwise."""
        if not self.per_worker or len(self.servers) == len(self.workers):
            return False
        step = self.applied_steps()[0]
        snap = self.snapshot()
        self.kill_servers()
        self.start_servers(Start(snap.params, snap.opt_state, step, snap.best_params))
        get([ping(s) for s in self.servers])
        return True

    # -- during the run --------------------------------------------------------------------
    def applied_steps(self, servers=None):
        return get([s.applied_step.options(concurrency_group=CONTROL).remote() for s in (servers or self.servers)])

    def infos_after(self, step):
        """Per step applied after `step`, the StepInfos of every parameter actor."""
        per_server = get([s.infos_after.options(concurrency_group=CONTROL).remote(step) for s in self.servers])
        return [list(infos) for infos in zip(*per_server)]

    def promote(self, step):
        """Early stopping: the parameter actors keep `step`'s input weights as the best."""
        get([s.promote.remote(step) for s in self.servers])

    def snapshot(self):
        """The Snapshot of the whole vector, joined from the parameter actors' slices."""
        if faults.armed("snapshot"):
            kill(self.servers[0])
        snaps = get([s.snapshot.remote() for s in self.servers])
        params = np.concatenate([s.params for s in snaps])
        best = None if any(s.best_params is None for s in snaps) else np.concatenate([s.best_params for s in snaps])
        return Snapshot(params, join_state([s.opt_state for s in snaps], params.size), best)

    def evaluate(self, params):
        """(train, val) stats vectors of `params` over every training and validation row,
        forward only; the weights go out once, as one object-store reference."""
        import ray

        ref = ray.put(np.asarray(params, self.spec.np_dtype))
        train, val, _ = add_sums(get([w.evaluate.remote(ref) for w in self.workers]))
        return train, val

    def replace_worker(self, k, wait_s):
        """Kill worker k (lost or not) and start a replacement that reads its shard again.
        False when no node had a free CPU for it within `wait_s` seconds."""
        kill(self.workers[k])
        worker = self._new_worker(self.plans[k])
        if not placed([worker], wait_s):
            return False
        if not self.reshard_due:  # else `reshard` gives it its rows with everyone else's
            self._note_blas([get(worker.load.remote()).blas])
            get(worker.prepare.remote(*self.prepare_args[k]))
        self.workers[k] = worker
        return True

    # -- elastic runs: the worker count changes between steps ------------------------------
    def drop_workers(self, ranks):
        """Go on without the workers of `ranks` (lost, and no capacity for replacements): the
        rest keep their order and the rows are resharded over them."""
        for k in ranks:
            kill(self.workers[k])
        self.workers = [w for k, w in enumerate(self.workers) if k not in ranks]
        self.plans = self._plans(len(self.workers))
        self.reshard()

    def add_workers(self, count, wait_s):
        """Start up to `count` more workers, keep those placed within `wait_s` seconds, and
        reshard the rows over every worker. Returns how many joined."""
        K = len(self.workers)
        new = [self._new_worker(plan) for plan in self._plans(K + count)[K:]]
        joined = placed(new, wait_s)
        if joined:
            self.workers += joined
            self.plans = self._plans(len(self.workers))
            self.reshard()
        return len(joined)

    def reshard(self):
        """Each worker reads the rows of its plan (self.plans, by rank) in place of its old
        ones. Classes and standardisation stay those the run started with, so every row keeps
        its values and only the split between workers changes."""
        self.reshard_due = True
        summaries = get([w.load.remote(plan) for w, plan in zip(self.workers, self.plans)])
        self._note_blas([s.blas for s in summaries])
        n_train = sum(s.counts.rows["train"] for s in summaries)
        if n_train != self.n_train:
            raise TrainingError(
                f"resharding over {count(len(self.workers), 'worker')} read {count(n_train, 'training row')}, the run has {self.n_train}",
                hint="the data changed under the run, or this is a bug; continue with --resume",
            )
        self._prepare(summaries)
        self.reshard_due = False

    def _note_blas(self, reports):
        """Take the BLAS reports of workers loaded after the start (replacements, a reshard);
        warn when the workers now differ where they did not before."""
        before = blas.differences(self.blas)
        by_rank = {r["rank"]: r for r in self.blas if r["rank"] < len(self.workers)}
        by_rank.update({r["rank"]: r for r in reports})
        self.blas = [by_rank[k] for k in sorted(by_rank)]
        now = blas.differences(self.blas)
        if now and now != before:
            self.log(f"warning: {now}")

    def kill_servers(self):
        for s in self.servers:
            kill(s)
        self.servers = []

    def close(self):
        """Kill every actor, or with `reuse`, keep the ones that park for the next run."""
        if self.reuse:
            park_idle(self._reuse_key(), self.workers, self.servers)
        else:
            for actor in self.workers + self.servers:
                kill(actor)
        self.workers, self.servers = [], []


def total_sum_of_squares(prepared):
    """{'train': SST, 'val': SST}: the sum over targets of sum((y - mean y)^2), from the
    workers' per-target sums of y and y^2 (what R^2 divides by)."""
    sst = {}
    for name in ("train", "val"):
        parts = [r["targets"][name] for r in prepared if name in r.get("targets", {})]
        n = sum(r.get(name, 0) for r in prepared)
        if parts and n:
            s, s2 = np.sum([p[0] for p in parts], axis=0), np.sum([p[1] for p in parts], axis=0)
            sst[name] = float(np.sum(s2 - s * s / n))
    return sst


def slice_state(opt_state, a, b, size):
    """The part of a flat optimizer state that belongs to slice [a, b); scalars whole."""
    if opt_state is None:
        return None
    return {k: v[a:b] if v.size == size else v for k, v in opt_state.items()}


def join_state(states, size):
    """The inverse of slice_state: slices concatenated, scalars (same on every actor) once."""
    names = states[0].keys()
    joined = {k: np.concatenate([s[k] for s in states]) for k in names}
    return {k: (v if v.size == size else states[0][k]) for k, v in joined.items()}
