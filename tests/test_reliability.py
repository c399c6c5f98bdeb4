"""Failures, interruptions and divergence: the run survives, or stops cleanly, without losing work."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from filelock import FileLock

from distbp.run import checkpoint
from distbp.api import load
from distbp.cli import main
from distbp.trainer import Trainer

from conftest import model_arrays, plan_file, wait_for_rows, write_job

DRIVER = Path(__file__).with_name("cluster_driver.py")
CLUSTER_JOB = dict(rows=400, train={"steps": 30, "optimizer": {"name": "adam", "lr": 0.01}, "checkpoint_every": 10})


def same_weights(a, b):
    a, b = model_arrays(a), model_arrays(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# Failures on one loopback cluster of 4 nodes (1 CPU each), one run after the other
# (cluster_driver.py --plan): a cluster start costs about 10 s on 2 cores, a run 1-3 s. Four
# nodes, so that the run that loses one still has a CPU for the replacement worker.
PLAN = {
    "killed": ["--kill-worker-at", "12"],
    "server": ["--kill-server-at", "15"],
    "two": ["--kill-server-at", "15", "--set", "cluster.parameter_servers=2"],
    "stall": ["--stall-worker-at", "12", "--stall-seconds", "8"],
    "max": ["--kill-worker-at", "12", "--set", "cluster.max_failures=0"],
    "node": ["--remove-node-at", "8"],
}


def on_cluster(job, out, *args):
    """Run `job` on a fresh loopback cluster in a subprocess; returns its JSON report."""
    env = {**os.environ, "PYTHONPATH": str(DRIVER.parent.parent)}
    proc = subprocess.run([sys.executable, str(DRIVER), str(job), str(out), *args], capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def made_once(tmp_path_factory, name, make):
    """make(folder) -> a JSON-able result, run once per test run: xdist's processes share it
    through a file in the folder they share, under a lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every process of this run shares
    folder, made = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not made.exists():
            folder.mkdir(exist_ok=True)
            made.write_text(json.dumps(make(folder)))
    return json.loads(made.read_text())


@pytest.fixture(scope="module")
def failures(ray_session, tmp_path_factory):
    """The cluster job once without any failure on the session's embedded Ray (the reference,
    its model's path under "want"), then once per PLAN entry on one cluster of 4 nodes (their
    reports, and "folder", where the runs wrote)."""

    def make(folder):
        job = write_job(folder, name="cl", **CLUSTER_JOB)
        want = Trainer(load(job, [f"output.dir={folder / 'baseline'}"])).run().model_path
        plan = on_cluster(job, folder / "plan", "--nodes", "4", "--plan", plan_file(folder, PLAN))["plan"]
        return {**plan, "want": str(want), "folder": str(folder / "plan")}

    return made_once(tmp_path_factory, "failures", make)


def test_killed_worker_process_is_replaced_and_weights_are_bit_identical(failures):
    report = failures["killed"]
    assert report["killed"] and report["killed"][0][0] == "worker"
    assert report["replacements"] == 1  # the failure was seen and handled, not missed
    assert same_weights(report["model"], failures["want"])


def test_lost_node_is_survived_and_weights_are_bit_identical(failures):
    report = failures["node"]
    assert report["killed"][0][0] == "node" and report["replacements"] == 1
    assert same_weights(report["model"], failures["want"])


def test_killed_parameter_actor_is_restored_from_checkpoint(failures):
    report = failures["server"]
    assert report["killed"] == [["server", 0]] and report["replacements"] == 1
    assert same_weights(report["model"], failures["want"])
    rows = (Path(failures["folder"]) / "server" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 31))  # replayed steps not doubled


def test_losing_one_of_two_parameter_actors_restores_both_and_keeps_the_bits(failures):
    report = failures["two"]  # one parameter actor in the reference; two give the same bits (test_trainer)
    assert report["killed"] == [["server", 0]] and report["replacements"] == 1
    assert same_weights(report["model"], failures["want"])
    rows = (Path(failures["folder"]) / "two" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 31))


def test_a_stalled_worker_is_waited_for_not_taken_for_dead(failures):
    report = failures["stall"]
    assert report["recorded_at_wake"] < 30  # the run was still going when the worker went on: it waited
    assert report["last_pid"] == report["stalled"][0]  # the same process finished the run
    assert report["replacements"] == 0 and report["killed"] == []
    assert same_weights(report["model"], failures["want"])


def test_too_many_failures_stop_with_a_clear_message(failures):
    report = failures["max"]
    assert report["exit_code"] != 0
    assert "more than cluster.max_failures (0) failures" in report["error"]
    # The checkpoints written before the failure are kept; the run did not get to the end.
    # (The kill happens when step 12's row reaches the driver: with the direct engine that
    # is after its window, which may run on to the checkpoint at step 20.)
    out = Path(failures["folder"]) / "max"
    steps = checkpoint.list_steps(out / "checkpoints")
    assert steps[0] == 10 and steps[-1] < 30 and not (out / "model.npz").exists()


