"""The real CLI: in-process with CliRunner, and as subprocesses of a real shell run."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from conftest import free_port
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


def warm_ray_commands():
    """The README's "A warm Ray" commands: (ray start ..., distbp run ...), as written."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("- **A warm Ray**", 1)[1].split("```", 2)[1]
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    start = next(line for line in lines if " ray start " in line)
    run = next(line for line in lines if " distbp run " in line)
    assert lines[-1] == "ray stop"
    return start, run


def test_a_warm_ray_is_joined_as_the_readme_shows_and_without_the_token_the_error_says_so(tmp_path):
    """The README's "A warm Ray" on another port, in a HOME of its own holding a token, so that
    `ray start` turns Ray's token authentication on (`--block` instead of `ray stop`: only this
    Ray ends). The README's run joins it. Without RAY_AUTH_MODE=token, Ray only says that it
    cannot connect: distbp's one line says what to set, exit 1, and no run folder."""
    start, run = warm_ray_commands()
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns("data"))
    head = subprocess.Popen(start.replace("--port=6379", f"--port={port}") + " --block", shell=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_open(port):
            if head.poll() is not None:
                raise AssertionError(f"ray start exited {head.returncode}: {head.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, f"ray start did not listen on {port} within 120 s"
            time.sleep(0.2)
        # as the README writes it, but 200 steps (it trains 2,000 to show the speed)
        joined = subprocess.run(run.replace("127.0.0.1:6379", f"127.0.0.1:{port}") + " --set train.steps=200", shell=True,
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert "done: 200 steps" in joined.stdout and "ray_start " in joined.stderr
        no_token = subprocess.run([sys.executable, "-m", "distbp", "run", "jobs/xor.yaml", "--address", f"127.0.0.1:{port}"],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert no_token.returncode == 1 and "Traceback" not in no_token.stderr
        last = no_token.stderr.strip().splitlines()[-1]  # Ray's own warnings come first
        assert last.startswith(f"error: cannot join the Ray cluster at 127.0.0.1:{port}: ") and last.endswith("set RAY_AUTH_MODE=token to send that token)"), last
        assert not (tmp_path / "runs" / "xor").exists()
    finally:
        # The Ray of `ray start` is in the process group of its command: all of it ends at once
        # (SIGTERM would end it gracefully, in about 30 s).
        os.killpg(head.pid, signal.SIGKILL)
        head.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while port_open(port) or [p for p in psutil.process_iter(["cmdline"]) if any(f"127.0.0.1:{port}" in a for a in p.info["cmdline"] or [])]:
        assert time.monotonic() < deadline, "the warm Ray is still there"
        time.sleep(0.2)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


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
