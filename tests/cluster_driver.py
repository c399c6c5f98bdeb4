"""Runs one job on a real multi-node Ray cluster on loopback (ray.cluster_utils.Cluster) and
prints a JSON report; the failure and scale-out tests start it as a subprocess, because a
process holds one Ray at a time and the test session already has its own.

    python cluster_driver.py JOB_PATH OUT_DIR [--nodes N] [--kill-worker-at STEP]
        [--kill-server-at STEP] [--remove-node-at STEP] [--set key=value ...]
"""

import argparse
import json
import os
import signal
import sys
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, before ray is imported

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from distbp.api import load  # noqa: E402
from distbp.trainer import Trainer  # noqa: E402

FAST_HEALTH_CHECKS = {  # notice a lost node in about a second, not half a minute
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_failure_threshold": 3,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("out")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--kill-worker-at", type=int)
    ap.add_argument("--kill-server-at", type=int)
    ap.add_argument("--remove-node-at", type=int)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "_system_config": FAST_HEALTH_CHECKS},
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(args.nodes - 1)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    job = load(args.job, [f"output.dir={args.out}", *args.sets])
    trainer = Trainer(job, force=True)
    report = {"killed": [], "node_ids": []}

    fired = set()

    def on_step(row):
        step = row["step"]
        if step in fired:  # a replayed step: each failure happens once
            return
        fired.add(step)
        if step == args.kill_worker_at:
            where = ray.get(trainer.workers[1].where.remote())
            os.kill(where["pid"], signal.SIGKILL)
            report["killed"].append(["worker", where["pid"]])
        if step == args.kill_server_at:
            ray.kill(trainer.servers[0], no_restart=True)
            report["killed"].append(["server", 0])
        if step == args.remove_node_at:
            on = {ray.get(w.where.remote())["node_id"] for w in trainer.workers}
            node = next(n for n in nodes if n.node_id in on)  # a worker's node, not the head
            cluster.remove_node(node, allow_graceful=False)
            report["killed"].append(["node", node.node_id])
            # Its actors can answer until the health check marks the node dead: wait for that,
            # so the run really meets the failure instead of finishing first.
            deadline = time.monotonic() + 60
            while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
                assert time.monotonic() < deadline, "the removed node never went dead"
                time.sleep(0.1)
        if step == 1:
            report["node_ids"] = [ray.get(w.where.remote())["node_id"] for w in trainer.workers]

    trainer.on_step = on_step
    result = trainer.run()
    report.update(model=result.model_path, replacements=result.replacements, steps=result.steps)
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