def test_sigint_checkpoints_and_resume_is_bit_identical(ray_address, make_job, tmp_path):
    # Long enough that the signal lands mid-run: alone about a second of steps (well under a
    # millisecond each), longer on a loaded machine, and the rows are looked at every 50 ms.
    job = make_job(name="int", rows=300, train={"steps": 1000, "checkpoint_every": 10000, "optimizer": {"name": "adam", "lr": 0.01}})
    want = Trainer(load(job, [f"output.dir={tmp_path / 'whole'}"])).run().model_path
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    cmd = [sys.executable, "-m", "distbp", "run", str(job), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "runs" / "int" / "metrics.csv", 20, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("stopped: signal 2 after step") and "--resume" in err
    steps = checkpoint.list_steps(tmp_path / "runs" / "int" / "checkpoints")
    assert len(steps) == 1 and 20 <= steps[0] < 1000
    joined = ["--address", ray_address]  # the signalled run started Ray itself; the resumes join the session's
    resumed = subprocess.run(cmd + ["--resume", *joined], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(tmp_path / "runs" / "int" / "model.npz", want)
    rows = (tmp_path / "runs" / "int" / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 1001))
    again = subprocess.run(cmd + ["--resume", *joined], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_resume_without_checkpoint_exits_2(make_job, tmp_path):
    job = make_job(name="none", rows=50)
    (tmp_path / "runs" / "none").mkdir(parents=True)
    result = CliRunner().invoke(main, ["run", str(job), "--resume", "--quiet"])
    assert result.exit_code == 2 and "no checkpoint" in result.output


def rewrite(path, change, keep_digest):
    """Rewrite an npz with `change(arrays)` applied, keeping its old digest (a file changed
    behind distbp's back) or writing a matching one (NaN weights that pass the digest)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    if not keep_digest:
        arrays[checkpoint.DIGEST] = np.array(checkpoint.digest(arrays))
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage, says", [
    ("changed", "its arrays do not match their SHA-256 digest: the file was changed after distbp wrote it"),
    ("nan", "params holds NaN or infinite values; distbp never checkpoints a diverged step"),
])
def test_a_changed_or_nan_checkpoint_is_skipped_with_a_warning_that_says_why(ray_session, make_job, tmp_path, damage, says):
    job = make_job(name="dg", rows=100, train={"steps": 9, "checkpoint_every": 3})
    out = tmp_path / "runs" / "dg"
    first = model_arrays(Trainer(load(job)).run().model_path)
    newest = out / "checkpoints" / "step-000000009.npz"
    assert checkpoint.load(str(newest)).finished

    def change(arrays):
        arrays["params"] = arrays["params"].copy()
        arrays["params"][0] = np.nan if damage == "nan" else arrays["params"][0] + 1e-6
        arrays["finished"] = np.array(False)

    rewrite(newest, change, keep_digest=damage == "changed")
    warnings = []
    result = Trainer(load(job), resume=True, log=warnings.append).run()
    assert [w for w in warnings if w.startswith("warning:")] == [f"warning: skipping {newest}: damaged checkpoint ({says})"], warnings
    assert result.resumed_from == 6 and result.steps == 9
    again = model_arrays(result.model_path)
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)


def test_corrupt_newest_checkpoint_is_skipped_and_another_job_is_refused(ray_session, make_job, tmp_path):
    job = make_job(name="ck", rows=100, train={"steps": 9, "checkpoint_every": 3})
    out = tmp_path / "runs" / "ck"
    first = model_arrays(Trainer(load(job)).run().model_path)  # checkpoints at 3, 6 and 9
    (out / "checkpoints" / "step-000000009.npz").write_bytes(b"not a zip")
    warnings = []
    result = Trainer(load(job), resume=True, log=warnings.append).run()
    assert any("skipping" in w and "step-000000009" in w for w in warnings)
    assert result.resumed_from == 6 and result.steps == 9
    again = model_arrays(result.model_path)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other = make_job(name="ck", rows=100, model={"layers": [2, 5, 3]})
    refused = CliRunner().invoke(main, ["run", str(other), "--resume", "--quiet"])
    assert refused.exit_code == 2 and "different job" in refused.output


def test_divergence_stops_at_the_step_and_keeps_the_good_model(ray_session, make_job, tmp_path):
    job = make_job(name="div", rows=100, model={"activation": "relu", "dtype": "float32"}, train={"steps": 40, "optimizer": {"name": "sgd", "lr": 1e30}})
    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert "diverged at step" in line and "lower train.optimizer.lr" in line
    assert not (tmp_path / "runs" / "div" / "model.npz").exists()
    for step in checkpoint.list_steps(str(tmp_path / "runs" / "div" / "checkpoints")):
        params = checkpoint.load(str(tmp_path / "runs" / "div" / "checkpoints" / f"step-{step:09d}.npz")).params
        assert np.all(np.isfinite(params))


def test_a_window_that_failed_reports_a_parameter_actors_own_error_before_the_lost_links(ray_session):
    """A parameter actor whose step diverged closes its links, so the others fail with a lost
    link too, and Ray gives the first error in the list: the engine raises the divergence
    (not recoverable) wherever it stands, never a lost link (which would replay the step)."""
    from distbp.errors import TrainingError
    from distbp.runtime.direct import DirectEngine
    from distbp.runtime.actors import end_idle
    from distbp.runtime.link import LinkError

    end_idle()  # the idle actors of earlier runs in this process may hold every CPU the tasks need

    @ray_session.remote
    def fails(err):
        raise err

    def failed(*errors):
        """The calls, once they have failed: in a run, _own_error looks at calls that already ran
        (its 5 s are for actors winding down), not at tasks still waiting for a worker process,
        which on a loaded machine may take longer to start."""
        refs = [fails.remote(err) for err in errors]
        ray_session.wait(refs, num_returns=len(refs), timeout=120)
        return refs

    with pytest.raises(TrainingError, match="diverged at step 7"):
        DirectEngine._own_error(failed(LinkError("the peer closed the link"), TrainingError("training diverged at step 7: the loss or gradient is NaN or inf")))
    DirectEngine._own_error(failed(LinkError("the peer closed the link")))  # none of its own: nothing raised


@pytest.fixture(scope="module")
def capacity_gone(ray_session, tmp_path_factory):
    """The cluster job on 2 nodes of 1 CPU with 2 workers, once per parameter-actor layout
    (cluster_driver.py --plan, the lost node replaced between them): a node lost at step 12
    leaves no CPU to spare. Returns (the job, the plan's report, its folder)."""

    def make(folder):
        job = write_job(folder, name="cl", **CLUSTER_JOB)
        plan = {servers: ["--remove-node-at", "12", "--set", "cluster.wait_for_nodes_s=2", "--set", f"cluster.parameter_servers={servers}"]
                for servers in ("1", "per_worker")}
        return [str(job), on_cluster(job, folder / "gone", "--nodes", "2", "--plan", plan_file(folder, plan))["plan"], str(folder / "gone")]

    return made_once(tmp_path_factory, "capacity_gone", make)


@pytest.mark.parametrize("servers", ["1", "per_worker"])
def test_capacity_gone_for_good_checkpoints_and_stops_with_the_way_out(capacity_gone, tmp_path, servers):
    """With the parameter actor on the driver's node, the last applied step is saved before the
    run stops; with per_worker the lost node took its slice, so the newest periodic checkpoint
    (step 10) is what is left, and --resume goes on from there."""
    job, plan, folder = capacity_gone
    report = plan[servers]
    assert report.get("exit_code", 0) != 0, report
    assert "no capacity for a replacement of worker" in report["error"] and "--resume --workers 1" in report["error"]
    out = tmp_path / "gone"
    shutil.copytree(Path(folder) / servers, out)  # resumed here, so that each test has its own copy
    steps = checkpoint.list_steps(str(out / "checkpoints"))
    if servers == "1":
        assert steps[-1] >= 12, report  # the last applied step was saved, not only the periodic one at 10
    else:
        assert steps[-1] == 10, report
    resumed = Trainer(load(job, [f"output.dir={out}", "cluster.workers=1"]), resume=True).run()
    assert resumed.steps == 30 and resumed.resumed_from == steps[-1]


def test_workers_that_find_no_free_cpu_stop_the_run_in_one_line_instead_of_waiting_forever(ray_session, make_job, monkeypatch):
    """The cluster has the CPUs (check_capacity passes) but other work holds them: the run's
    workers stay pending; after START_S + cluster.wait_for_nodes_s the run stops, naming why."""
    from distbp.errors import TrainingError
    from distbp.runtime import actors

    actors.end_idle()  # 3 free CPUs for Busy: none held by the idle actors of earlier runs here

    @ray_session.remote(num_cpus=3)
    class Busy:
        def ping(self):
            return True

    busy = Busy.remote()
    ray_session.get(busy.ping.remote())  # 3 of the session's 4 CPUs are held
    monkeypatch.setattr(actors, "START_S", 15)  # room for the one that finds a CPU to start, under load too
    job = load(make_job(name="busy", rows=100, cluster={"workers": 2, "wait_for_nodes_s": 0}))
    try:
        with pytest.raises(TrainingError) as stopped:
            Trainer(job).run()
    finally:
        ray_session.kill(busy)
    text = str(stopped.value)
    assert "1 of 2 workers could not start within 15 s: each needs 1 CPU, and other work holds 3 of the cluster's 4 CPUs" in text, text
    assert "cluster.wait_for_nodes_s" in text
