"""`distbp bench --model`: predicted seconds per step on K cloud workers and S parameter actors,
from the compute rate, fixed cost and parameter bytes a report measured (docs/scaling.md)."""

# TCP payload per byte a link's rate counts at MTU 1500: 1448 of a full frame's 1514 bytes
# (Ethernet header 14, IPv4 20, TCP 20 and 12 of timestamp option). Jumbo frames (MTU 9001):
# 8949 of 9015, 0.993. Measured over rate-limited links: docs/scaling.md.
PAYLOAD_SHARE = 1448 / 1514


def scaling_model(report, bandwidth_gbit=10.0, workers=(1, 2, 4, 8, 16, 32, 64, 128, 256), servers=(1, 2, 4, 8)):
    """Predicted seconds per step on K workers (one per VM core) and S parameter actors, from
    three figures measured in `report`: the compute rate per core (single process), the fixed
    cost of a step (1 worker: time per step minus compute) and the bytes moved per step.

    T(K, S) = work / (K * rate) + fixed + 2 max(P b / B, K P b / (S B))
    A worker reads the new weights (P b bytes) and then sends its gradient (P b); each
    parameter actor's node serves K P b / S and then receives as much. B is the link's rate in
    TCP payload bytes/s (PAYLOAD_SHARE of its bit rate). A step's gradients need its weights,
    and the next weights need every gradient, so the model counts the two halves one after the
    other: the factor 2. That is an upper bound: the direct engine sends the next step's
    weights a part at a time while the gradients still come in (measured 0.59-0.72 of it
    with one or two parameter actors over rate-limited links, docs/scaling.md).
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
