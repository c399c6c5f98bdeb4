"""The scaling model's network term against steps measured over rate-limited links.

Makes hosts on this machine (network namespaces on a private bridge, tests/hosts.py), starts
a Ray cluster on them, limits every host's link to a rate with a token bucket, runs one distbp
job for each (rate, K workers, S parameter actors) and prints the measured time per step
beside what `distbp bench --model` predicts for the same K, S, P and B, and the megabytes
the busiest host sent and received per step (its interface's counters: TCP/IP headers,
acknowledgements and Ray's own messages included). Needs root on Linux.

    sudo .venv/bin/python benchmarks/network.py [--rates 100mbit,1gbit] [--workers 2,3]
        [--servers 1,2,per_worker] [--peers ddp] [--repeats 3] [--layers 256,1024,256,10]
        [--rows 512] [--tcp-congestion auto|system] [--json FILE]

Hosts: h1 the Ray head and the driver (0 CPUs, a `ps` resource), h2 a second parameter
host (0 CPUs, `ps`), h3.. one shard worker each (1 CPU). S = 1 puts the parameter actor on
the driver's node; S = 2 places them with cluster.parameter_resources {ps: 1}, one per
parameter host, so that every byte of a step crosses a link; per_worker puts slice k's
parameter actor on worker k's host (S = K, what `auto` picks across nodes). `--peers ddp`
adds PyTorch DDP (gloo's ring all-reduce, benchmarks/ddp_rank.py) with one rank on each
worker host, on the same rows, network and links, in the same sitting (needs torch:
pip install -e '.[peers]'). The compute rate and fixed cost the model needs are measured
first on h1 alone (`distbp bench JOB --max-workers 1`, embedded Ray, no network), before
the cluster starts. Everything made (Ray, the namespaces, the bridge, the data folder) is
removed at the end, also after an error or Ctrl-C. Traffic goes only to the hosts' addresses
on the private bridge and to loopback.

To run it on your own network instead, start Ray the same way on your machines, shape or
measure their links, and run the job this script writes with `distbp run --address`.
"""

import argparse
import csv
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import hosts as hostlib  # noqa: E402

from distbp import bench  # noqa: E402

PORT = 6379
WARMUP = 3  # steps skipped at the start of every run
TARGET_S = 10.0  # each run lasts about this long
MIN_STEPS, MAX_STEPS = 12, 300
RUN_TIMEOUT_S = 300
# The hosts sit on a private bridge: no token (RAY_AUTH_MODE=disabled), and no loopback mode.
CLEAN_ENV = "env -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER -u RAY_ADDRESS RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0"


