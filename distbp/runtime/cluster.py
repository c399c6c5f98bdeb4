"""Starting or joining Ray (the README's Ray hygiene) and checking its capacity.

The embedded Ray and any join of a 127.0.0.0/8 address run in Ray's loopback mode, which
Ray reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is first imported; so the mode is
decided here, before `import ray`. Any other address keeps Ray's own address choice.
"""

import atexit
import ipaddress
import os
import socket
import sys
import time
from urllib.parse import urlsplit

from distbp.errors import ConnectError, UsageError
from distbp.text import count

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# When its daemons start, Ray looks for cloud metadata (169.254.169.254, metadata.google.internal)
# and reports usage statistics. An embedded, loopback-only Ray has no business on the network:
# its daemons start with usage stats off and plain-HTTP requests sent to a closed loopback
# port; the shard workers put the user's own proxy settings back themselves (worker_env), for
# remote data. (A runtime_env with env_vars would do it too, but costs every actor about 2 s
# more to start: its workers cannot come from Ray's pool of prestarted ones.)
PROXY_KEYS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
_WORKER_ENV = {}  # set when this process starts the embedded Ray: {proxy key: the user's value or None}
QUIET_DAEMONS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
    # Ray's log monitor passes what workers print to the drivers that ask for it; distbp's do
    # not (log_to_driver=False). By default it lists the log folder 10 times a second, a cost
    # that grows with every worker the Ray has started: once a minute here.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "60",
}


def _host_port(address):
    """('host', port) of 'host:port' or 'ray://host:port'; port None when not given."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    return parts.hostname, parts.port


def _auto_address():
    """The address 'auto' resolves to, read the way Ray finds it: RAY_ADDRESS, then the
    current-cluster file of this machine's default Ray temp folder."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        with open("/tmp/ray/ray_current_cluster") as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_loopback(address):
    """True for the embedded Ray (None) and for addresses on 127.0.0.0/8 or localhost."""
    if address is None:
        return True
    if address == "auto":
        address = _auto_address()
        if address is None:
            return False
    host, _ = _host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def choose_mode(address):
    """Set Ray's loopback mode for `address` unless ray is already imported (then the
    process has already chosen). Call before importing ray."""
    import sys

    if "ray" not in sys.modules and is_loopback(address):
        os.environ[LOOPBACK_ENV] = "0"


def _wait_for_port(address, timeout_s):
    host, port = _host_port(address)
    if host is None or port is None:
        raise UsageError(f"cluster.address: expected host:port, ray://host:port or auto, got {address!r}")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConnectError(
                    f"cannot reach a Ray cluster at {address} within {timeout_s:g} s ({err.strerror or err})",
                    hint="check that `ray start --head` runs there, or drop --address to use an embedded Ray",
                ) from None
            time.sleep(0.2)


def connect(address, num_cpus, timeout_s=30, phases=None, beside=None):
    """Start an embedded Ray (address None) or join `address`. Reuses a Ray that is already
    initialised in this process. Returns True when this call started Ray, so the caller
    knows whether it may shut it down. `phases` gets the seconds of imports and ray_start.
    `beside()` is called just before Ray starts or is joined (to start work in a thread that
    overlaps the start, which is mostly waiting)."""
    phases = {} if phases is None else phases
    choose_mode(address)
    t = time.perf_counter()
    import ray

    phases["imports"] = time.perf_counter() - t
    if ray.is_initialized():
        phases["ray_start"] = 0.0
        return False
    if beside is not None:
        beside()
    t = time.perf_counter()
    try:
        return _start(ray, address, num_cpus, timeout_s)
    finally:
        phases["ray_start"] = time.perf_counter() - t


# The Ray that `keep` started or joined for the Python API: held, what address it was asked
# for (None: embedded), and the embedded Ray's CPUs.
_KEPT = {"held": False, "address": None, "cpus": 0, "exit_hook": False}


