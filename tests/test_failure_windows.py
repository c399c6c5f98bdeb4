"""Failure windows, each opened every time by the test-only fault hook (DISTBP_FAULT, see
distbp/faults.py): a failure at that exact point loses no metrics row, no model and no
checkpoint, and never applies a step twice."""

import csv
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from distbp import faults
from distbp.run import checkpoint
from distbp.api import load
from distbp.cli import main
from distbp.run.model import load_model
from distbp.runtime.server import ParameterServer
from distbp.trainer import Trainer

from conftest import model_arrays, wait_for_rows

JOB = dict(rows=200, train={"steps": 12, "eval_every": 4, "checkpoint_every": 3, "optimizer": {"name": "adam", "lr": 0.01}})


def same_weights(a, b):
    a, b = model_arrays(a), model_arrays(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def rows_of(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def fault(monkeypatch):
    """Arm DISTBP_FAULT for this process (the driver) and the workers it starts."""
    faults._fired.clear()

    def arm(spec):
        monkeypatch.setenv(faults.ENV, spec)

    yield arm
    faults._fired.clear()


def cli(*args, fault=None, address=None, timeout=180):
    """The real command as its own process (a driver fault may end that process), joining
    the Ray at `address` or starting its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    join = ["--address", address] if address else []
    return subprocess.run([sys.executable, "-m", "distbp", "run", *map(str, args), *join], env=env, capture_output=True, text=True, timeout=timeout)


# -- 1. a lost metrics row ---------------------------------------------------------------------
def test_worker_lost_right_after_an_evaluation_step_keeps_that_row(ray_session, make_job, tmp_path, fault, monkeypatch):
    job = make_job(name="w1", data={"validation": 0.25}, **JOB)
    want = Trainer(load(job, [f"output.dir={tmp_path / 'clean'}"])).run()
    fault("worker_after_eval@8")
    got = Trainer(load(job)).run()
    assert got.replacements == 1  # the worker really died after sending step 8
    rows = rows_of(tmp_path / "runs" / "w1")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [4, 8, 12]
    clean = rows_of(tmp_path / "clean")
    assert [(r["loss"], r["val_loss"]) for r in rows] == [(r["loss"], r["val_loss"]) for r in clean]
    assert same_weights(got.model_path, want.model_path)
    # The next run of the process, without the fault, renews the idle workers: none of them
    # keeps the fault (the environment, or a point not fired yet) from the run before.
    monkeypatch.delenv(faults.ENV)
    again = Trainer(load(job, [f"output.dir={tmp_path / 'again'}"])).run()
    assert again.replacements == 0 and same_weights(again.model_path, want.model_path)


def test_a_recovered_worker_is_reported_in_its_own_lines_without_ray_tracebacks(ray_address, make_job, tmp_path):
    job = make_job(name="quiet", rows=200, train={**JOB["train"], "steps": 300, "checkpoint_every": 100})
    run = cli(job, fault="worker_after_eval@8", address=ray_address)  # not --quiet: stderr as a user sees it piped
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert "warning: worker 1 lost; starting a replacement (1 of at most 3)" in lines and "recovered: going on from step 9" in lines, lines
    assert all(line.startswith(("warning: ", "recovered: ", "step ")) for line in lines), lines  # no Ray logging, no traceback


# -- 2. a finished run without a model -------------------------------------------------------
def test_a_kill_between_model_and_done_checkpoint_never_leaves_a_finished_run_without_model(ray_address, make_job, tmp_path):
    job = make_job(name="w2", rows=100, train={"steps": 6, "checkpoint_every": 3})
    out = tmp_path / "runs" / "w2"
    died = cli(job, "--quiet", fault="model_written", address=ray_address)
    assert died.returncode == 3, died.stderr
    newest = checkpoint.load_latest(str(out / "checkpoints"))
    assert not newest.finished or (out / "model.npz").exists()
    resumed = cli(job, "--resume", "--quiet", address=ray_address)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load_latest(str(out / "checkpoints")).finished and load_model(str(out / "model.npz"))


# -- 3. failures while checkpointing, snapshotting and recovering ----------------------------
def test_a_checkpoint_that_cannot_be_written_ends_in_one_line_and_keeps_the_others(ray_session, make_job, tmp_path, fault):
    job = make_job(name="w3", **JOB)
    out = tmp_path / "runs" / "w3"
    fault("checkpoint_write@6")
    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checkpoint of step 6" in lines[0] and "No space left" in lines[0], lines
    assert "internal error" not in lines[0] and "--resume" in lines[0]
    assert checkpoint.list_steps(str(out / "checkpoints")) == [3]
    assert checkpoint.load(str(out / "checkpoints" / "step-000000003.npz")).step == 3
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]
    assert not (out / "model.npz").exists()
    faults._fired.clear()
    os.environ.pop(faults.ENV)
    resumed = Trainer(load(job), resume=True).run()
    clean = Trainer(load(job, [f"output.dir={tmp_path / 'clean'}"])).run()
    assert resumed.resumed_from == 3 and same_weights(resumed.model_path, clean.model_path)


@pytest.mark.parametrize("early", [False, True])
def test_a_model_that_cannot_be_written_keeps_the_final_checkpoint_and_resume_writes_it(ray_session, make_job, tmp_path, fault, early):
    """No periodic checkpoint yet (checkpoint_every above the steps): the failed model.npz write
    must not lose the run. --resume writes model.npz from the final checkpoint, training
    nothing, and it holds the same bits as a clean run's (the best weights when early
    stopping ended the run)."""
    train = {"steps": 12, "eval_every": 2, "checkpoint_every": 100, "optimizer": {"name": "adam", "lr": 0.01}}
    if early:
        train["early_stopping"] = {"metric": "val_loss", "patience": 1, "min_delta": 10.0}  # no evaluation improves enough
    job = make_job(name="mw", rows=200, data={"validation": 0.25}, train=train)
    out = tmp_path / "runs" / "mw"
    want = Trainer(load(job, [f"output.dir={tmp_path / 'clean'}"])).run()
    fault("model_write")
    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    step = want.steps
    assert line == (
        f"error: cannot write {out / 'model.npz'}: No space left on device (DISTBP_FAULT) (the final checkpoint of step {step} is kept "
        f"({out / 'checkpoints' / f'step-{step:09d}.npz'}); free the space or fix the folder, then --resume writes model.npz without training again)"
    ), line
    assert not (out / "model.npz").exists() and checkpoint.list_steps(str(out / "checkpoints")) == [step]
    rows = rows_of(out)
    faults._fired.clear()
    os.environ.pop(faults.ENV)
    resumed = CliRunner().invoke(main, ["run", str(job), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"from the final checkpoint of step {step}; nothing is trained again" in resumed.output
    assert not any(line.startswith("step ") for line in resumed.output.splitlines())
    assert rows_of(out) == rows  # no step trained or recorded again
    assert same_weights(out / "model.npz", want.model_path)
    assert (want.steps < 12) == early
    again = CliRunner().invoke(main, ["run", str(job), "--resume"])
    assert again.exit_code == 0 and "already finished" in again.output


def test_a_parameter_actor_lost_during_a_snapshot_is_recovered(ray_session, make_job, tmp_path, fault):
    job = make_job(name="w3s", **JOB)
    want = Trainer(load(job, [f"output.dir={tmp_path / 'clean'}"])).run()
    fault("snapshot")
    got = Trainer(load(job)).run()
    assert got.replacements == 1 and got.steps == 12
    assert [int(r["step"]) for r in rows_of(tmp_path / "runs" / "w3s")] == list(range(1, 13))
    assert same_weights(got.model_path, want.model_path)


def test_a_second_failure_during_recovery_is_recovered_too(ray_session, make_job, tmp_path, fault):
    job = make_job(name="w3r", data={"validation": 0.25}, **JOB)
    want = Trainer(load(job, [f"output.dir={tmp_path / 'clean'}"])).run()
    fault("worker_after_eval@4,recovery")
    got = Trainer(load(job)).run()
    assert got.replacements == 2 and got.steps == 12
    assert [int(r["step"]) for r in rows_of(tmp_path / "runs" / "w3r")] == list(range(1, 13))
    assert same_weights(got.model_path, want.model_path)


# -- 5. the step guard ---------------------------------------------------------------------------
def test_a_parameter_actor_never_applies_a_step_twice():
    from distbp.errors import TrainingError
    from distbp.runtime.messages import Order, Sums, stats_vector

    ps = ParameterServer(np.zeros(4), dict(name="sgd"), num_layers=1, layer_bounds=[(0, 0, 4)])
    grad, sums = np.ones(4), Sums(stats_vector(1.0, 2, 0, 0.0, np.zeros(1)), None)
    ps.apply(Order(1, 0.5, False, False), 1, grad, sums)
    after_one = ps.w.copy()
    assert np.array_equal(after_one, np.full(4, -0.25))
    for step in (1, 3, 0):  # the same step again, a gap, a step back: refused
        with pytest.raises(TrainingError, match=f"step {step} after step 1"):
            ps.apply(Order(step, 0.5, False, False), 1, grad, sums)
    assert np.array_equal(ps.w, after_one) and ps.applied_step() == 1


# -- 6. metrics.csv rewritten in place ---------------------------------------------------------
def test_a_crash_while_metrics_csv_is_rewritten_leaves_it_whole(ray_address, make_job, tmp_path):
    job = make_job(name="w6", rows=100, train={"steps": 9, "checkpoint_every": 3})
    out = tmp_path / "runs" / "w6"
    died = cli(job, "--quiet", fault="checkpoint_write@6", address=ray_address)  # stops with rows 1..6, checkpoint 3
    assert died.returncode == 1, died.stderr
    before = (out / "metrics.csv").read_bytes()
    assert len(before.splitlines()) == 7
    crashed = cli(job, "--resume", "--quiet", fault="metrics_rewrite", address=ray_address)
    assert crashed.returncode == 3, crashed.stderr
    assert (out / "metrics.csv").read_bytes() in (before, b"".join(before.splitlines(keepends=True)[:4]))
    resumed = cli(job, "--resume", "--quiet", address=ray_address)
    assert resumed.returncode == 0, resumed.stderr
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # the crash's temporary file is gone too
    assert [int(r["step"]) for r in rows_of(out)] == list(range(1, 10))


# -- 7. exit codes after signals --------------------------------------------------------------
def start(job, *extra, fault=None, address=None):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    cmd = [sys.executable, "-m", "distbp", "run", str(job), *extra, *(["--address", address] if address else [])]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG = dict(rows=1000, train={"steps": 3000, "checkpoint_every": 10000, "optimizer": {"name": "adam", "lr": 0.01}})


def test_sigterm_checkpoints_and_exits_143(ray_address, make_job, tmp_path):
    """(The SIGINT test of test_reliability.py signals a run that started Ray itself.)"""
    job = make_job(name="term", **LONG)
    proc = start(job, "--quiet", address=ray_address)
    wait_for_rows(tmp_path / "runs" / "term" / "metrics.csv", 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("stopped: signal 15 after step") and "Traceback" not in err
    assert len(checkpoint.list_steps(str(tmp_path / "runs" / "term" / "checkpoints"))) == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_stops_at_once_with_its_own_exit_code(ray_address, make_job, tmp_path, sig, code):
    job = make_job(name="twice", **LONG)
    proc = start(job, "--quiet", fault="checkpoint_slow", address=ray_address)  # the checkpoint after the first signal stalls 4 s
    folder = tmp_path / "runs" / "twice" / "checkpoints"
    wait_for_rows(tmp_path / "runs" / "twice" / "metrics.csv", 20, proc)
    proc.send_signal(sig)
    seen = []
    for line in proc.stderr:  # until the checkpoint's write has begun (or the run ended)
        seen.append(line)
        if line.strip() == "fault: paused at checkpoint_slow":
            break
    assert seen and seen[-1].strip() == "fault: paused at checkpoint_slow", "".join(seen)
    assert [n for n in os.listdir(folder) if n.startswith(".tmp-")], os.listdir(folder)  # half-written, under its temporary name
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("stopped: ") and "second signal" in lines[-1] and "Traceback" not in err
    assert sorted(os.listdir(folder)) == []  # the half-written checkpoint is gone, none took its name



def processes_of_session(driver_pid):
    """The pids of Ray processes (daemons, workers) of the Ray session that the process
    `driver_pid` started: Ray names a session's folder session_<date>_<time>_<driver pid>."""
    mark = re.compile(rf"session_[\d_-]+_{driver_pid}\b".encode())
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.search(f.read()):
                    found.add(int(pid))
        except OSError:
            pass
    return found


def paused_then_signalled(proc, point, sig):
    """Wait for the run to pause at `point`, signal it, and return its stderr. The pause lasts
    10 minutes: only a run that stops at once ends within communicate's timeout."""
    line = proc.stderr.readline()
    assert line.strip() == f"fault: paused at {point}", line + proc.communicate()[1]
    assert processes_of_session(proc.pid)  # its Ray runs (so that the check after exit means something)
    proc.send_signal(sig)
    return proc.communicate(timeout=60)[1]


@pytest.mark.parametrize("point, sig", [("pause_ray", signal.SIGTERM), ("pause_actors", signal.SIGINT)])
def test_a_signal_during_start_up_stops_at_once_and_writes_nothing(make_job, tmp_path, point, sig):
    job = make_job(name="early", **LONG)
    proc = start(job, "--quiet", fault=point)
    err = paused_then_signalled(proc, point, sig)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"stopped: signal {sig} during start-up; nothing was trained or written", err
    assert not (tmp_path / "runs" / "early").exists()
    assert not processes_of_session(proc.pid)  # the run's own Ray went with it


def test_a_signal_while_a_resumed_run_starts_leaves_its_checkpoint_and_metrics_untouched(ray_address, make_job, tmp_path):
    job = make_job(name="again", rows=100, train={"steps": 6, "checkpoint_every": 3})
    out = tmp_path / "runs" / "again"
    assert cli(job, "--quiet", fault="model_written", address=ray_address).returncode == 3  # dies with the checkpoint of step 3 its newest
    kept = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    proc = start(job, "--resume", "--quiet", fault="pause_actors")
    err = paused_then_signalled(proc, "pause_actors", signal.SIGINT)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "stopped: signal 2 during start-up; the checkpoint of step 3 is untouched (continue with --resume)", err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == kept


# -- 8. training and prediction agree ---------------------------------------------------------
def test_predict_standardises_like_the_workers_bit_for_bit(ray_session, make_job, tmp_path):
    """A float32 model: predict casts to float32 first, then standardises, as the workers do."""
    from distbp.data import tables
    from distbp.api import spec_of
    from distbp.runtime.workers import ShardPlan, ShardWorker

    job_path = make_job(name="w8", rows=300, model={"layers": [2, 8, 3], "dtype": "float32"}, train={"steps": 3})
    result = Trainer(load(job_path)).run()
    model = load_model(result.model_path)
    job = load(job_path)
    source = tables.open_source(job.data_path())
    plan = ShardPlan(0, source, 0, source.num_rows, ("x0", "x1"), ("label",), "classification", spec_of(job), 1024, 1, job.seed)
    worker = ShardWorker(plan, [(0, model.spec.num_params)])
    worker.load()
    worker.prepare(model.classes, model.x_mean, model.x_std)
    x_worker = worker.sets["train"][0]
    table = source.read_rows(0, source.num_rows)
    x_raw = tables.features_to_numpy(table, ["x0", "x1"], np.float64)
    assert np.array_equal(model.standardized(x_raw), x_worker)
    from distbp.backprop import nn

    assert np.array_equal(model.predict_proba(x_raw), nn.predict(model.spec, model.params, x_worker))


# -- 9. validation is a forward pass only ------------------------------------------------------
def test_validation_rows_never_go_through_backprop(make_job, monkeypatch):
    from distbp.backprop import nn
    from distbp.data import tables
    from distbp.api import spec_of
    from distbp.runtime.messages import Order, rows_of, split_step_returns
    from distbp.runtime.workers import ShardPlan, ShardWorker

    job = load(make_job(name="w9", rows=200, data={"validation": 0.25}))
    source = tables.open_source(job.data_path())
    spec = spec_of(job)
    plan = ShardPlan(0, source, 0, 200, ("x0", "x1"), ("label",), "classification", spec, 64, 1, job.seed, validation_fraction=0.25)
    worker = ShardWorker(plan, [(0, spec.num_params)])
    summary = worker.load()
    worker.prepare([0, 1, 2], None, None)
    seen = []
    real = nn.grad_rows
    monkeypatch.setattr(nn, "grad_rows", lambda spec, params, x, *a, **k: seen.append(len(x)) or real(spec, params, x, *a, **k))
    params = nn.init_params(spec, np.random.default_rng(0))
    _, sums = split_step_returns(worker.step(Order(1, 0.1, True, False), params))
    assert seen == [summary.counts.rows["train"]]  # backprop over the training rows only
    assert sums.val is not None and rows_of(sums.val) == summary.counts.rows["val"] > 0
