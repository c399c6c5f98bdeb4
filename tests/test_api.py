"""The Python API's Ray: the first distbp.train of a process starts an embedded Ray and keeps
it for the later calls, with the run's actors idle for the next; distbp.shutdown() (or exit)
ends it; a Ray the caller started stays, and no idle actor waits in it."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import distbp
from distbp.errors import UsageError

# ray is imported after the first distbp.train: a process that imports it first has chosen Ray's
# mode itself, and its Rays would listen on the machine's addresses, not on loopback only.
SCRIPT = r"""
import json, sys
import numpy as np
import distbp

job, out = sys.argv[1], sys.argv[2]
report = {}

def train(name, **extra):
    result = distbp.train(job, output__dir=f"{out}/{name}", output__plot=False, **extra)
    import ray
    with np.load(result.model_path) as z:
        weights = {k: z[k].tobytes().hex() for k in z.files}
    return {"ray_start": result.phases["ray_start"], "gcs": ray.get_runtime_context().gcs_address, "weights": weights}

def idle_pids():  # the processes of the actors kept for the next call
    import ray
    from distbp.runtime.actors import _IDLE
    return sorted(w["pid"] for w in ray.get([a.where.remote() for a in _IDLE["workers"] + _IDLE["servers"]]))

report["first"] = train("first")
import ray
report["idle_first"] = idle_pids()
report["second"] = train("second")
report["idle_second"] = idle_pids()
report["other_shapes"] = train("other", model__layers=[2, 5, 3], cluster__workers=3)
report["again"] = train("again")
report["more_cpus"] = train("more", cluster__workers=int(ray.cluster_resources()["CPU"]) + 1)
distbp.shutdown()
report["after_shutdown"] = ray.is_initialized()
ray.init(address="local", num_cpus=3, include_dashboard=False)
report["theirs"] = train("theirs")
report["idle_theirs"] = idle_pids()
distbp.shutdown()
report["theirs_after_shutdown"] = ray.is_initialized()
import psutil  # what the caller's Ray, started after distbp chose loopback mode, listens on
listening = set()
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        listening |= {c.laddr.ip for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
report["listening"] = sorted(listening)
print(json.dumps(report))
"""


def test_train_keeps_one_embedded_ray_until_shutdown_and_leaves_the_callers_alone(make_job, tmp_path):
    job = make_job(name="api", rows=120, train={"steps": 4})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(job), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    first, second, more, theirs = report["first"], report["second"], report["more_cpus"], report["theirs"]
    assert first["ray_start"] > 0 and second["ray_start"] == 0  # the second call found the first one's Ray
    assert second["gcs"] == first["gcs"] and second["weights"] == first["weights"]
    # the second call renewed the first one's actors (2 workers, 1 parameter actor) instead of
    # starting new ones, and a call of other shapes and worker count between changes no bit
    assert len(report["idle_first"]) == 3 and report["idle_second"] == report["idle_first"]
    assert report["other_shapes"]["weights"] != first["weights"] and report["again"]["weights"] == first["weights"]
    assert more["gcs"] != first["gcs"] and more["ray_start"] > 0  # too few CPUs: a new embedded Ray
    assert report["after_shutdown"] is False
    assert theirs["ray_start"] == 0 and theirs["weights"] == first["weights"]
    assert report["idle_theirs"] == []  # no idle actor holds a CPU of the caller's Ray
    assert report["theirs_after_shutdown"] is True  # the caller's Ray is not distbp's to shut down
    assert report["listening"] and set(report["listening"]) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, report["listening"]


def test_init_refuses_a_cpu_count_that_is_not_a_whole_number():
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(UsageError, match=r"^distbp.init: num_cpus: expected a whole number of at least 1, got "):
            distbp.init(num_cpus=bad)


def test_an_idle_actor_that_died_while_it_waited_is_replaced_with_the_same_bits(ray_session, make_job, tmp_path):
    """The idle actors wait in distbp's own Ray between calls; one killed meanwhile (by hand,
    or out of memory) is left out, and the next call starts a new one in its place."""
    from distbp.runtime.actors import _IDLE

    job = make_job(name="idle", rows=120, train={"steps": 4})
    first = distbp.train(job, output__dir=str(tmp_path / "first"), output__plot=False)
    assert len(_IDLE["workers"]) == 2  # the session's Ray is distbp's (distbp.init): they wait there
    dead = _IDLE["workers"][0]
    ray_session.kill(dead)
    deadline = time.monotonic() + 60  # the kill lands a little later: a ping sent first still answers
    while time.monotonic() < deadline:
        try:
            ray_session.get(dead.ping.remote(), timeout=60)
        except ray_session.exceptions.RayActorError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed actor still answers")
    second = distbp.train(job, output__dir=str(tmp_path / "second"), output__plot=False)
    with np.load(first.model_path) as a, np.load(second.model_path) as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert len(_IDLE["workers"]) == 2 and dead not in _IDLE["workers"]
