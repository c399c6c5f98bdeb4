"""Elastic runs (cluster.elastic): a lost node that cannot be replaced shrinks the run, a node
added back grows it, and each step's gradient is still the sum over exactly its rows. Nodes
come and go on a real loopback cluster (cluster_driver.py), never by calling the resharding."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distbp.run import checkpoint
from distbp.api import load
from distbp.errors import TrainingError
from distbp.runtime.messages import Order, Sums, stats_vector
from distbp.runtime.server import ParameterServer
from distbp.trainer import Trainer

from conftest import model_arrays, plan_file, write_job

DRIVER = Path(__file__).with_name("cluster_driver.py")
# Mini-batches of 64 from 400 rows: which rows a step takes must not depend on the worker count.
# Windows end at each checkpoint, so a node lost or added at step 10 or 20 changes the
# membership from step 11 or 21 exactly, whatever the timing.
JOB = dict(rows=400, train={"steps": 30, "batch": 64, "optimizer": {"name": "adam", "lr": 0.01}, "checkpoint_every": 10, "eval_every": 5})
ELASTIC = ["--set", "cluster.elastic=true", "--set", "cluster.wait_for_nodes_s=1"]


def driver(job, out, *args):
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent)}
    return subprocess.run([sys.executable, str(DRIVER), str(job), str(out), *args], capture_output=True, text=True, timeout=300, env=env)


def report_of(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def workers_column(out):
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [(int(r["step"]), int(r["workers"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def elastic(ray_session, tmp_path_factory):
    """The job on 1 worker in this process (the single-process gradient), then twice with each
    parameter-actor layout on one loopback cluster (cluster_driver.py --plan): 3 nodes of 1 CPU
    and 3 workers, so no CPU is left to spare once a node is gone, until one is added. Each run
    loses a node when step 10 is recorded and gets one back at step 20, so every run starts
    on 3 nodes. Returns (the 1-worker model, the plan's report, its folder)."""
    folder = tmp_path_factory.mktemp("elastic")
    job = write_job(folder, name="el", **JOB)
    one = model_arrays(Trainer(load(job, [f"output.dir={folder / 'one'}", "cluster.workers=1"])).run().model_path)
    flags = ["--set", "cluster.workers=3", *ELASTIC, "--remove-node-at", "10", "--add-node-at", "20"]
    plan = {f"{servers}-{r}": [*flags, "--set", f"cluster.parameter_servers={servers}"] for servers in ("1", "per_worker") for r in range(2)}
    return one, report_of(driver(job, folder / "runs", "--nodes", "3", "--plan", plan_file(folder, plan)))["plan"], folder / "runs"


@pytest.mark.parametrize("servers", ["1", "per_worker"])
def test_a_lost_node_shrinks_the_run_and_an_added_one_grows_it_back_with_the_same_bits_each_time(elastic, servers):
    """The node goes when step 10 is recorded, before its checkpoint. With the parameter actor on
    the driver's node the run goes on from step 11 on 2 workers; with per_worker the node took
    a slice, so every slice is restored from the newest checkpoint (none yet: the seeded start)
    and steps 1-10 are done again on 2 workers. Growing back at step 20 cuts the vector anew."""
    one, plan, out = elastic
    runs = [plan[f"{servers}-{r}"] for r in range(2)]
    want = [(s, 3) for s in range(1, 11)] + [(s, 2) for s in range(11, 21)] + [(s, 3) for s in range(21, 31)]
    if servers == "per_worker":
        want = [(s, 2) for s in range(1, 21)] + [(s, 3) for s in range(21, 31)]
    for run in runs:
        log = "\n".join(run["log"])
        shrunk = re.findall(r"warning: worker \d lost and no capacity within cluster.wait_for_nodes_s \(1 s\); going on with 2 workers, rows resharded", log)
        grown = re.findall(r"capacity back: going on with 3 workers instead of 2, rows resharded", log)
        assert len(shrunk) == 1 and len(grown) == 1, log[-3000:]
        assert run["killed"][0][0] == "node" and run["added"] and run["steps"] == 30
        if servers == "per_worker":
            assert len(re.findall(r"warning: parameter actors restored from step 0; replaying from step 1", log)) == 1
    first, second = (out / f"{servers}-0", out / f"{servers}-1")
    assert workers_column(first) == want and workers_column(second) == want
    a, b = model_arrays(first / "model.npz"), model_arrays(second / "model.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same changes at the same steps: the same bits
    for key in ("W1", "b1", "W2", "b2", "W3", "b3"):  # and the single-process gradient all along
        np.testing.assert_allclose(a[key], one[key], rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def below_min(ray_session, tmp_path_factory):
    """The job on 2 nodes of 1 CPU with cluster.min_workers 2, once per parameter-actor layout
    (cluster_driver.py --plan, the lost node replaced between them); a node goes when step 10
    is recorded. Returns (the plan's report, its folder)."""
    folder = tmp_path_factory.mktemp("below-min")
    job = write_job(folder, name="min", **JOB)
    plan = {servers: [*ELASTIC, "--set", "cluster.min_workers=2", "--remove-node-at", "10", "--set", f"cluster.parameter_servers={servers}"]
            for servers in ("1", "per_worker")}
    return report_of(driver(job, folder / "runs", "--nodes", "2", "--plan", plan_file(folder, plan)))["plan"], folder / "runs"


@pytest.mark.parametrize("servers", ["1", "per_worker"])
def test_below_min_workers_checkpoints_and_stops_with_one_line(below_min, servers):
    """The last step applied is checkpointed before the run stops, when the parameter actors
    survived; with per_worker the lost node took a slice, and the node went before step 10's
    checkpoint, so there is none to write (and the rows written stay)."""
    plan, runs = below_min
    report, out = plan[servers], runs / servers
    assert report.get("exit_code") == 1, report
    error = report["error"]
    assert "\n" not in error and "below cluster.min_workers (2)" in error and "--resume" in error, error
    assert re.search(r"worker \d lost and no capacity within cluster.wait_for_nodes_s \(1 s\); 1 worker left", error)
    assert checkpoint.list_steps(str(out / "checkpoints")) == ([10] if servers == "1" else [])  # the last step applied
    assert not (out / "model.npz").exists()
    assert [s for s, _ in workers_column(out)] == list(range(1, 11))


def test_a_parameter_actor_refuses_a_step_whose_rows_do_not_add_up():
    ps = ParameterServer(np.zeros(3), {"name": "sgd"}, layer_bounds=[(0, 0, 3)])
    grad, sums = np.ones(3), Sums(stats_vector(1.0, 63, 0, 0.0, np.zeros(1)), None)
    with pytest.raises(TrainingError, match="step 1: the gradients of 1 worker cover 63 rows, the step has 64"):
        ps.apply(Order(1, 0.5, False, False, 64), 1, grad, sums)
    assert ps.applied_step() == 0 and not ps.w.any()  # refused: nothing applied
    info = ps.apply(Order(1, 0.5, False, False, 63), 1, grad, sums)
    assert info.step == 1 and info.workers == 1
