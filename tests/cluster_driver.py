"""Runs one job on a real multi-node Ray cluster on loopback (ray.cluster_utils.Cluster) and
prints a JSON report; the failure and scale-out tests start it as a subprocess, because a
process holds one Ray at a time and the test session already has its own.

    python cluster_driver.py JOB_PATH OUT_DIR [--nodes N] [--kill-worker-at STEP]
        [--kill-server-at STEP] [--remove-node-at STEP] [--add-node-at STEP]
        [--stall-worker-at STEP [--stall-seconds S]] [--runs R] [--set key=value ...] [--cli]
        [--plan PLAN_JSON]

--add-node-at adds a node of one CPU once STEP is recorded, and waits until the driver sees its
CPU free. --runs R runs the job R times on the same cluster, each into OUT_DIR/run-<r>, with
the same failures at the same steps (a removed node stays removed, an added one stays).
A run that stops with a distbp error reports it as the command line does: one line on
stderr, the error's exit code.

--plan names a JSON file {name: [flags]}: one run per entry, in order, on the same cluster,
each into OUT_DIR/<name> with its own failure flags and --set values (the cluster's flags,
--nodes among them, come from the command line). Every entry starts on --nodes nodes: a node
an entry removed is replaced by a new one of one CPU before the next. The report is
{"plan": {name: report}}; a run that stops with a distbp error reports {"error": its line,
"exit_code": its code}, and the next entry runs. A run's report holds its warnings and
notices under "log". One cluster start (about 10 s on 2 cores) serves every entry.

With --cli the job runs through the real command, `distbp run JOB --address <cluster>`, in a
subprocess that joins the cluster like any user's driver; the report then gives the nodes of the
run's shard workers, read from the cluster's actor table afterwards (the failure flags need the
in-process Trainer and are ignored).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, before ray is imported
# No usage stats; Ray's "disabled" report and its probes of cloud metadata at head start
# (169.254.169.254, metadata.google.internal) go to a closed loopback port: nothing leaves 127.0.0.1.
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_USAGE_STATS_REPORT_URL="http://127.0.0.1:9/",
                  http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
                  no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from distbp.api import load  # noqa: E402
from distbp.errors import DistbpError  # noqa: E402
from distbp.runtime.actors import end_idle  # noqa: E402
from distbp.runtime.cluster import stop  # noqa: E402
from distbp.trainer import Trainer  # noqa: E402

FAST_HEALTH_CHECKS = {  # notice a lost node in about a second, not half a minute
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_failure_threshold": 3,
}


LEAN = {"include_log_monitor": False}


def alive(pid):
    """Whether process `pid` still runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("out")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--kill-worker-at", type=int)
    ap.add_argument("--kill-server-at", type=int)
    ap.add_argument("--remove-node-at", type=int)
    ap.add_argument("--add-node-at", type=int)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--stall-worker-at", type=int, help="SIGSTOP worker 1's process at this step ...")
    ap.add_argument("--stall-seconds", type=float, default=8.0, help="... and SIGCONT it this much later")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--cli", action="store_true")
    ap.add_argument("--node-env", action="append", default=[], help="KEY=VALUE in the environment of the last node's raylet (and so its workers)")
    ap.add_argument("--run-set", action="append", default=[], help="R:key=value, a --set for run R only (with --cli --runs)")
    ap.add_argument("--plan", help="a JSON file {name: [flags]}: one run per entry on this cluster")
    args = ap.parse_args()

    # No dashboard: nothing here reads it, it costs the head about 2 CPU-seconds to start, and
    # the head would wait a minute for one if another Ray holds port 8265. No autoscaler
    # monitor (the nodes are added and removed by hand) and no log monitor on any node (the
    # drivers do not take the workers' output): about 0.5 CPU-seconds each.
    head_args = {"num_cpus": 1, "_system_config": FAST_HEALTH_CHECKS, "include_dashboard": False, "no_monitor": True, **LEAN}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    node_env = dict(kv.split("=", 1) for kv in args.node_env)
    nodes = [cluster.add_node(num_cpus=1, **LEAN, **({"env_vars": node_env} if i == args.nodes - 2 and node_env else {})) for i in range(args.nodes - 1)]
    cluster.wait_for_nodes()
    if args.cli:
        reports = [run_cli(cluster, args, r) for r in range(args.runs)]
        print(json.dumps(reports[0] if args.runs == 1 else {"runs": reports}))
        finish(cluster)
        return max(r["returncode"] for r in reports)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
        reports = {}
        for name, flags in plan.items():
            entry = ap.parse_args([args.job, os.path.join(args.out, name), *flags])
            try:
                reports[name] = run_once(cluster, nodes, entry, entry.out)
            except DistbpError as err:
                reports[name] = {"error": str(err), "exit_code": err.exit_code}
                print(f"error: {err}", file=sys.stderr)
            end_idle()  # the next entry's workers get the CPUs this one's idle actors hold
            while len(nodes) < args.nodes - 1:
                add_node(cluster, nodes)
        print(json.dumps({"plan": reports}))
        finish(cluster)
        return 0
    reports = []
    for r in range(args.runs):
        out = args.out if args.runs == 1 else os.path.join(args.out, f"run-{r}")
        try:
            reports.append(run_once(cluster, nodes, args, out))
        except DistbpError as err:  # as the command line reports it
            print(f"error: {err}", file=sys.stderr)
            finish(cluster)
            return err.exit_code
    report = reports[0] if args.runs == 1 else {"runs": reports}
    print(json.dumps(report))
    finish(cluster)


def finish(cluster):
    """Leave the cluster and stop it, its head's autoscaler monitor first (distbp's stop: Ray
    would wait a second for it)."""
    stop(ray)
    cluster.shutdown()


