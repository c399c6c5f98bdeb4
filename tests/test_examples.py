"""Every job in jobs/ runs as the README shows it, from a copy of the repository's jobs/
folder: on a terminal (a pseudo-terminal, so the bar is drawn) and with stdout and stderr
piped (as in a CI log or `ray job logs`), never with --quiet. Long jobs are cut with --set
(fewer steps, and fewer rows for teacher); everything else is the README's command."""

import csv
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# job -> (the README's arguments after `distbp`, the cut for the test, steps the run then has)
EXAMPLES = {
    "spirals": (["run", "jobs/spirals.yaml", "--force"], [], 400),
    "xor": (["run", "jobs/xor.yaml"], [], 300),
    "tiny": (["run", "jobs/tiny.yaml", "--verbose"], ["--set", "train.steps=500"], 500),
    "teacher": (["run", "jobs/teacher.yaml"], ["--set", "train.steps=3", "--set", "data.make.rows=600"], 3),
    "digits": (["run", "jobs/digits.yaml"], ["--set", "train.epochs=2"], 46),
}


def test_every_job_in_jobs_has_an_example_test_and_a_readme_command():
    assert sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml")) == sorted(EXAMPLES)
    readme = (ROOT / "README.md").read_text()
    for args, _, _ in EXAMPLES.values():
        assert "distbp " + " ".join(args) in readme, args


def environment():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "DISTBP_FAULT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def on_a_terminal(cmd, cwd, timeout=240):
    """Run `cmd` with stdin, stdout and stderr on a pseudo-terminal of 100 x 30; returns
    (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=environment(), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A folder holding a copy of jobs/ (its data is made there on the first run)."""
    folder = tmp_path_factory.mktemp("examples")
    shutil.copytree(ROOT / "jobs", folder / "jobs", ignore=shutil.ignore_patterns("data"))
    return folder


