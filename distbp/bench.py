"""`distbp bench`: time per step against the matrix-product ceiling, one process and 1..K
Ray workers, measured side by side in one run (the JSON keys: docs/bench.md).

The ceiling of a step is the time of the products it really needs at the workload's shapes:
every layer's forward product and weight-gradient product, and the input-gradient product of
every layer but the first, timed here with numpy's BLAS. GFLOP/s use the nominal 6 * N * (number of weights), the
count the peer baselines use, so GFLOP/s ratios are inverse time ratios.
"""

import json
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
# TCP payload per byte a link's rate counts at MTU 1500: 1448 of a full frame's 1514 bytes
# (Ethernet header 14, IPv4 20, TCP 20 and 12 of timestamp option). Jumbo frames (MTU 9001):
# 8949 of 9015, 0.993. Measured over rate-limited links: docs/scaling.md.
PAYLOAD_SHARE = 1448 / 1514


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


def ms(seconds):
    """Milliseconds in plain digits, about 3 significant ones, never in scientific notation."""
    if seconds is None:
        return "-"
    v = seconds * 1e3
    return f"{v:.{0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2 if abs(v) >= 1 else 3}f}"


LEGEND = """\
ms/step: median time per step (min ms: the fastest); ceiling ms: the matrix products a step needs, timed
with as many BLAS threads as workers; x ceiling: ms/step / ceiling ms; compute ms: the slowest worker's
forward and backward; fixed ms: ms/step - compute ms (links, the sum, the optimizer); PSS MB: the run's
processes together; worker MB: the largest worker's resident memory. Every key: docs/bench.md."""


def flags(report):
    """`warning:` lines for figures the machine made untrustworthy: a ceiling that gets slower
    with more threads, a run faster than its ceiling, more speed-up than cores or workers, and
    more workers than cores. A busy machine gives these; rerun on an idle one."""
    out, cores = [], report["machine"]["cores"] or 1
    for name in dict.fromkeys(r["workload"] for r in report["results"]):
        rows = [r for r in report["results"] if r["workload"] == name]
        ceilings = {max(1, r["workers"]): r["ceiling_sec"] for r in rows}
        single = next((r for r in rows if r["workers"] == 0), None)
        for k in sorted(ceilings)[1:]:
            if ceilings[k] > 1.1 * ceilings[k - 1]:
                out.append(f"warning: {name}: the {k}-thread ceiling ({ms(ceilings[k])} ms) is slower than the {k - 1}-thread one "
                           f"({ms(ceilings[k - 1])} ms): other work shares the cores, so the x ceiling figures are not to be trusted")
        for r in rows:
            run = "1 process" if r["workers"] == 0 else f"{r['workers']} workers"
            if r["ceiling_ratio"] < 0.9:
                out.append(f"warning: {name}: {run} ran at {r['ceiling_ratio']:.2f}x its ceiling, faster than the products it needs: "
                           "the ceiling was timed while the machine was busy")
            if r["workers"] and single is not None:
                speedup = single["sec_per_step"] / r["sec_per_step"]
                if speedup > min(r["workers"], cores):
                    out.append(f"warning: {name}: {run} are {speedup:.2f}x as fast as 1 process on {cores} cores: more than "
                               "the cores allow (smaller shards fitting a cache can do it, a 1-process time slowed by other work more often)")
            if r["workers"] > cores:
                out.append(f"warning: {name}: {run} on {cores} cores: workers share cores, so their times say little about scaling")
    return out


