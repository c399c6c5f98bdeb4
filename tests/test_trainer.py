"""The distributed runner against one process: same gradient, same weights, same bits."""

import glob
import os
import socket
import time

import numpy as np
import pytest

from distbp.backprop import nn
from distbp.data import tables
from distbp.api import load, spec_of as trainer_spec
from distbp.data.checks import prepare
from distbp.runtime.messages import Order, apply_parts, rows_of
from distbp.trainer import Trainer

from conftest import model_arrays


def single_process_mean_gradient(job, model, params):
    """The oracle: the whole table in one process, standardised with the run's statistics."""
    source = tables.open_source(job.data_path())
    table = source.read_rows(0, source.num_rows)
    x = model.standardized(tables.features_to_numpy(table, model.features, np.float64))
    y = tables.encode_labels(tables.label_values(table, "label"), model.classes)
    result = nn.grad_rows(model.spec, params, x, y)
    return result.grad / result.count


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_assembled_gradient_equals_one_process(ray_session, make_job, workers):
    ray = ray_session
    job = load(make_job(rows=301), [f"cluster.workers={workers}"])  # 301 rows: uneven shards
    trainer = Trainer(job)
    try:
        trainer.setup(prepare(job))
        weights = [s.weights.remote() for s in trainer.servers]
        outs = [w.step.options(num_returns=2).remote(Order(1, 0.0, False, False), *weights) for w in trainer.workers]
        counts = [int(rows_of(ray.get(o[1]).train)) for o in outs]
        assert sum(counts) == 301 and len(set(counts)) == (1 if workers == 1 else 2)
        got, _ = ray.get(trainer.servers[0].assemble.remote(*apply_parts([o[0] for o in outs], [o[1] for o in outs])))
        params = np.concatenate(ray.get(weights))
    finally:
        trainer.close()
    want = single_process_mean_gradient(job, trainer.model, params)
    assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want)


def test_weights_after_20_sgd_steps_agree_across_worker_counts(ray_session, make_job):
    finals = {}
    for workers in (1, 2, 3):
        job = load(make_job(rows=301, name=f"k{workers}"), [f"cluster.workers={workers}", "train.steps=20"])
        result = Trainer(job).run()
        finals[workers] = model_arrays(result.model_path)
    for workers in (2, 3):
        for key in ("W1", "b1", "W2", "b2", "W3", "b3"):
            a, b = finals[workers][key], finals[1][key]
            assert np.linalg.norm(a - b) <= 1e-9 * np.linalg.norm(b), (workers, key)
    start = nn.init_params(trainer_spec(load(make_job(rows=301, name="k1"))), np.random.default_rng(3))
    assert not np.allclose(nn.views(trainer_spec(load(make_job(rows=301, name="k1"))), start)[0][0], finals[1]["W1"])


def test_same_worker_count_gives_bit_identical_weights(ray_session, make_job):
    runs = []
    for name in ("a", "b"):
        job = load(make_job(rows=200, name=name, model={"dtype": "float32"}, train={"optimizer": {"name": "adam", "lr": 0.01}}), ["cluster.workers=3", "train.steps=15"])
        runs.append(model_arrays(Trainer(job).run().model_path))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert np.array_equal(runs[0][key], runs[1][key]), key


def test_parameter_servers_split_the_vector_without_changing_bits(ray_session, make_job):
    runs = {}
    for servers in (1, 3, "per_worker"):
        job = load(make_job(rows=200, name=f"s{servers}", train={"optimizer": {"name": "adam", "lr": 0.01}}), [f"cluster.parameter_servers={servers}"])
        runs[servers] = model_arrays(Trainer(job).run().model_path)
    for key in runs[1]:
        if key != "spec":
            assert np.array_equal(runs[1][key], runs[3][key]), key
            assert np.array_equal(runs[1][key], runs["per_worker"][key]), key


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="Linux names a socket's congestion control")
def test_the_links_use_the_congestion_control_of_cluster_tcp_congestion(ray_session, make_job):
    """The direct engine's links, as the workers' own sockets report it: Reno with auto, the
    kernel's default with system; the weights do not depend on it."""
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        default = f.read().strip()
    runs = {}
    for choice, want in (("auto", "reno"), ("system", default)):
        trainer = Trainer(load(make_job(rows=120, name=f"cc-{choice}"), ["train.steps=4", f"cluster.tcp_congestion={choice}"]))
        runs[choice] = model_arrays(trainer.run().model_path)
        assert trainer.engine.congestion == [want]
    assert all(np.array_equal(runs["auto"][k], runs["system"][k]) for k in runs["auto"] if k != "spec")


def test_run_folder_outputs(ray_session, make_job):
    import csv
    import json

    import yaml

    job = load(make_job(rows=120, name="out"), ["train.steps=6"])
    result = Trainer(job).run()
    rows = list(csv.DictReader(open(f"{result.out_dir}/metrics.csv")))
    assert list(rows[0]) == ["step", "loss", "accuracy", "seconds", "lr", "workers"] + [f"{k}_{l}" for k in ("grad_norm", "delta_mean") for l in (1, 2, 3)]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["workers"] == "2" for r in rows)  # the shard workers whose gradients made each step
    assert all(r["grad_norm_1"] == "" for r in rows if int(r["step"]) % 2)
    assert all(float(r["grad_norm_3"]) > 0 and float(r["delta_mean_1"]) > 0 for r in rows if int(r["step"]) % 2 == 0)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    resolved = yaml.safe_load(open(f"{result.out_dir}/job.yaml"))
    assert resolved["train"]["steps"] == 6 and resolved["data"]["path"].startswith("/")
    arrays = model_arrays(result.model_path)
    spec = json.loads(str(arrays["spec"]))
    assert spec["format_version"] == 1 and spec["classes"] == [0, 1, 2] and spec["features"] == ["x0", "x1"]
    assert arrays["W1"].shape == (2, 8) and arrays["b3"].shape == (3,) and "x_mean" in arrays


