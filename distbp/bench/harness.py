"""`distbp bench`'s harness: the workloads, and timing the ceiling (the matrix products a step
needs, at the workload's own shapes, with numpy's BLAS and 1..K threads), distbp's gradient in
one process, and 1..K Ray workers, side by side in one run."""

import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from distbp.backprop import nn

WORKLOADS = {
    "teacher": dict(layers=(784, 256, 128, 10), rows=60_000, dtype="float32", activation="relu", output="softmax", loss="cross_entropy"),
    "tiny": dict(layers=(2, 16, 16, 1), rows=256, dtype="float64", activation="relu", output="sigmoid", loss="binary_cross_entropy"),
    "wide": dict(layers=(2048, 2048, 2048, 10), rows=8_192, dtype="float32", activation="relu", output="softmax", loss="cross_entropy"),
    # one mini-batch-sized step: the teacher network on the first 512 rows of its data
    "batch512": dict(layers=(784, 256, 128, 10), rows=512, dtype="float32", activation="relu", output="softmax", loss="cross_entropy"),
}

PHASES = ("imports", "ray_start", "actor_start", "data_read", "first_step", "plot", "shutdown")

MIN_SECONDS = 3.0  # each distributed point runs at least this long (or MAX_STEPS steps)

MAX_STEPS = 2000

FIXED_GUESS_S = 0.003  # a step's fixed cost, for choosing a step count before measuring


def workload_spec(name):
    """The network spec of a workload (He init)."""
    return _spec(WORKLOADS[name])


def _spec(w):
    return nn.Spec(w["layers"], w["activation"], w["output"], w["loss"], "he", w["dtype"])


