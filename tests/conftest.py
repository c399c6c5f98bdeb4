"""Shared fixtures: one real local Ray per test session, loopback only, fixed num_cpus."""

import json
import os
import socket
import sys

# Ray reads this when it is first imported: loopback mode, never the machine's address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# No Ray started by the tests (or by the CLI runs they start) talks to anything but 127.0.0.1:
# usage stats off, and the cloud-metadata probes of Ray's daemons sent to a closed local port.
from distbp.runtime.cluster import QUIET_DAEMONS  # noqa: E402

os.environ.update(QUIET_DAEMONS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

NUM_CPUS = 4

# The fast lane, `python -m pytest -m fast`: the math, job-file, data and file-format tests of
# these files that start no Ray (under a minute, for the edit-test loop). The whole suite is
# still the verdict on a change.
FAST_FILES = {
    "test_nn.py", "test_gradcheck.py", "test_optim.py", "test_schedule.py", "test_job.py", "test_data.py",
    "test_sampling.py", "test_fuzz.py", "test_bad_input.py", "test_export.py", "test_link.py",
    "test_progress.py", "test_plot.py", "test_imports.py",
}


def pytest_configure(config):
    """Where the environment turns bytecode caching off (PYTHONDONTWRITEBYTECODE), each of the
    suite's processes (several hundred: Ray workers, CLI runs, cluster drivers) would compile
    distbp's modules again, about 0.05 CPU-seconds each: the controller compiles them once."""
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        import compileall

        import distbp

        compileall.compile_dir(os.path.dirname(distbp.__file__), quiet=1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in FAST_FILES and "ray_session" not in item.fixturenames:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def ray_session():
    """The test session's Ray: started once, embedded, loopback only, with NUM_CPUS CPUs, by
    distbp.init as a user's notebook may start it. It is distbp's own Ray then, so the Python
    API and the estimators keep idle actors in it between calls, as they do for users."""
    import ray

    import distbp

    distbp.init(num_cpus=NUM_CPUS)
    yield ray
    distbp.shutdown()
    ray.shutdown()  # if a test started one of its own


@pytest.fixture
def ray_address(ray_session):
    """The session Ray's address: CLI subprocesses join it with --address instead of starting
    Ray of their own (4-6 s each on 2 cores). The tests of the embedded start itself (signals
    while it starts, loopback only, the examples as the README runs them) leave it out."""
    from distbp.runtime.actors import end_idle

    end_idle()  # the idle actors of this process's earlier runs would hold CPUs the subprocess needs
    return ray_session.get_runtime_context().gcs_address


def write_job(folder, kind="spirals", rows=300, fmt="parquet", name="t", make_options=None, **sections):
    """Write a small job file (and its data) under `folder`; returns the job path. `sections`
    are dicts merged into the defaults below. Its runs draw no plot (`output.plot: false`):
    matplotlib costs a new process about 0.8 CPU-seconds, and a suite of a few hundred runs
    on 2 cores is CPU-bound. The tests of the plot ask for it, as do the jobs in jobs/."""
    from distbp.data import tables, datasets

    options = make_options or ({"classes": 3} if kind == "spirals" else {})
    path = folder / f"{kind}-{rows}.{fmt}"
    if not path.exists():
        tables.write_table(datasets.make_dataset(kind, rows, seed=1, **options), str(path), row_group_size=64)
    job = {
        "name": name,
        "seed": 3,
        "data": {"path": path.name, "label": "label"},
        "model": {"layers": [2, 8, 8, 3], "activation": "tanh", "dtype": "float64"},
        "train": {"steps": 5, "optimizer": {"name": "sgd", "lr": 0.5}, "eval_every": 2, "checkpoint_every": 3},
        "cluster": {"workers": 2, "chunk_rows": 64},
        "output": {"dir": str(folder / "runs" / name), "plot": False},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    job_path = folder / f"{name}.yaml"
    job_path.write_text(yaml.safe_dump(job))
    return job_path


@pytest.fixture
def make_job(tmp_path):
    """`make_job(kind="spirals", rows=300, fmt="parquet", **sections)`: write_job under tmp_path."""
    return lambda *args, **kwargs: write_job(tmp_path, *args, **kwargs)


def plan_file(folder, plan):
    """Write `plan` ({name: [cluster_driver.py flags]}) as folder/plan.json for
    cluster_driver.py --plan; returns its path."""
    (folder / "plan.json").write_text(json.dumps(plan))
    return str(folder / "plan.json")


def model_arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def wait_for_rows(metrics, rows, proc, timeout=120):
    """Wait until the run of `proc` has written more than `rows` rows to `metrics`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not get going")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