def closing_lines(text, name, steps):
    done = [line for line in text.splitlines() if line.startswith("done: ")]
    assert len(done) == 1, text[-3000:]
    assert re.match(rf"done: {steps} steps( \(early stop\))? in \d+\.\d s; model\.npz holds the (weights after step {steps}|best validation weights, evaluated at step \d+): loss \d", done[0]), done[0]
    assert done[0].endswith(f"/runs/{name}/model.npz")
    assert re.search(rf"^plot: \S*/runs/{name}/plot\.png$", text, re.M), text[-2000:]  # matplotlib is in the base install


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_runs_with_stderr_piped(repo, name):
    args, cut, steps = EXAMPLES[name]
    proc = subprocess.run([sys.executable, "-m", "distbp", *args, "--force", *cut], cwd=repo, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr and "\r" not in proc.stderr
    closing_lines(proc.stdout, name, steps)
    progress = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert progress and progress[-1].startswith(f"step {steps}/{steps} loss "), proc.stderr
    assert all(re.match(r"step \d+/\d+ loss \S+ .*(\d+\.\d steps/s ETA \d+:\d\d:\d\d|-- steps/s ETA --)", line) for line in progress), progress
    assert len(progress) <= 11  # every tenth of the steps (or 10 s), not every step
    if name == "tiny":  # --verbose: the set-up and the phases
        # the links' TCP congestion control (cluster.tcp_congestion: auto) as the workers' sockets report it
        assert "setup: 2 workers, 1 parameter actor, 256 training rows, 337 parameters, engine direct (TCP reno)" in proc.stderr
        phases = next(line for line in proc.stderr.splitlines() if line.startswith("phases: "))
        for phase in ("imports", "ray_start", "actor_start", "data_read", "first_step", "plot", "shutdown"):
            assert f"{phase} " in phases, phases
        assert not any(p.name.startswith("distbp-") for p in Path("/dev/shm").glob("*"))
    if name == "spirals":  # and then what the README does with its model
        model = str(repo / "runs" / "spirals" / "model.npz")
        ev = subprocess.run([sys.executable, "-m", "distbp", "eval", model, "jobs/data/spirals.parquet", "--json"], cwd=repo, env=environment(), capture_output=True, text=True)
        assert ev.returncode == 0, ev.stderr
        report = json.loads(ev.stdout)
        assert report["rows"] == 3000 and report["accuracy"] >= 0.95
        assert f"loss {report['loss']:.4f}, accuracy {report['accuracy']:.4f} ->" in proc.stdout  # the closing line measured model.npz
        pr = subprocess.run([sys.executable, "-m", "distbp", "predict", model, "jobs/data/spirals.parquet", "-o", "pred.csv"], cwd=repo, env=environment(), capture_output=True, text=True)
        assert pr.returncode == 0 and pr.stdout.strip() == "wrote 3000 predictions -> pred.csv", pr.stderr
        rows = list(csv.DictReader(open(repo / "pred.csv")))
        assert len(rows) == 3000 and list(rows[0]) == ["prediction", "proba_0", "proba_1", "proba_2"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_runs_on_a_terminal(repo, name):
    args, cut, steps = EXAMPLES[name]
    code, text = on_a_terminal([sys.executable, "-m", "distbp", *args, "--force", *cut], repo)
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "internal error" not in text
    lines = text.replace("\r\n", "\n").split("\n")
    closing_lines("\n".join(lines), name, steps)
    frames = [frame for line in lines for frame in line.split("\r") if frame.startswith("step ")]
    assert frames and re.match(rf"step {steps}/{steps} \|\S+\| \d+\.\d steps/s ETA \d:\d\d:\d\d .*loss \d", frames[-1]), frames[-3:]
    # log lines are never glued to the bar: each starts a line of its own
    for line in lines:
        for frame in line.split("\r"):
            if frame.startswith("step "):
                assert not re.search(r"(made |setup: |warning: |done: )", frame), frame


def readme_section(title):
    """The code blocks of the README's section `## title`, in order: (language, text)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.S | re.M)


def test_the_own_csv_quick_start_runs_as_the_readme_writes_it(tmp_path):
    """The README's "Your own CSV": its job file and every command, run in a folder holding a
    customers.csv with empty cells and a string label, a holdout.csv and a new.csv."""
    import numpy as np
    import pyarrow as pa

    from distbp.data import tables

    blocks = readme_section("Your own CSV")
    (_, job), (_, commands) = blocks
    (tmp_path / "customers.yaml").write_text(job)
    rng = np.random.default_rng(7)

    def customers(n):
        age, income, visits = rng.uniform(18, 80, n), rng.lognormal(10, 0.5, n), rng.poisson(6, n).astype(float)
        churned = np.where(visits + 0.05 * age < 6 + rng.normal(0, 1, n), "yes", "no")
        return {"age": age, "income": income, "visits": visits, "churned": churned}

    train = customers(1000)
    train["income"][[5, 50, 500]] = np.nan
    train["income"] = pa.array(train["income"], mask=np.isnan(train["income"]))  # empty cells in the CSV
    tables.write_table(pa.table(train), str(tmp_path / "customers.csv"))
    assert (tmp_path / "customers.csv").read_text().count(",,") == 3
    tables.write_table(pa.table(customers(200)), str(tmp_path / "holdout.csv"))
    new = customers(50)
    del new["churned"]
    tables.write_table(pa.table(new), str(tmp_path / "new.csv"))

    lines = [line for line in commands.splitlines() if line.strip()]
    assert all(line.startswith("distbp ") for line in lines), lines
    out = {}
    for line in lines:
        proc = subprocess.run([sys.executable, "-m", "distbp", *line.split()[1:]], cwd=tmp_path, env=environment(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stdout, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
        out[line.split()[1] if line.split()[1] != "run" else " ".join(line.split()[1:])] = proc
    assert out["run customers.yaml --dry-run"].stdout.strip().endswith("data.on_nan: drop will skip 3 rows holding NaN or inf values")
    assert "data.on_nan: drop: skipped 3 rows holding NaN or inf values" in out["run customers.yaml"].stderr
    report = json.loads(out["eval"].stdout)
    assert report["rows"] == 200 and report["accuracy"] > 0.7, report
    with open(tmp_path / "predictions.csv", newline="") as f:
        predicted = list(csv.DictReader(f))
    assert len(predicted) == 50 and {r["prediction"] for r in predicted} <= {"no", "yes"}
    assert {"proba_no", "proba_yes"} <= set(predicted[0])
    assert (tmp_path / "customers.onnx").stat().st_size > 0 and (tmp_path / "runs" / "customers" / "plot.png").exists()
