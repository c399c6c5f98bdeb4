"""Peer baselines for `distbp bench`: PyTorch eager, PyTorch DDP and Ray Train's TorchTrainer
on distbp's own workloads, with the same rows and the same initial weights (both taken from
distbp.bench), plain SGD, one BLAS thread per process. Prints one JSON line per run.

    python benchmarks/peers.py WORKLOAD SYSTEM [--workers K] [--threads T] [--steps N]

WORKLOAD is a `distbp bench --workload` name (teacher, tiny, wide, batch512); SYSTEM is torch,
ddp or ray-train. Needs the `peers` extra: pip install -e '.[peers]'. benchmarks/compare.sh
runs these beside `distbp bench` in one sitting and prints the table of the README.
"""

import argparse
import json
import os
import statistics
import sys
import time

LAUNCH = time.time()  # start-up is measured from here to the first step, on the wall clock
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray Train on loopback only
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # DDP's gloo too

import numpy as np  # noqa: E402

from distbp import bench
from distbp.backprop import nn  # noqa: E402

LR = 1e-3  # as distbp bench's jobs
WARMUP = 3


def build(name, rank=0, workers=1):
    """(model, loss, x, y) of rank's contiguous shard, like distbp's shard_ranges."""
    import torch

    w = bench.WORKLOADS[name]
    dtype = torch.float64 if w["dtype"] == "float64" else torch.float32
    spec = bench.workload_spec(name)
    x, labels = bench.workload_data(w["layers"], w["rows"])
    a, b = w["rows"] * rank // workers, w["rows"] * (rank + 1) // workers
    layers = []
    for l, (W, bias) in enumerate(nn.views(spec, bench.workload_params(name))):
        lin = torch.nn.Linear(*W.shape).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(bias))
        layers += [lin] + ([torch.nn.ReLU()] if l < spec.num_layers - 1 else [])
    model = torch.nn.Sequential(*layers)
    xs = torch.from_numpy(x[a:b]).to(dtype)
    if w["output"] == "sigmoid":
        return model, torch.nn.BCEWithLogitsLoss(), xs, torch.from_numpy(labels[a:b]).to(dtype).reshape(-1, 1)
    return model, torch.nn.CrossEntropyLoss(), xs, torch.from_numpy(labels[a:b])


def timed_steps(model, loss_fn, x, y, steps, sync=lambda: None):
    """Per-step seconds of WARMUP + `steps` SGD steps (summary leaves the WARMUP ones out of
    the per-step figures)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    times = []
    for i in range(WARMUP + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def summary(times, startup):
    """`train_sec`: every step, warm-up included (what a whole run's training takes)."""
    timed = times[WARMUP:]
    return {"sec_per_step": statistics.median(timed), "sec_per_step_min": min(timed), "steps": len(timed), "startup_sec": startup, "train_sec": sum(times)}


def run_torch(name, threads, steps):
    import torch

    torch.set_num_threads(threads)
    model, loss_fn, x, y = build(name)
    first = time.time() - LAUNCH
    return summary(timed_steps(model, loss_fn, x, y, steps), first)


def _ddp_rank(rank, workers, name, steps, port, queue, launch):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    model, loss_fn, x, y = build(name, rank, workers)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    dist.barrier()
    first = time.time() - launch
    times = timed_steps(ddp, loss_fn, x, y, steps)
    if rank == 0:
        queue.put(summary(times, first))
    dist.destroy_process_group()


def run_ddp(name, workers, steps):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, workers, name, steps, port, queue, LAUNCH)) for r in range(workers)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return result


def run_ray_train(name, workers, steps):
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import torch
        from ray import train
        from ray.train.torch import prepare_model

        torch.set_num_threads(1)
        ctx = train.get_context()
        model, loss_fn, x, y = build(config["name"], ctx.get_world_rank(), ctx.get_world_size())
        model = prepare_model(model, move_to_device=False)
        first = time.time()
        times = timed_steps(model, loss_fn, x, y, config["steps"])
        if ctx.get_world_rank() == 0:  # rank 0's figures, as for DDP
            with open(config["out"], "w") as f:
                json.dump({**summary(times, 0.0), "first_step_at": first}, f)

    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="peers-"), "rank0.json")
    trainer = TorchTrainer(
        loop, train_loop_config={"name": name, "steps": steps, "out": out},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
    )
    trainer.fit()
    ray.shutdown()
    with open(out) as f:
        metrics = json.load(f)
    return {k: metrics[k] for k in ("sec_per_step", "sec_per_step_min", "steps")} | {"startup_sec": metrics["first_step_at"] - LAUNCH}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=sorted(bench.WORKLOADS))
    ap.add_argument("system", choices=["torch", "ddp", "ray-train"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch: intra-op threads of the one process")
    ap.add_argument("--steps", type=int, help="timed steps; default: as distbp bench picks them for the workload")
    args = ap.parse_args()
    w = bench.WORKLOADS[args.workload]
    spec = bench.workload_spec(args.workload)
    k = 1 if args.system == "torch" else args.workers
    steps = bench.steps_for(spec, w["rows"], k, args.steps)
    if args.system == "torch":
        result = run_torch(args.workload, args.threads, steps)
    elif args.system == "ddp":
        result = run_ddp(args.workload, args.workers, steps)
    else:
        result = run_ray_train(args.workload, args.workers, steps)
    import torch

    label = f"{args.threads} thread(s)" if args.system == "torch" else f"{args.workers}x1"
    print(json.dumps({"workload": args.workload, "system": args.system, "layout": label, "torch": torch.__version__, **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