def run_once(cluster, nodes, args, out):
    """One run of the job on `cluster` with the failures `args` ask for; its report. `nodes`
    (the nodes besides the head) follows the nodes removed and added."""
    job = load(args.job, [f"output.dir={out}", *args.sets])
    report = {"killed": [], "node_ids": [], "added": [], "log": []}

    def log(line):  # warnings and notices: on stderr, and in the report (one run's own)
        report["log"].append(line)
        print(line, file=sys.stderr, flush=True)

    trainer = Trainer(job, force=True, log=log)

    fired = set()

    def on_step(row):
        step = row["step"]
        if report["killed"] and trainer.replacements and "recovery_sec" not in report:  # first step after the replacement
            report["recovery_sec"] = time.monotonic() - report.pop("killed_at")
        if "stalled" in report and step == trainer.actors.total_steps:  # worker 1's process at the end
            report["last_pid"] = ray.get(trainer.workers[1].where.remote())["pid"]
        if step in fired:  # a replayed step: each failure happens once
            return
        fired.add(step)
        if step in (args.kill_worker_at, args.kill_server_at, args.remove_node_at):
            report["killed_at"] = time.monotonic()
        if step == args.stall_worker_at:
            import threading

            pid = ray.get(trainer.workers[1].where.remote())["pid"]
            os.kill(pid, signal.SIGSTOP)

            def wake():  # note the last step the driver had recorded when the worker went on
                report["recorded_at_wake"] = trainer.last[0]
                os.kill(pid, signal.SIGCONT)

            threading.Timer(args.stall_seconds, wake).start()
            report["stalled"] = [pid, args.stall_seconds]
        if step == args.kill_worker_at:
            where = ray.get(trainer.workers[1].where.remote())
            os.kill(where["pid"], signal.SIGKILL)
            report["killed"].append(["worker", where["pid"]])
        if step == args.kill_server_at:
            ray.kill(trainer.servers[0], no_restart=True)
            report["killed"].append(["server", 0])
        if step == args.remove_node_at:
            on = {ray.get(w.where.remote())["node_id"] for w in trainer.workers}
            # A worker's node, but not the driver's: on loopback every node shares 127.0.0.1, so
            # the driver (and the parameter actor beside it) may sit on any of them, and losing
            # the driver's node ends any run.
            driver = ray.get_runtime_context().get_node_id()
            node = next(n for n in nodes if n.node_id in on and n.node_id != driver)
            there = [w["pid"] for w in ray.get([a.where.remote() for a in trainer.workers + trainer.servers]) if w["node_id"] == node.node_id]
            cluster.remove_node(node, allow_graceful=False)
            nodes.remove(node)
            report["killed"].append(["node", node.node_id])
            # Its actors can answer until the health check marks the node dead: wait for that,
            # so the run really meets the failure instead of finishing first.
            deadline = time.monotonic() + 60
            while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
                assert time.monotonic() < deadline, "the removed node never went dead"
                time.sleep(0.1)
            # and for its actors' processes, which outlive its raylet a moment (on a loaded
            # machine, long enough to answer a checkpoint's snapshot)
            while any(alive(pid) for pid in there):
                assert time.monotonic() < deadline, f"the removed node's actors {there} never exited"
                time.sleep(0.1)
        if step == args.add_node_at:
            report["added"].append(add_node(cluster, nodes))
        if step == 1:
            report["node_ids"] = [ray.get(w.where.remote())["node_id"] for w in trainer.workers]

    trainer.on_step = on_step
    result = trainer.run()
    report.pop("killed_at", None)

    report.update(model=result.model_path, replacements=result.replacements, steps=result.steps)
    return report


def add_node(cluster, nodes):
    """Add a node of one CPU to `cluster` (and `nodes`) and wait until the driver sees its CPU
    free, as a run looks for capacity through the same view. Returns its node id."""
    free = ray.available_resources().get("CPU", 0)
    nodes.append(cluster.add_node(num_cpus=1, **LEAN))
    cluster.wait_for_nodes()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < free + 1:
        assert time.monotonic() < deadline, "the added node's CPU never showed"
        time.sleep(0.1)
    return nodes[-1].node_id


seen_jobs = set()  # the Ray jobs whose actors an earlier run_cli reported


def run_cli(cluster, args, r=0):
    """`distbp run JOB --address <cluster>` as its own process (run r of --runs), then the
    cluster's view of it."""
    out = args.out if args.runs == 1 else os.path.join(args.out, f"run-{r}")
    sets = args.sets + [kv.split(":", 1)[1] for kv in args.run_set if int(kv.split(":", 1)[0]) == r]
    cmd = [sys.executable, "-m", "distbp", "run", args.job, "--address", cluster.address,
           "--out", out, "--force", "--quiet", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sys.stderr.write(proc.stderr)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    from ray._private import state  # the GCS actor table keeps the actors of finished jobs

    actors = sorted(state.actors().values(), key=lambda a: (a["StartTime"], a["ActorID"]))
    mine = [a for a in actors if a["JobID"] not in seen_jobs]  # this run's, not an earlier run's
    seen_jobs.update(a["JobID"] for a in actors)
    report = {
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "address": cluster.address,
        "model": os.path.join(out, "model.npz"),
        "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "head": cluster.head_node.node_id,
        "worker_nodes": [a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "ShardWorker"],
        "server_nodes": [a["Address"]["NodeID"] for a in actors if a["ActorClassName"] == "ParameterServer"],
        "run_worker_nodes": [a["Address"]["NodeID"] for a in mine if a["ActorClassName"] == "ShardWorker"],
        "run_server_nodes": [a["Address"]["NodeID"] for a in mine if a["ActorClassName"] == "ParameterServer"],
    }
    ray.shutdown()
    return report


if __name__ == "__main__":
    sys.exit(main())