def table(report):
    """The report as aligned text, one line per result, then one conclusion per workload and a
    legend of the columns."""
    head = ["workload", "run", "engine", "steps", "ms/step", "min ms", "ceiling ms", "x ceiling", "GFLOP/s",
            "compute ms", "fixed ms", "start-up s", "PSS MB", "worker MB"]
    lines = [head]
    num = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    for r in report["results"]:
        run = "1 process" if r["workers"] == 0 else f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        lines.append([
            r["workload"], run, r.get("engine", "-"), str(r["steps"]), ms(r["sec_per_step"]), ms(r["sec_per_step_min"]),
            ms(r["ceiling_sec"]), num(r["ceiling_ratio"], "{:.2f}"), num(r["gflops_nominal"], "{:.1f}"), ms(r["compute_sec"]),
            ms(r["comm_overhead_sec"]) if r["workers"] else "-", num(r["startup_sec"], "{:.1f}") if r["workers"] else "-",
            num(r["pss_mb_total"], "{:.0f}"), num(r["rss_mb_worker_max"], "{:.0f}"),
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    conclusions = [conclusion(report, name) for name in dict.fromkeys(r["workload"] for r in report["results"])]
    return "\n".join(text + conclusions + [LEGEND])


def conclusion(report, workload):
    """One line: the most workers against one process and against their ceiling."""
    rows = [r for r in report["results"] if r["workload"] == workload]
    single = next(r for r in rows if r["workers"] == 0)
    top = max(rows, key=lambda r: r["workers"])
    return (
        f"{workload}: {top['workers']} workers {single['sec_per_step'] / top['sec_per_step']:.2f}x as fast as 1 process, "
        f"{top['ceiling_ratio']:.2f}x the {top['workers']}-thread ceiling, fixed cost {top['comm_overhead_sec'] * 1e3:.2f} ms/step"
    )


def merge(reports):
    """One report of several workloads: results in one list, each workload's spec and
    scaling model under `workloads`, and `warnings` (see `flags`)."""
    merged = {"machine": reports[0]["machine"], "results": [r for rep in reports for r in rep["results"]], "workloads": {}}
    merged["warnings"] = flags(merged)
    for rep in reports:
        name = rep["results"][0]["workload"]
        merged["workloads"][name] = {k: v for k, v in rep.items() if k not in ("machine", "results")}
    return merged


def to_json(report):
    return json.dumps(report)


def scaling_model(report, bandwidth_gbit=10.0, workers=(1, 2, 4, 8, 16, 32, 64, 128, 256), servers=(1, 2, 4, 8)):
    """Predicted seconds per step on K workers (one per VM core) and S parameter actors, from
    three figures measured in `report`: the compute rate per core (single process), the fixed
    cost of a step (1 worker: time per step minus compute) and the bytes moved per step.

    T(K, S) = work / (K * rate) + fixed + 2 max(P b / B, K P b / (S B))
    A worker reads the new weights (P b bytes) and then sends its gradient (P b); each
    parameter actor's node serves K P b / S and then receives as much. B is the link's rate in
    TCP payload bytes/s (PAYLOAD_SHARE of its bit rate). The weights of a step go out before
    its gradients can come back, and the next step's weights need every gradient, so a
    full-duplex link never carries both halves of a step at once: the factor 2.
    A ring all-reduce instead moves 2 (K - 1) / K * P b per worker, sending and receiving at
    once. So do parameter shards on the workers' nodes (per_worker, S = K): each node sends its
    slice to the K - 1 others while it receives theirs, then each gradient slice goes back the
    same way, (K - 1) / K * P b each way in each half of the step."""
    single = next(r for r in report["results"] if r["workers"] == 0)
    one = next(r for r in report["results"] if r["workers"] == 1)
    work = single["gflops_nominal"] * single["sec_per_step"] * 1e9  # nominal FLOPs per step
    rate = single["gflops_nominal"] * 1e9  # FLOP/s of one core
    fixed = max(one["sec_per_step"] - one["compute_sec"], 0.0)
    spec = report["spec"]
    param_bytes = spec["num_params"] * spec["itemsize"]
    link = bandwidth_gbit * 1e9 / 8 * PAYLOAD_SHARE  # payload bytes/s
    rows = []
    for k in workers:
        compute = work / (k * rate)
        ring = 2 * (k - 1) / k * param_bytes / link
        row = {"workers": k, "compute_sec": compute, "ring_allreduce_sec": compute + fixed + ring, "per_worker_sec": compute + fixed + ring}
        for s in servers:
            worker, server = 2 * param_bytes / link, 2 * k * param_bytes / (s * link)
            row[f"ps{s}_sec"] = compute + fixed + max(worker, server)
            row[f"ps{s}_bound"] = "server" if server > max(compute, worker) else "compute"
        rows.append(row)
    figures = {"rate_gflops_per_core": rate / 1e9, "fixed_sec": fixed, "param_bytes": param_bytes, "bandwidth_gbit": bandwidth_gbit,
               "payload_share": PAYLOAD_SHARE}
    return {"figures": figures, "rows": rows}


def model_table(model):
    f = model["figures"]
    head = f"figures: {f['rate_gflops_per_core']:.1f} GFLOP/s per core, fixed {f['fixed_sec'] * 1e3:.2f} ms/step, {f['param_bytes'] / 1e6:.2f} MB of parameters, {f['bandwidth_gbit']:g} Gb/s links"
    servers = sorted({int(k[2:-4]) for k in model["rows"][0] if k.startswith("ps") and k.endswith("_sec")})
    lines = [head, "workers  compute  " + "  ".join(f"S={s:<3d}      " for s in servers) + "  per_worker  ring all-reduce"]
    for r in model["rows"]:
        cells = "  ".join(f"{r[f'ps{s}_sec']:8.4f} {r[f'ps{s}_bound'][0]}" for s in servers)
        lines.append(f"{r['workers']:7d}  {r['compute_sec']:7.4f}  {cells}  {r['per_worker_sec']:10.4f}  {r['ring_allreduce_sec']:8.4f}")
    lines.append("seconds per step; c = compute-bound, s = parameter-actor-bound")
    return "\n".join(lines)


def chart(reports, path):
    """A PNG of time per step against workers, one panel per workload, with the ceiling."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from distbp.errors import UsageError

        raise UsageError("matplotlib is not installed", hint="distbp needs it for plots: pip install 'matplotlib>=3.7,<4'") from None
    fig = Figure(figsize=(4.2 * len(reports), 3.6), layout="constrained")
    for ax, report in zip(fig.subplots(1, len(reports), squeeze=False)[0], reports):
        dist = [r for r in report["results"] if r["mode"] == "distributed"]
        single = next(r for r in report["results"] if r["mode"] == "single process")
        k = [r["workers"] for r in dist]
        ax.plot(k, [r["sec_per_step"] * 1e3 for r in dist], "o-", label="distbp, K workers x 1 thread")
        ax.plot(k, [r["ceiling_sec"] * 1e3 for r in dist], "k--", label="matmul ceiling, K threads")
        ax.axhline(single["sec_per_step"] * 1e3, color="tab:green", lw=1, label="distbp, one process")
        ax.set_title(f"{dist[0]['workload']} ({'-'.join(map(str, report['spec']['layers']))}, N={report['spec']['rows']})")
        ax.set_xlabel("workers")
        ax.set_ylabel("ms per step")
        ax.set_xticks(k)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path
