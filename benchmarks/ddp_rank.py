"""One rank of PyTorch DDP (gloo ring all-reduce) on benchmarks/network.py's network, for the
peer beside distbp over the same rate-limited links. network.py starts one on each worker host:

    python benchmarks/ddp_rank.py --rank R --world K --master HOST:PORT --layers 256,1024,256,10
        --rows 512 --steps N [--ifname eth0]

Rank r trains rows [N r / K, N (r + 1) / K) of the same random rows (bench.workload_data), the
same ReLU network with He-scaled float32 weights, plain SGD, one thread. Rank 0 prints one JSON
line: the median seconds per step after the first WARMUP steps (a step is forward, backward with
DDP's bucketed all-reduce, and the optimizer step; the all-reduce makes every rank wait for the
slowest)."""

import argparse
import json
import os
import statistics
import time

WARMUP = 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0")
    ap.add_argument("--layers", default="256,1024,256,10")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ifname", default="eth0", help="the network interface gloo uses")
    args = ap.parse_args()
    os.environ["GLOO_SOCKET_IFNAME"] = args.ifname

    import torch
    import torch.distributed as dist

    from distbp import bench

    torch.set_num_threads(1)
    layers = [int(v) for v in args.layers.split(",")]
    x, labels = bench.workload_data(layers, args.rows)
    a, b = args.rows * args.rank // args.world, args.rows * (args.rank + 1) // args.world
    xs, ys = torch.from_numpy(x[a:b]).float(), torch.from_numpy(labels[a:b]).long()
    torch.manual_seed(0)
    modules = []
    for i, (n_in, n_out) in enumerate(zip(layers, layers[1:])):
        modules.append(torch.nn.Linear(n_in, n_out))
        if i < len(layers) - 2:
            modules.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*modules)
    host, port = args.master.rsplit(":", 1)
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=args.rank, world_size=args.world)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(WARMUP + args.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp(xs), ys).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    dist.barrier()
    dist.destroy_process_group()
    if args.rank == 0:
        print(json.dumps({"sec_per_step": statistics.median(times[WARMUP:]), "steps": args.steps, "world": args.world}))


if __name__ == "__main__":
    main()