def keep(address, num_cpus, timeout_s=30, phases=None, cpus=None, beside=None):
    """For Python callers (distbp.train, the estimators): like `connect`, but the Ray it starts
    or joins is kept for the later calls of the process, and shut down at exit or by
    `shutdown()`. A Ray the caller started is used and never shut down. An embedded Ray is
    started with every CPU of the machine (at least `num_cpus`); a later call that needs more
    CPUs, or another address, gets a new one; `cpus` sets the embedded Ray's CPUs instead
    (distbp.init). Returns False: the caller shuts nothing down."""
    phases = {} if phases is None else phases
    ray = sys.modules.get("ray")  # not imported here before choose_mode
    if ray is not None and ray.is_initialized():
        fits = _KEPT["address"] == address and (address is not None or _KEPT["cpus"] >= num_cpus)
        if not _KEPT["held"] or fits:
            phases.update(imports=0.0, ray_start=0.0)
            return False
        shutdown()  # ours, but not what this call asks for
    cpus = cpus or max(os.cpu_count() or 1, num_cpus)
    if connect(address, cpus, timeout_s, phases, beside):
        if not _KEPT["exit_hook"]:
            atexit.register(shutdown)
        _KEPT.update(held=True, address=address, cpus=cpus, exit_hook=True)
    return False


def holds_embedded():
    """Whether this process keeps an embedded Ray it started itself (`keep`): its CPUs are
    distbp's own, so idle actors may wait there for the next run."""
    return _KEPT["held"] and _KEPT["address"] is None


def shutdown():
    """Shut down the Ray that `keep` started or joined, if any; a Ray the caller started is
    left alone."""
    if not _KEPT["held"]:
        return
    _KEPT.update(held=False, address=None, cpus=0)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        stop(ray)


def stop(ray):
    """ray.shutdown(), a second sooner for a Ray this process started. Ray stops its daemons
    one by one, the GCS before the autoscaler's monitor, and then waits a second for the
    monitor, which tries to report its end to the GCS that is gone. On a Ray without an
    autoscaler (the embedded one) the monitor has nothing to do: it is killed first. Only the
    monitor of the Ray this process is connected to, and only if this process started it (its
    child): a Ray this process joined is left alone, and only disconnected from."""
    import psutil

    if ray.is_initialized():
        script = os.path.join("autoscaler", "_private", "monitor.py")
        ours = f"--gcs-address={ray.get_runtime_context().gcs_address}"
        for child in psutil.Process().children():
            try:
                args = child.cmdline()
                if any(a.endswith(script) for a in args) and ours in args:
                    child.kill()
                    child.wait(timeout=1)
            except psutil.Error:  # gone already, or not ours to see
                pass
    ray.shutdown()


def _start(ray, address, num_cpus, timeout_s):
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if address is None:
        saved = {k: os.environ.get(k) for k in QUIET_DAEMONS}
        _WORKER_ENV.update({k: saved[k] for k in PROXY_KEYS})
        os.environ.update(QUIET_DAEMONS)
        try:
            ray.init(address="local", num_cpus=num_cpus, **common)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return True
    _WORKER_ENV.clear()
    if address == "auto" and _auto_address() is None:
        raise ConnectError("cluster.address is 'auto' but no running Ray cluster was found on this machine")
    target = address if address != "auto" else _auto_address()
    _wait_for_port(target, timeout_s)
    try:
        ray.init(address=address, **common)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        # A cluster that requires Ray's token refuses a client that sends none, and Ray then
        # reports only that it failed to connect (after about 20 s of retries).
        hint = None if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else (
            "if the cluster uses Ray's token authentication, as `ray start` does where ~/.ray/auth_token exists, "
            "set RAY_AUTH_MODE=token to send that token"
        )
        raise ConnectError(f"cannot join the Ray cluster at {address}: {err}".splitlines()[0], hint=hint) from None
    return True


def worker_env():
    """((key, value or None), ...): what a shard worker sets (or, for None, unsets) in its own
    environment, so that it sees the user's proxy settings and not the embedded Ray's."""
    env = dict(_WORKER_ENV)
    # The test-only fault hook (faults.py) reaches the workers, and leaves a renewed idle
    # worker when this run has none.
    env["DISTBP_FAULT"] = os.environ.get("DISTBP_FAULT") or None
    return tuple(sorted(env.items()))


def spans_nodes(cpus_per_worker):
    """Whether shard workers of `cpus_per_worker` CPUs can land on more than one node: more
    than one live node has that many CPUs (Ray's SPREAD then puts them on different nodes)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cpus_per_worker) > 1


def check_capacity(workers, cpus_per_worker):
    """Fail clearly, instead of waiting forever, when the cluster has too few CPUs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    need = workers * cpus_per_worker
    if total < need:
        raise UsageError(
            f"cluster.workers: {count(workers, 'worker')} x {count(cpus_per_worker, 'CPU')} need {count(need, 'CPU')}, the cluster has {total:g}",
            hint="lower cluster.workers or cluster.cpus_per_worker, or add nodes",
        )
