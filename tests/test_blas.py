"""The same bits on every node: each worker's BLAS (library, version, kernel, threads) is
recorded in environment.json, a mix of kernels prints one warning line naming the nodes, and
cluster.blas_kernel pins one kernel on every worker, so that a node whose environment picks
another kernel (OPENBLAS_CORETYPE, as some machines set) still gives the embedded run's bits."""

import json
import os
import platform
import subprocess
import sys

import pytest

from distbp.runtime import blas
from distbp.api import load
from distbp.errors import JobError
from distbp.trainer import Trainer

from conftest import model_arrays
from test_scale_out import DRIVER, LOOPBACK_ONLY, ROOT


def report(rank, node, kernel, threads=1):
    return {"rank": rank, "node": node, "library": "openblas", "version": "0.3.31", "kernel": kernel, "threads": threads}


def test_differences_name_the_kernels_nodes_and_ranks():
    same = [report(0, "10.0.0.2", "Haswell"), report(1, "10.0.0.3", "Haswell")]
    assert blas.differences(same) is None
    assert blas.differences(same, previous=same) is None
    mixed = [report(0, "10.0.0.2", "Haswell"), report(1, "10.0.0.3", "SkylakeX"), report(2, "10.0.0.4", "Haswell")]
    line = blas.differences(mixed)
    assert "\n" not in line
    assert "Haswell with 1 thread on 10.0.0.2, 10.0.0.4 (ranks 0, 2)" in line
    assert "SkylakeX with 1 thread on 10.0.0.3 (rank 1)" in line and "cluster.blas_kernel" in line
    assert "thread" in blas.differences([report(0, "a", "Haswell"), report(1, "a", "Haswell", threads=2)])
    resumed = blas.differences(same, previous=[report(0, "10.0.0.2", "Sandybridge")])
    assert resumed.startswith("the run being resumed ran openblas 0.3.31 Sandybridge") and "this one runs" in resumed


def test_blas_kernel_key_takes_auto_or_a_kernel_name(make_job):
    assert load(make_job()).cluster.blas_kernel == "auto"
    assert load(make_job(), ["cluster.blas_kernel=Haswell"]).cluster.blas_kernel == "Haswell"
    for bad in ("", "Has well", "1x", "a/b"):
        with pytest.raises(JobError, match=r"cluster\.blas_kernel: expected auto or an OpenBLAS kernel name"):
            load(make_job(), [f"cluster.blas_kernel={bad}"])


def test_environment_json_records_each_worker(ray_session, make_job, tmp_path):
    result = Trainer(load(make_job(train={"steps": 3}), [f"output.dir={tmp_path / 'run'}"])).run()
    workers = json.loads((tmp_path / "run" / "environment.json").read_text())["workers"]
    here = blas.describe()
    assert [w["rank"] for w in workers] == [0, 1]
    assert all((w["library"], w["version"], w["kernel"]) == (here["library"], here["version"], here["kernel"]) for w in workers)
    assert all(w["threads"] == 1 and w["node"] == "127.0.0.1" for w in workers)  # cpus_per_worker 1
    assert result.steps == 3


def _kernel_of(env_value):
    """The kernel a fresh process runs with OPENBLAS_CORETYPE=env_value."""
    code = "import numpy, threadpoolctl; print([i['architecture'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'][0])"
    env = {**os.environ, blas.KERNEL_ENV: env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout.strip()


def other_kernel():
    """A kernel this CPU runs that is not the one this process runs, or None."""
    here, flags = blas.describe()["kernel"], blas.cpu_flags() or set()
    if platform.machine() not in ("x86_64", "AMD64") or here is None:
        return None
    for name in ("Sandybridge", "Haswell", "Nehalem", "Prescott"):
        needs = blas.NEEDS_FLAGS.get(name.lower(), ())
        if name.lower() != here.lower() and all(f in flags for f in needs) and _kernel_of(name) == name:
            return name
    return None


def test_a_node_whose_environment_picks_another_kernel_warns_and_the_pin_gives_the_embedded_bits(ray_session, make_job, tmp_path):
    """A 3-node cluster whose last node's Ray runs with OPENBLAS_CORETYPE set to another kernel
    (as a machine whose environment sets it, joined over ssh by one that does not): with auto,
    the run warns and names that node's kernel; pinned to this process's kernel, it gives the
    bits of the embedded run."""
    other = other_kernel()
    if other is None:
        pytest.skip("needs an x86-64 OpenBLAS with a second kernel this CPU runs")
    here = blas.describe()["kernel"]
    job = make_job(name="mixed", rows=400, train={"steps": 20, "optimizer": {"name": "adam", "lr": 0.01}}, cluster={"workers": 3})
    want = model_arrays(Trainer(load(job, [f"output.dir={tmp_path / 'embedded'}"])).run().model_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **LOOPBACK_ONLY}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(job), str(tmp_path / "cluster"), "--cli", "--runs", "2",
         "--node-env", f"{blas.KERNEL_ENV}={other}", "--run-set", f"1:cluster.blas_kernel={here}"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    auto, pinned = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])["runs"]
    # auto: each worker runs what its node picks; 3 workers on 3 one-CPU nodes, so one runs `other`.
    warnings = [line for line in auto["stderr"].splitlines() if "BLAS" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the workers run different BLAS builds or kernels"), auto["stderr"]
    assert f" {other} with 1 thread on 127.0.0.1 (rank " in warnings[0] and f" {here} with 1 thread" in warnings[0]
    ran = json.loads((tmp_path / "cluster" / "run-0" / "environment.json").read_text())["workers"]
    assert sorted(w["kernel"] for w in ran) == sorted([here, here, other])
    # pinned: no warning, every worker runs this process's kernel, and the embedded run's bits.
    assert "warning" not in pinned["stderr"], pinned["stderr"]
    ran = json.loads((tmp_path / "cluster" / "run-1" / "environment.json").read_text())["workers"]
    assert [w["kernel"] for w in ran] == [here] * 3
    got = model_arrays(pinned["model"])
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_a_pinned_kernel_the_cpu_cannot_run_is_one_line_and_exit_2(ray_address, make_job, tmp_path):
    """SkylakeX needs AVX-512: on a CPU without it the worker would die of SIGILL in its first
    product. The pin is checked before any, and nothing is written."""
    flags = blas.cpu_flags()
    if flags is None or "avx512f" in flags or platform.machine() != "x86_64":
        pytest.skip("needs an x86-64 CPU without AVX-512")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "distbp", "run", str(make_job()), "--out", str(out), "--set", "cluster.blas_kernel=SkylakeX", "--address", ray_address],
        capture_output=True, text=True, timeout=180, env={**os.environ, **LOOPBACK_ONLY},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cluster.blas_kernel: node 127.0.0.1's CPU cannot run the SkylakeX kernel (it lacks avx512f, avx512bw, avx512dq, avx512vl) (pin a kernel every node runs, or use auto)"
    ]
    assert not out.exists()
