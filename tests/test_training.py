"""Mini-batches, epochs, schedules, validation, early stopping, per-layer norms, the API."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import distbp
from distbp.backprop import nn, schedule
from distbp.data import tables, rowmath, sampling
from distbp.api import load
from distbp.cli import main
from distbp.data.checks import prepare
from distbp.runtime.messages import Order, apply_parts
from distbp.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def whole_table(job, model):
    source = tables.open_source(job.data_path())
    table = source.read_rows(0, source.num_rows)
    x = model.standardized(tables.features_to_numpy(table, model.features, np.float64))
    return x, tables.encode_labels(tables.label_values(table, "label"), model.classes)


def rows(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_mini_batch_step_equals_one_process_on_the_same_rows(ray_session, make_job, workers):
    ray = ray_session
    job = load(make_job(rows=301, train={"batch": 37}), [f"cluster.workers={workers}"])
    trainer = Trainer(job)
    try:
        trainer.setup(prepare(job))
        x, y = whole_table(job, trainer.model)
        weights = [s.weights.remote() for s in trainer.servers]
        params = np.concatenate(ray.get(weights))
        for step in (1, 5, 9):  # 9 is the partial last batch of epoch 0 (301 = 8 * 37 + 5)
            chosen = np.sort(np.concatenate(ray.get([w.batch_rows.remote(step) for w in trainer.workers])))
            epoch, index = sampling.epoch_and_index(step, 301, 37)
            assert np.array_equal(chosen, sampling.batch_ordinals(job.seed, epoch, index, 37, 301))
            assert len(chosen) == (5 if step == 9 else 37)
            outs = [w.step.options(num_returns=2).remote(Order(step, 0.0, False, False), *weights) for w in trainer.workers]
            got, _ = ray.get(trainer.servers[0].assemble.remote(*apply_parts([o[0] for o in outs], [o[1] for o in outs])))
            oracle = nn.grad_rows(trainer.model.spec, params, x[chosen], y[chosen])
            want = oracle.grad / oracle.count
            assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want)
    finally:
        trainer.close()


@pytest.mark.parametrize("workers,rows_,batch", [(1, 100, 7), (3, 101, 10), (3, 50, 64), (2, 257, 256)])
def test_an_epoch_uses_every_training_row_exactly_once(ray_session, make_job, workers, rows_, batch):
    ray = ray_session
    job = load(make_job(rows=rows_, train={"batch": batch}), [f"cluster.workers={workers}"])
    trainer = Trainer(job)
    try:
        trainer.setup(prepare(job))
        steps = sampling.steps_per_epoch(rows_, batch)
        used = np.concatenate([r for step in range(1, steps + 1) for r in ray.get([w.batch_rows.remote(step) for w in trainer.workers])])
    finally:
        trainer.close()
    assert np.array_equal(np.sort(used), np.arange(rows_))


def test_epochs_set_the_step_count_and_lr_follows_the_schedule(ray_session, make_job):
    sched = {"name": "step", "gamma": 0.5, "every": 4, "warmup_steps": 3}
    job = load(make_job(rows=120, name="ep", train={"steps": None, "epochs": 3, "batch": 25, "schedule": sched}))
    result = Trainer(job).run()
    got = rows(result.metrics_path)
    assert result.steps == len(got) == 3 * 5
    for row in got:
        assert float(row["lr"]) == pytest.approx(schedule.learning_rate(int(row["step"]), 0.5, job.train.schedule, 15), rel=1e-12)
    assert [float(r["lr"]) for r in got[:8]] == pytest.approx([0.5 / 3, 1 / 3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25])


def test_per_layer_norms_match_one_process(ray_session, make_job):
    job = load(make_job(rows=90, name="norms", train={"steps": 2, "eval_every": 1}))
    trainer = Trainer(job)
    result = trainer.run()
    spec, got = trainer.model.spec, rows(result.metrics_path)
    x, y = whole_table(job, trainer.model)
    params = nn.init_params(spec, np.random.default_rng(job.seed))
    for row in got:
        oracle = nn.grad_rows(spec, params, x, y, track_deltas=True)
        mean_grad = oracle.grad / oracle.count
        for l, (gw, gb) in enumerate(nn.views(spec, mean_grad), start=1):
            norm = np.sqrt(np.sum(gw * gw) + np.sum(gb * gb))
            assert float(row[f"grad_norm_{l}"]) == pytest.approx(norm, rel=1e-10)
            assert float(row[f"delta_mean_{l}"]) == pytest.approx(oracle.delta_abs[l - 1] / (90 * spec.layers[l]), rel=1e-10)
        params = params - 0.5 * mean_grad  # the job's sgd step


def test_early_stopping_keeps_the_best_validation_weights(ray_session, make_job, tmp_path):
    # Few noisy rows, a wide net and a large step size: validation loss turns up early.
    path = tmp_path / "noisy.parquet"
    import pyarrow as pa

    rng = np.random.default_rng(5)
    x = rng.normal(size=(160, 2))
    label = np.where(rng.random(160) < 0.7, (x[:, 0] > 0).astype(int), rng.integers(0, 3, 160))  # 30% noise
    tables.write_table(pa.table({"x0": x[:, 0], "x1": x[:, 1], "label": label}), str(path))
    job = load(make_job(
        name="early", data={"path": str(path), "validation": 0.5},
        model={"layers": [2, 64, 64, 3], "activation": "relu"},
        train={"steps": 400, "eval_every": 5, "checkpoint_every": 1000, "optimizer": {"name": "adam", "lr": 0.05},
               "early_stopping": {"metric": "val_loss", "patience": 4}},
    ))
    trainer = Trainer(job)
    result = trainer.run()
    assert result.stopped_early and result.steps < 400
    got = [r for r in rows(result.metrics_path) if r["val_loss"]]
    best = min(got, key=lambda r: float(r["val_loss"]))
    assert int(got[-1]["step"]) == int(best["step"]) + 4 * 5  # patience evaluations after the best
    model = distbp.load_model(result.model_path)
    source = tables.open_source(str(path))
    whole = source.read_rows(0, source.num_rows)
    held_out = rowmath.validation_mask(0, source.num_rows, 0.5, job.seed)
    x = tables.features_to_numpy(whole, model.features, np.float64)[held_out]
    y = tables.encode_labels(tables.label_values(whole, "label"), model.classes)[held_out]
    loss_sum, _ = nn.evaluate(model.spec, model.params, model.standardized(x), y)
    assert loss_sum / len(y) == pytest.approx(float(best["val_loss"]), rel=1e-9)
    assert loss_sum / len(y) < float(got[-1]["val_loss"])  # not the last weights
    # the closing summary measures those saved weights, and says which they are
    assert result.best_step == int(best["step"]) and result.final["val_loss"] == float(best["val_loss"])
    from distbp.cli import closing_line

    assert "(early stop) in " in closing_line(result)
    assert f"model.npz holds the best validation weights, evaluated at step {best['step']}: " in closing_line(result)


def test_plot_command_writes_a_png(ray_session, make_job):
    result = Trainer(load(make_job(rows=60, name="plot", output={"plot": True}))).run()
    os.unlink(result.plot_path)
    out = Path(result.out_dir) / "curves.png"
    cli = CliRunner().invoke(main, ["plot", result.out_dir, "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    blob = out.read_bytes()
    assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 10_000


def test_python_api_train_and_load_model(ray_session, make_job):
    result = distbp.train(str(make_job(rows=150, name="api")), train__steps=30, cluster__workers=1)
    assert result.metrics.num_rows == 30 and "loss" in result.metrics.column_names
    assert result.last_row["step"] == 30 and os.path.exists(result.checkpoint_path)
    model = distbp.load_model(result.model_path)
    source = tables.open_source(load(make_job(rows=150, name="api")).data_path())
    x = tables.features_to_numpy(source.read_rows(0, 150), ["x0", "x1"], np.float64)
    proba = model.predict_proba(x)
    assert proba.shape == (150, 3) and np.allclose(proba.sum(axis=1), 1)
    assert list(model.predict(x)) == list(np.array(model.classes)[proba.argmax(axis=1)])


def test_digits_reaches_96_percent_validation_accuracy(ray_session, tmp_path, monkeypatch):
    """The whole digits job, through the command in this process on the session's Ray (the
    examples' tests run it as a subprocess, cut to 2 epochs)."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "digits.yaml").write_text((ROOT / "jobs" / "digits.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke(main, ["run", "jobs/digits.yaml", "--quiet"])
    assert run.exit_code == 0, run.output
    last = [r for r in rows(tmp_path / "runs" / "digits" / "metrics.csv") if r["val_accuracy"]][-1]
    assert float(last["val_accuracy"]) >= 0.96
