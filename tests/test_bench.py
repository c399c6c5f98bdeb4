"""`distbp bench` produces the report docs/bench.md describes (speed itself is never asserted)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from distbp import bench
from distbp.backprop import nn

KEYS = [
    "workload", "workers", "threads_per_worker", "steps", "sec_per_step", "sec_per_step_min", "ceiling_sec",
    "ceiling_ratio", "gflops_nominal", "compute_sec", "comm_overhead_sec", "startup_sec", "pss_mb_total",
    "rss_mb_driver", "rss_mb_worker_max",
]


def test_bench_json_holds_every_key_with_positive_numbers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    cmd = [sys.executable, "-m", "distbp", "bench", "--workload", "tiny", "--steps", "3", "--warmup", "1", "--max-workers", "2", "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {"cores", "blas", "numpy", "ray", "pyarrow"} <= set(report["machine"])
    distributed = [r for r in report["results"] if r["mode"] == "distributed"]
    assert [r["workers"] for r in distributed] == [1, 2]
    for r in distributed:
        for key in KEYS:
            assert key in r, key
            if not isinstance(r[key], str):
                assert r[key] > 0 or key == "comm_overhead_sec", (key, r[key])
        assert r["engine"] == "direct"  # the default engine, as distbp run uses it
        assert set(r["phases"]) == {"imports", "ray_start", "actor_start", "data_read", "first_step", "plot", "shutdown"}
        assert r["phases"]["ray_start"] > 0 and r["phases"]["first_step"] > 0 and r["phases"]["shutdown"] > 0
    single = next(r for r in report["results"] if r["mode"] == "single process")
    assert single["sec_per_step"] > 0 and single["ceiling_ratio"] > 0


def test_steps_are_chosen_by_time_for_millisecond_workloads():
    assert bench.step_count(0.003) == 1000  # 3 ms steps: 3 s of them
    assert bench.step_count(0.0001) == bench.MAX_STEPS  # 0.1 ms steps: the cap, not 30,000
    assert bench.step_count(1.5) == 10  # second-scale steps: the floor
    assert bench.steps_for(bench.workload_spec("tiny"), 256, 2, steps=7) == 7  # --steps wins


def test_batch512_is_the_teacher_network_on_the_first_512_rows_of_its_data():
    teacher, batch = bench.WORKLOADS["teacher"], bench.WORKLOADS["batch512"]
    assert batch["rows"] == 512 and {k: v for k, v in batch.items() if k != "rows"} == {k: v for k, v in teacher.items() if k != "rows"}
    x_teacher, y_teacher = bench.workload_data(teacher["layers"], 2000)
    x_batch, y_batch = bench.workload_data(batch["layers"], 512)
    assert np.array_equal(x_batch, x_teacher[:512]) and np.array_equal(y_batch, y_teacher[:512])


def test_ceiling_times_exactly_the_products_a_step_needs(monkeypatch):
    calls = []
    real = np.matmul

    def counting(a, b, out=None):
        calls.append((a.shape, b.shape))
        return real(a, b, out=out)

    from distbp.bench import harness

    monkeypatch.setattr(harness.np, "matmul", counting)
    spec = nn.Spec((5, 4, 3, 2), "tanh", dtype="float64")
    bench.ceiling_sec(spec, rows=7, threads=1, repeats=1)
    per_pass = calls[: len(calls) // 2]  # one warm-up pass, then one timed pass
    assert per_pass == [
        ((7, 5), (5, 4)), ((5, 7), (7, 4)),  # layer 1: forward, weight gradient (no input gradient)
        ((7, 4), (4, 3)), ((4, 7), (7, 3)), ((7, 3), (3, 4)),  # layer 2: + input gradient
        ((7, 3), (3, 2)), ((3, 7), (7, 2)), ((7, 2), (2, 3)),  # layer 3
    ]


def test_scaling_model_follows_its_formula():
    report = {
        "spec": {"num_params": 1_000_000, "itemsize": 4},
        "results": [
            {"workers": 0, "gflops_nominal": 50.0, "sec_per_step": 2.0},  # 100 GFLOP a step
            {"workers": 1, "sec_per_step": 2.01, "compute_sec": 2.0},  # 10 ms fixed
        ],
    }
    model = bench.scaling_model(report, bandwidth_gbit=8.0, workers=(1, 100), servers=(1, 4))
    link = 1e9 * 1448 / 1514  # 8 Gb/s, in TCP payload bytes/s at MTU 1500
    k1, k100 = model["rows"]
    # weights out, then gradients in: both directions' bytes in turn
    assert k1["ps1_sec"] == pytest.approx(2.0 + 0.01 + 2 * 4e6 / link)
    assert k100["compute_sec"] == pytest.approx(0.02)
    assert k100["ps1_sec"] == pytest.approx(0.02 + 0.01 + 2 * 100 * 4e6 / link)
    assert k100["ps4_sec"] == pytest.approx(0.02 + 0.01 + 2 * 25 * 4e6 / link)
    assert k100["ring_allreduce_sec"] == pytest.approx(0.02 + 0.01 + 2 * 0.99 * 4e6 / link)
    assert (k1["ps1_bound"], k100["ps1_bound"]) == ("compute", "server")


def result(workers, sec, ceiling, compute=None):
    return {"workload": "tiny", "workers": workers, "engine": "direct", "steps": 100, "sec_per_step": sec, "sec_per_step_min": sec,
            "ceiling_sec": ceiling, "ceiling_ratio": sec / ceiling, "gflops_nominal": 1.0, "compute_sec": compute or sec / 2,
            "comm_overhead_sec": sec / 2, "startup_sec": 5.0, "pss_mb_total": 300.0, "rss_mb_worker_max": 120.0}


def test_figures_a_busy_machine_made_are_flagged_and_milliseconds_stay_plain():
    """The trial's report on 2 loaded cores: a 2-thread ceiling slower than the 1-thread one,
    2 workers at 0.27x their ceiling and 2.15x as fast as 1 process."""
    report = {"machine": {"cores": 2}, "results": [
        result(0, 0.0043, 0.0004), result(1, 0.0030, 0.0004), result(2, 0.0020, 0.0074),
    ]}
    warnings = bench.flags(report)
    assert any("the 2-thread ceiling (7.40 ms) is slower than the 1-thread one (0.400 ms)" in w for w in warnings), warnings
    assert any("2 workers ran at 0.27x its ceiling" in w for w in warnings), warnings
    assert any("2 workers are 2.15x as fast as 1 process on 2 cores" in w for w in warnings), warnings
    assert all(w.startswith("warning: tiny: ") for w in warnings)
    calm = {"machine": {"cores": 2}, "results": [result(0, 0.010, 0.004), result(1, 0.011, 0.004), result(2, 0.006, 0.0022)]}
    assert bench.flags(calm) == []
    report["results"].append({**result(2, 1.234, 2.5), "workers": 3, "sec_per_step": 1234.5})
    text = bench.table(report)
    assert "e+" not in text and "e-" not in text and "1234500" in text
    assert "x ceiling: ms/step / ceiling ms" in text
    assert bench.ms(0.0000123) == "0.012" and bench.ms(0.0123) == "12.3" and bench.ms(1.5) == "1500"