@pytest.mark.parametrize("servers", [1, 2])
def test_direct_engine_gives_the_same_bits_as_tasks(ray_session, make_job, monkeypatch, servers):
    runs = {}
    train = {"optimizer": {"name": "adam", "lr": 0.01}, "steps": 40, "checkpoint_every": 15,
             "early_stopping": {"patience": 50}, "eval_every": 4}
    monkeypatch.delenv("DISTBP_ENGINE", raising=False)
    for engine in ("tasks", "direct"):
        job = load(make_job(rows=200, name=f"e-{engine}-{servers}", data={"validation": 0.25}, train=train),
                   [f"cluster.parameter_servers={servers}", f"cluster.engine={engine}"])
        result = Trainer(job).run()
        assert result.engine == engine  # the engine asked for really ran: no silent fallback
        runs[engine] = (model_arrays(result.model_path), open(result.metrics_path).read().splitlines())
    (a, rows_a), (b, rows_b) = runs["tasks"], runs["direct"]
    assert not glob.glob("/dev/shm/distbp-*")  # shared segments lose their names once mapped
    assert all(np.array_equal(a[k], b[k]) for k in a)
    strip = lambda rows: [",".join(c for i, c in enumerate(r.split(",")) if i != 3) for r in rows]  # noqa: E731 (drop seconds)
    assert strip(rows_a) == strip(rows_b) and len(rows_a) == 41  # same losses, validation and per-layer norms


def test_a_link_set_up_ended_part_way_leaves_no_shared_memory_behind(ray_session):
    """A parameter actor that made its weights segment and then ended before any worker mapped
    it (a set-up that failed, a recovery that killed it): nothing is left in /dev/shm, and the
    segment goes with the process."""
    import ray

    from distbp.runtime import shm
    from distbp.runtime.calls import remote_class
    from distbp.runtime.server import ParameterServer

    before = set(os.listdir("/dev/shm"))
    w = np.arange(1000, dtype=np.float64)
    server = remote_class(ParameterServer).options(num_cpus=0).remote(w, dict(name="sgd"), layer_bounds=[(0, 0, 1000)])
    path = ray.get(server.listen.remote(True)).segment
    seen = shm.attach(path, 1000, np.float64)  # another process maps the weights: a real segment
    assert np.array_equal(seen, w) and not seen.flags.writeable
    assert set(os.listdir("/dev/shm")) <= before  # it never had a name there
    ray.kill(server)
    pid = int(path.split("/")[2])
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(path) and set(os.listdir("/dev/shm")) <= before
    assert np.array_equal(seen, w)  # a mapping stays valid after its creator ended


def test_an_unknown_engine_is_refused_in_one_line(make_job, monkeypatch):
    from click.testing import CliRunner

    from distbp.cli import main

    job = str(make_job(rows=50, name="eng"))
    result = CliRunner().invoke(main, ["run", job, "--quiet", "--set", "cluster.engine=graph"])
    assert result.exit_code == 2 and "cluster.engine: expected one of direct | tasks, got 'graph'" in result.output, result.output
    monkeypatch.setenv("DISTBP_ENGINE", "graph")  # the override is checked as well
    result = CliRunner().invoke(main, ["run", job, "--quiet"])
    assert result.exit_code == 2 and "DISTBP_ENGINE: expected one of direct, tasks, got 'graph'" in result.output


@pytest.mark.parametrize("k", [1, 2, 5])
def test_the_one_reduce_adds_in_rank_order_whatever_feeds_it(k):
    """Both engines' sum: a list, an iterator that reuses one buffer, or a first slice that is
    the output itself give the bits of the plain left-to-right sum, which differ from another
    order's (float addition does not associate)."""
    from distbp.runtime.messages import rank_order_sum

    rng = np.random.default_rng(k)
    grads = [(rng.standard_normal(1000) * 10.0 ** rng.integers(-3, 4, 1000)).astype(np.float32) for _ in range(k)]
    want = grads[0].copy()
    for g in grads[1:]:
        want = want + g
    assert np.array_equal(rank_order_sum(grads, np.empty(1000, np.float32)), want)
    buffer, out = np.empty(1000, np.float32), np.empty(1000, np.float32)

    def arriving():  # the direct engine's reads: the first into `out`, the others into one buffer
        for i, g in enumerate(grads):
            target = out if i == 0 else buffer
            np.copyto(target, g)
            yield target

    assert np.array_equal(rank_order_sum(arriving(), out), want)
    if k == 5:
        backwards = grads[-1].copy()
        for g in grads[-2::-1]:
            backwards = backwards + g
        assert not np.array_equal(backwards, want)  # so the order is what the test checks