def ceiling_sec(spec, rows, threads, repeats=5):
    """Median time of the step's matrix products at its own shapes (all `rows` at once), with
    `threads` BLAS threads."""
    dt, widths = spec.np_dtype, spec.layers
    m = rows
    rng = np.random.default_rng(0)
    acts = [rng.standard_normal((m, n)).astype(dt) for n in widths]  # a_0..a_L
    deltas = [rng.standard_normal((m, n)).astype(dt) for n in widths]
    weights = [rng.standard_normal((a, b)).astype(dt) for a, b in zip(widths, widths[1:])]
    outs = [np.empty((m, n), dt) for n in widths]
    grads = [np.empty_like(W) for W in weights]

    def products():
        for l, W in enumerate(weights):
            np.matmul(acts[l], W, out=outs[l + 1])  # forward
            np.matmul(acts[l].T, deltas[l + 1], out=grads[l])  # weight gradient
            if l > 0:
                np.matmul(deltas[l + 1], W.T, out=outs[l])  # input gradient

    with threadpool_limits(threads, user_api="blas"):
        products()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            products()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def single_process(spec, rows, chunk_rows, steps, warmup=2):
    """Times of distbp's gradient function over all rows in this process, 1 BLAS thread."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, spec.layers[0])).astype(spec.np_dtype)
    y = rng.integers(0, max(spec.layers[-1], 2), rows)
    params = nn.init_params(spec, rng)
    ws = nn.Workspace(spec, min(chunk_rows, rows))
    times = []
    with threadpool_limits(1, user_api="blas"):
        for i in range(warmup + steps):
            t = time.perf_counter()
            nn.grad_rows(spec, params, x, y, chunk_rows, ws)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return times


def workload_data(layers, rows, seed=0):
    """(x (rows, n_0) float32, labels (rows,) int64): the random rows of a workload (speed does
    not depend on them). The peer baselines in benchmarks/ train on exactly these."""
    x = np.random.default_rng(seed).standard_normal((rows, layers[0]), dtype=np.float32)
    labels = np.random.default_rng(seed + 1).integers(0, max(layers[-1], 2), rows)  # own stream: a prefix of rows is a prefix of labels
    return x, labels


def workload_params(name, seed=0):
    """The flat initial weights every system starts a workload from (He init, zero biases)."""
    return nn.init_params(workload_spec(name), np.random.default_rng(seed))


def _write_random_table(path, layers, rows, seed):
    """The workload's rows as Parquet, written by a child process so the driver's own memory
    stays that of a driver."""
    import pyarrow as pa

    from distbp.data import tables

    x, labels = workload_data(layers, rows, seed)
    columns = {f"x{i}": x[:, i] for i in range(layers[0])}
    columns["label"] = labels
    tables.write_table(pa.table(columns), path, row_group_size=8192)


def _pss_mb(pid):
    """PSS of a process and all its descendants, in MB: shared pages count once overall."""
    import psutil

    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def steps_for(spec, rows, workers, steps=None, min_seconds=MIN_SECONDS):
    """Timed steps for one point: `steps` if given, else enough for `min_seconds` of steps
    (10 to MAX_STEPS), guessed from the ceiling on a 512-row sample plus a fixed cost, so that
    millisecond-scale steps are sampled by time rather than by a handful of steps."""
    if steps:
        return steps
    sample = min(rows, 512)
    return step_count(ceiling_sec(spec, sample, 1, repeats=3) * rows / sample / workers + FIXED_GUESS_S, min_seconds)


def step_count(sec_per_step, min_seconds=MIN_SECONDS):
    """Steps that last `min_seconds` at `sec_per_step`, 10 to MAX_STEPS."""
    return int(min(MAX_STEPS, max(10, np.ceil(min_seconds / sec_per_step))))


def distributed(job_dict, workers, steps, warmup, workdir, engine=None):
    """One embedded-Ray run of `job_dict` with `workers` workers; per-step times, memory,
    the step engine that ran and the start-up and finish phases."""
    from distbp.api import load
    from distbp.trainer import Trainer

    loaded = sys.modules.get("ray")  # not imported before the run picks Ray's mode
    ray_was_up = loaded is not None and loaded.is_initialized()
    sets = [f"cluster.workers={workers}", f"train.steps={warmup + steps}", f"output.dir={workdir}/run-{workers}"]
    job = load(job_dict, sets + ([f"cluster.engine={engine}"] if engine else []))
    stamps, compute, memory = [], [], {}

    def on_step(row):
        stamps.append(row["seconds"])  # when the step was applied: rows may reach the driver in batches
        memory.setdefault("first_row_at", time.time())
        compute.append(row["compute_sec"])
        if row["step"] == warmup + steps:
            import ray

            memory["pss_mb_total"] = _pss_mb(os.getpid()) if not ray_was_up else None
            memory["rss_mb_worker_max"] = max(ray.get([w.peak_rss_mb.remote() for w in trainer.workers]))

    trainer = Trainer(job, force=True, on_step=on_step)
    start = time.time()
    result = trainer.run()
    per_step = np.diff(stamps)[warmup:]
    return {
        "engine": result.engine,
        "phases": {k: round(result.phases.get(k, 0.0), 4) for k in PHASES},
        "sec_per_step": float(np.median(per_step)),
        "sec_per_step_min": float(per_step.min()),
        "compute_sec": float(np.median(compute[warmup + 1 :])),
        "startup_sec": memory.pop("first_row_at") - start,
        **memory,
    }


def machine():
    import pyarrow
    import ray

    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} for i in threadpool_info() if i.get("user_api") == "blas"]
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cores": os.cpu_count(), "cpu": cpu, "blas": blas, "python": platform.python_version(),
        "numpy": np.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
    }


def run(workload="teacher", job_path=None, max_workers=2, steps=None, warmup=3, parameter_servers=1, log=lambda m: None, engine=None):
    """The whole report: {"machine": ..., "results": [...]} with the keys of docs/bench.md.
    `engine`: the step engine (cluster.engine) of every distributed point; None: the job's."""
    from distbp.api import load, spec_of
    from distbp.data.job import job_to_dict

    with tempfile.TemporaryDirectory(prefix="distbp-bench-") as workdir:
        if job_path:
            job = load(job_path)
            spec, name = spec_of(job), job.name
            from distbp.data import tables
            from distbp.data.checks import ensure_data

            ensure_data(job, log)
            rows = tables.open_source(job.data_path(), job.data.format).num_rows
            job_dict = job_to_dict(job, resolve_paths=True)
        else:
            w, name = WORKLOADS[workload], workload
            spec, rows = _spec(w), w["rows"]
            path = os.path.join(workdir, "data.parquet")
            child = multiprocessing.get_context("spawn").Process(target=_write_random_table, args=(path, w["layers"], rows, 0))
            child.start()
            child.join()
            job_dict = {
                "name": name, "seed": 0,
                "data": {"path": path, "label": "label", "standardize": False},
                "model": {"layers": list(w["layers"]), "activation": w["activation"], "output": w["output"], "loss": w["loss"], "init": "he", "dtype": w["dtype"]},
                "train": {"optimizer": {"name": "sgd", "lr": 1e-3}, "eval_every": 10**6, "checkpoint_every": 10**6},
                "cluster": {"parameter_servers": parameter_servers, "cpus_per_worker": 1},
            }
        chunk_rows = job_dict["cluster"].get("chunk_rows", 8192)
        nominal = 6 * rows * sum(a * b for a, b in zip(spec.layers, spec.layers[1:]))  # weights, as the peers count
        results = []
        for k in range(1, max_workers + 1):
            n = steps_for(spec, rows, k, steps)
            log(f"{name}: {k} worker(s), {n} steps")
            d = distributed(job_dict, k, n, warmup, workdir, engine)
            results.append({"workload": name, "workers": k, "threads_per_worker": 1, "steps": n, **d})
        driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the in-process parts
        log(f"{name}: ceiling and single process")
        ceilings = {k: ceiling_sec(spec, rows, k) for k in range(1, max_workers + 1)}
        single_steps = steps or max(10, min(MAX_STEPS, int(MIN_SECONDS / ceilings[1])))
        single = single_process(spec, rows, chunk_rows, single_steps)
        for r in results:
            r["rss_mb_driver"] = driver_rss
        results.insert(0, {
            "workload": name, "workers": 0, "threads_per_worker": 1, "steps": single_steps, "mode": "single process",
            "sec_per_step": statistics.median(single), "sec_per_step_min": min(single),
            "compute_sec": statistics.median(single), "startup_sec": 0.0,
            "pss_mb_total": None, "rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_mb_worker_max": None,
        })
        for r in results:
            r["ceiling_sec"] = ceilings[max(1, r["workers"])]
            r["ceiling_ratio"] = r["sec_per_step"] / r["ceiling_sec"]
            r["gflops_nominal"] = nominal / r["sec_per_step"] / 1e9
            r["comm_overhead_sec"] = r["sec_per_step"] - r["compute_sec"]
            r.setdefault("mode", "distributed")
    spec_info = {"layers": list(spec.layers), "num_params": spec.num_params, "itemsize": spec.np_dtype.itemsize, "rows": rows}
    return {"machine": machine(), "spec": spec_info, "results": results}