def sh(host, command, timeout):
    """`command` on `host`; RuntimeError with its output when it fails."""
    done = host.run(command, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{host.name}: {command}\nexit {done.returncode}: {(done.stdout + done.stderr).strip()[-3000:]}")
    return done.stdout


def rate_gbit(rate):
    """'100mbit' -> 0.1; 'none' (links left as they are) -> None."""
    return None if rate == "none" else hostlib._bits(rate) / 1e9


def write_job(folder, layers, rows, servers, steps):
    """A job whose weights are P = sum (a + 1) b over the layers; the data is made on first
    use, in `folder`, which every host sees."""
    ps = "{ps: 1}" if servers == 2 else "{}"
    text = f"""name: network
seed: 0
data:
  path: {folder}/blobs.parquet
  make: {{kind: blobs, rows: {rows}, features: {layers[0]}, classes: {layers[-1]}}}
model:
  layers: [{", ".join(map(str, layers))}]
  activation: relu
  init: he
  dtype: float32
train:
  steps: {steps}
  optimizer: {{name: sgd, lr: 0.001}}
  eval_every: 1000000
  checkpoint_every: 1000000
cluster:
  workers: 1
  parameter_servers: {servers}
  parameter_resources: {ps}
output:
  plot: false
"""
    path = Path(folder) / f"job-s{servers}.yaml"
    path.write_text(text)
    return path


def calibrate(head, job, venv):
    """`distbp bench JOB --max-workers 1 --json` on one host: compute rate and fixed cost."""
    out = sh(head, f"cd {ROOT} && {CLEAN_ENV} {venv}/distbp bench {job} --max-workers 1 --json", 600)
    merged = json.loads(out)
    name = next(iter(merged["workloads"]))
    return {"results": merged["results"], "spec": merged["workloads"][name]["spec"], "machine": merged["machine"]}


def start_ray(cluster, venv, workers):
    """Head on h1, a parameter host h2, `workers` worker hosts; waits (bounded) for every node."""
    ray = f"{CLEAN_ENV} {venv}/ray start --disable-usage-stats --object-store-memory=100000000"
    head, ps2, *rest = cluster.hosts
    sh(head, f"{ray} --head --port={PORT} --node-ip-address={head.ip} --num-cpus=0 --include-dashboard=false --resources='{{\"ps\": 1}}'", 180)
    join = f"{ray} --address={head.ip}:{PORT}"
    sh(ps2, f"{join} --node-ip-address={ps2.ip} --num-cpus=0 --resources='{{\"ps\": 1}}'", 180)
    for host in rest[:workers]:
        sh(host, f"{join} --node-ip-address={host.ip} --num-cpus=1", 180)
    probe = (f"cd /tmp && {CLEAN_ENV} {venv}/python -c \"import ray; ray.init(address='{head.ip}:{PORT}', logging_level='ERROR');"
             " print(sum(n['Alive'] for n in ray.nodes()))\"")
    deadline = time.monotonic() + 120
    for _ in range(60):
        alive = head.run(probe, timeout=120, check=False).stdout.strip().splitlines()
        if alive and alive[-1] == str(2 + workers):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster did not reach {2 + workers} nodes (last count: {alive[-1] if alive else '-'})")


def run_job(head, job, workers, steps, venv, congestion=None):
    """One distbp run with the driver on the head; the median seconds per step after WARMUP."""
    out = "/tmp/network-run"
    cmd = (f"cd {ROOT} && {CLEAN_ENV} {venv}/distbp run {job} --address {head.ip}:{PORT} --workers {workers} "
           f"--out {out} --force --quiet --set train.steps={steps}" + (f" --set cluster.tcp_congestion={congestion}" if congestion else ""))
    done = head.run(cmd, timeout=RUN_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"distbp run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    with open(head.tmp / "network-run" / "metrics.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    gaps = [b - a for a, b in zip(seconds, seconds[1:])][WARMUP:]
    return statistics.median(gaps)


def run_ddp(cluster, layers, rows, workers, steps, venv):
    """PyTorch DDP with one rank on each of the first `workers` worker hosts; seconds per step."""
    import threading

    hosts = cluster.hosts[2:2 + workers]
    master = f"{hosts[0].ip}:29500"
    outs = [None] * workers

    def rank(r):
        cmd = (f"cd {ROOT} && {CLEAN_ENV} {venv}/python benchmarks/ddp_rank.py --rank {r} --world {workers} --master {master} "
               f"--layers {','.join(map(str, layers))} --rows {rows} --steps {steps - WARMUP - 1} --ifname eth0")
        outs[r] = hosts[r].run(cmd, timeout=RUN_TIMEOUT_S, check=False)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, done in enumerate(outs):
        if done is None or done.returncode != 0:
            raise RuntimeError(f"DDP rank {r} failed: {(done.stdout + done.stderr).strip()[-2000:] if done else 'no result'}")
    return json.loads(outs[0].stdout.strip().splitlines()[-1])["sec_per_step"]


def link_bytes(hosts):
    """[(sent, received)] bytes of each host's interface so far (its counters in /sys)."""
    stats = "/sys/class/net/eth0/statistics"
    return [tuple(int(v) for v in h.run(f"cat {stats}/tx_bytes {stats}/rx_bytes").stdout.split()) for h in hosts]


def busiest(point):
    """The most MB a host sent, and received, per step (median over the runs); None for a
    point of an earlier --json file, which did not count them."""
    if "mb_per_step" not in point:
        return None
    return tuple(statistics.median(max(host[i] for host in run) for run in point["mb_per_step"]) for i in (0, 1))


def predict(report, rate, workers, servers):
    """bench.scaling_model's seconds per step at (K, S) (S per_worker, or ddp: the ring), or
    compute + fixed only (rate 'none')."""
    gbit = rate_gbit(rate)
    counted = servers if isinstance(servers, int) else 1
    model = bench.scaling_model(report, gbit or 1.0, workers=(workers,), servers=(counted,))
    row = model["rows"][0]
    if gbit is None:
        return row["compute_sec"] + model["figures"]["fixed_sec"]
    return {"per_worker": row["per_worker_sec"], "ddp": row["ring_allreduce_sec"]}.get(servers, row[f"ps{counted}_sec"])


def serial_bound(report, rate, workers, servers):
    """The least a step can take if every overlap happens: each parameter actor sends the
    workers their slices one after the other and each gradient comes back while later workers'
    weights still go out, so its link carries K + 1 slices in a step instead of 2 K; a worker's
    own link still carries its weights and then its gradient (2 S slices), whichever is more."""
    gbit = rate_gbit(rate)
    if not isinstance(servers, int):  # per_worker and the ring: the model's own figure is the bound
        return predict(report, rate, workers, servers)
    model = bench.scaling_model(report, gbit or 1.0, workers=(workers,), servers=(servers,))
    f, row = model["figures"], model["rows"][0]
    if gbit is None:
        return row["compute_sec"] + f["fixed_sec"]
    slice_sec = f["param_bytes"] / servers / (gbit * 1e9 / 8 * f["payload_share"])
    return row["compute_sec"] + f["fixed_sec"] + max(2 * servers, workers + 1) * slice_sec


def table(report, points):
    f = bench.scaling_model(report, 1.0)["figures"]
    lines = [
        f"P = {report['spec']['num_params']:,} parameters ({f['param_bytes'] / 1e6:.2f} MB), N = {report['spec']['rows']} rows; "
        f"compute {f['rate_gflops_per_core']:.1f} GFLOP/s per core, fixed {f['fixed_sec'] * 1e3:.2f} ms per step (one node)",
        f"{'link':>8}  {'K':>2}  {'S':>10}  {'predicted s':>11}  {'serial bound s':>14}  {'measured s':>10}  {'runs':>24}  {'measured/predicted':>18}  "
        f"{'MB/step out, in':>15}  load",
    ]
    for p in points:
        runs = " ".join(f"{s:.3f}" for s in p["runs"])
        low = serial_bound(report, p["rate"], p["workers"], p["servers"])
        most = busiest(p)
        moved = f"{most[0]:.2f}, {most[1]:.2f}" if most else "-"
        lines.append(f"{p['rate']:>8}  {p['workers']:>2}  {p['servers']:>10}  {p['predicted']:11.3f}  {low:14.3f}  {p['measured']:10.3f}  {runs:>24}  "
                     f"{p['measured'] / p['predicted']:18.2f}  {moved:>15}  {p['load'][0]:4.1f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100mbit,1gbit", help="link rates (tc syntax), comma-separated; 'none' leaves the links unshaped")
    parser.add_argument("--workers", default="2,3", help="K values, comma-separated")
    parser.add_argument("--servers", default="1,2,per_worker", help="S values, comma-separated: 1, 2 (two parameter hosts) or per_worker")
    parser.add_argument("--peers", default="", help="ddp: also PyTorch DDP, one rank per worker host")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", default="256,1024,256,10")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--tcp-congestion", choices=["auto", "system"], help="the jobs' cluster.tcp_congestion (default: the job's default, auto)")
    parser.add_argument("--prefix", default="dbs", help="names of the hosts' namespaces and bridge (tests/hosts.py)")
    parser.add_argument("--subnet", default="10.213.8", help="the bridge's /24, without the last number")
    parser.add_argument("--json", dest="json_path", help="also write the calibration and every run here")
    parser.add_argument("--from", dest="from_path", help="print the table of an earlier --json file with the current model; runs nothing")
    args = parser.parse_args()
    if args.from_path:
        saved = json.loads(Path(args.from_path).read_text())
        for p in saved["points"]:
            p["predicted"] = predict(saved["calibration"], p["rate"], p["workers"], p["servers"])
        print(table(saved["calibration"], saved["points"]))
        return
    rates = args.rates.split(",")
    ks = [int(v) for v in args.workers.split(",")]
    ss = [v if v == "per_worker" else int(v) for v in args.servers.split(",")]
    layers = [int(v) for v in args.layers.split(",")]
    if any(s not in (1, 2, "per_worker") for s in ss) or min(ks) < 1 or not 1 <= args.repeats <= 20:
        parser.error("S is 1, 2 or per_worker, K at least 1, repeats 1 to 20")
    peers = [p for p in args.peers.split(",") if p]
    if any(p != "ddp" for p in peers):
        parser.error("--peers: ddp is the one peer")
    why = hostlib.unavailable()
    if why:
        sys.exit(f"network benchmark: {why}")
    venv = Path(sys.executable).parent
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the clean-up below runs

    cluster = hostlib.Hosts(2 + max(ks), prefix=args.prefix, subnet=args.subnet)
    folder = Path(tempfile.mkdtemp(prefix="distbp-network-", dir="/var/tmp"))
    folder.chmod(0o755)
    try:
        cluster.up()
        head = cluster.hosts[0]
        jobs = {s: write_job(folder, layers, args.rows, s, MIN_STEPS) for s in ss}
        print(f"calibrating on {head.name} (embedded Ray, one node) ...", file=sys.stderr, flush=True)
        report = calibrate(head, write_job(folder, layers, args.rows, 1, MIN_STEPS), venv)
        start_ray(cluster, venv, max(ks))
        points = []
        for rate in rates:
            for host in cluster.hosts:
                host.shape(None if rate == "none" else rate)
            for s in ss + peers:
                for k in ks:
                    predicted = predict(report, rate, k, s)
                    steps = WARMUP + 1 + int(min(MAX_STEPS, max(MIN_STEPS, math.ceil(TARGET_S / predicted))))
                    runs, moved = [], []
                    for r in range(args.repeats):
                        print(f"{rate} K={k} S={s} run {r + 1}/{args.repeats}: {steps} steps, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
                        before = link_bytes(cluster.hosts)
                        runs.append(run_ddp(cluster, layers, args.rows, k, steps, venv) if s == "ddp" else run_job(head, jobs[s], k, steps, venv, args.tcp_congestion))
                        done = steps - 1 if s == "ddp" else steps  # DDP: WARMUP + steps - WARMUP - 1 (ddp_rank.py)
                        moved.append([[(b - a) / done / 1e6 for a, b in zip(x, y)] for x, y in zip(before, link_bytes(cluster.hosts))])
                    points.append({"rate": rate, "workers": k, "servers": s, "predicted": predicted, "runs": runs,
                                   "measured": statistics.median(runs), "load": os.getloadavg(), "mb_per_step": moved})
        print(table(report, points))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps({"calibration": report, "tcp_congestion": args.tcp_congestion or "auto", "points": points}, indent=1))
    finally:
        for host in cluster.hosts:
            try:
                if host.sshd is not None and host.sshd.poll() is None:
                    host.run(f"{CLEAN_ENV} {venv}/ray stop --force", timeout=60, check=False)
            except Exception as err:  # down() below kills whatever is left in the namespace
                print(f"ray stop on {host.name}: {err}", file=sys.stderr)
        cluster.down()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
