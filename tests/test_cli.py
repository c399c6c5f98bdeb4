"""The real CLI: in-process with CliRunner, and as subprocesses of a real shell run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from distbp.cli import main

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def distbp(*args, cwd, timeout=180, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the CLI must choose loopback itself
    return subprocess.run([sys.executable, "-m", "distbp", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def listening_addresses(root_pid):
    """(process name, ip, port) of every listening TCP socket of root_pid's process tree."""
    found = []
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_embedded_ray_listens_on_loopback_only(make_job, tmp_path):
    job = make_job(rows=400, name="loop", train={"steps": 100000, "checkpoint_every": 100000})
    env = {**os.environ}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    proc = subprocess.Popen([sys.executable, "-m", "distbp", "run", str(job), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "loop" / "metrics.csv"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size > 200):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert metrics.exists(), "the run never started"
        sockets = listening_addresses(proc.pid)
        assert len(sockets) >= 3, sockets  # gcs, raylet, object manager at least
        assert all(ip in LOOPBACK for _, ip, _ in sockets), sockets
        tree = psutil.Process(proc.pid).children(recursive=True)  # its Ray: daemons and workers
        assert any("monitor.py" in " ".join(p.cmdline()) for p in tree)  # which the stop kills first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "autoscaler" not in err, err  # its end reported nowhere
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, alive  # nothing of its Ray is left running
    finally:
        if proc.poll() is None:
            proc.kill()


def test_address_joins_an_existing_cluster(ray_session, make_job, tmp_path):
    gcs = ray_session.get_runtime_context().gcs_address
    assert gcs.split(":")[0] == "127.0.0.1"
    job = make_job(rows=150, name="joined")
    run = distbp("run", str(job), "--address", gcs, "--quiet", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "runs" / "joined" / "model.npz").exists()
    assert ray_session.is_initialized() and ray_session.cluster_resources()["CPU"] >= 4  # left running


def test_unreachable_address_fails_in_one_line_within_the_timeout(make_job, tmp_path):
    job = make_job(rows=50, name="nowhere")
    # A hang would end in subprocess.TimeoutExpired; the message says which timeout gave up.
    run = distbp("run", str(job), "--address", "127.0.0.1:1", "--set", "cluster.connect_timeout_s=3", "--quiet", cwd=tmp_path, timeout=90)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "within 3 s" in lines[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "runs" / "nowhere").exists()


@pytest.mark.parametrize(
    "edit,needle",
    [
        ({"model": {"layer": [2, 3]}}, "model.layer: unknown key (did you mean 'layers'?)"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"model": {"layers": [3, 8, 8, 3]}}, "model.layers[0]: expected 2 (the number of feature columns), got 3"),
        ({"model": {"layers": [2, 8, 8, 4]}}, "model.layers[-1]: expected 3 (the number of classes in 'label'), got 4"),
    ],
)
def test_job_file_errors_are_one_line_with_exit_2(ray_session, make_job, edit, needle):
    job = make_job(rows=60, name="bad", **edit)
    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(job) in lines[0], lines
    assert "Traceback" not in result.output


def test_gradcheck_command_passes_on_a_job(make_job):
    result = CliRunner().invoke(main, ["gradcheck", str(make_job(rows=20, name="gc", model={"activation": "relu"}))])
    assert result.exit_code == 0, result.output
    assert "layer 3:" in result.output and result.output.strip().splitlines()[-1].startswith("ok:")


def test_data_make_writes_each_format(tmp_path):
    for ext in ("parquet", "csv", "feather"):
        out = tmp_path / f"t.{ext}"
        result = CliRunner().invoke(main, ["data", "make", "teacher", "--rows", "50", "--layers", "6,5,4", "-o", str(out)])
        assert result.exit_code == 0, result.output
        from distbp.data import tables

        source = tables.open_source(str(out))
        assert source.num_rows == 50 and source.columns == [f"x{i}" for i in range(6)] + ["label"]


def test_an_epochs_job_runs_with_its_progress_bar(ray_session, make_job):
    job = make_job(name="ep", rows=120, train={"steps": None, "epochs": 2, "batch": 25})
    result = CliRunner().invoke(main, ["run", str(job)])  # no --quiet: the bar is drawn
    assert result.exit_code == 0, result.output
    assert "done: 10 steps" in result.output


def test_top_level_help_lists_every_command_without_cutting_its_description():
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1].strip().splitlines()
    assert sorted(line.split()[0] for line in commands) == sorted(main.commands)
    assert not [line for line in commands if line.rstrip().endswith("...")], commands
