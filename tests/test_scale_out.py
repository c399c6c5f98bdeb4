"""Scale out: the cluster-launcher configs are valid for the installed Ray and install what
pyproject.toml pins, `distbp run --address` spreads shard workers over a real multi-node
cluster on loopback, and workers read only their own Parquet row groups from S3 (moto on
127.0.0.1). The clusters, the S3 server and their clients listen and connect on 127.0.0.1 only."""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import numpy as np
import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from distbp.data import tables, rowmath, datasets
from distbp.api import load
from distbp.trainer import Trainer

from conftest import model_arrays, write_job

try:
    import tomllib
except ImportError:  # python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"aws": ROOT / "cluster.yaml", "onprem": ROOT / "docs" / "onprem-cluster.yaml"}
DRIVER = Path(__file__).with_name("cluster_driver.py")
# For the Ray of each subprocess: listen on loopback only and report no usage stats. Even so,
# Ray's dashboard probes cloud metadata (169.254.169.254, metadata.google.internal) at every head
# start and sends a "disabled" report to usage-stats.ray.io for `ray start`-style clusters
# (ray._common.usage.usage_lib, usage_stats_head.py). A closed loopback port as the report URL and
# as the HTTP proxy turns each of those into a refused connection on 127.0.0.1.
LOOPBACK_ONLY = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
}


def same_weights(a, b):
    a, b = model_arrays(a), model_arrays(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the cluster-launcher configs

def ray_schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def read_config(name):
    return yaml.safe_load(CONFIGS[name].read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_is_valid_for_the_installed_ray(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = read_config(name)
    jsonschema.validate(config, ray_schema())  # the file as written
    validate_config(prepare_config(config))  # and as `ray up` checks it, defaults filled in


def test_schema_check_rejects_a_misspelt_key():
    config = read_config("aws")
    config["available_node_types"]["ray.worker.default"]["min_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_schema())


def parse_ray_command(command):
    """[(env assignments, `ray` subcommand, parsed click params)] of a shell line, checked
    against the installed `ray` CLI; a wrong flag raises click's UsageError."""
    from ray.scripts.scripts import cli

    parsed = []
    command = re.sub(r"\$\(ip -o route get .*\)", "10.0.0.2", command)  # a worker's own address, from its route to the head
    command = re.sub(r"\$\(echo \$SSH_CONNECTION \| awk '\{print \$3\}'\)", "10.0.0.1", command)  # the head's: where ray up logged in
    for part in command.replace("$RAY_HEAD_IP", "10.0.0.1").split(";"):
        words, env = shlex.split(part), {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if not words or words[0] == "ulimit":
            continue
        assert words[0] == "ray", f"not a ray command: {part!r}"
        parent = cli.make_context("ray", list(words[1:]))
        sub = cli.get_command(parent, words[1])
        assert sub is not None, f"no such command: ray {words[1]}"
        parsed.append((env, words[1], sub.make_context(words[1], list(words[2:]), parent=parent).params))
    return parsed


@pytest.mark.parametrize("name", CONFIGS)
def test_start_commands_are_valid_ray_commands_with_token_auth_and_a_private_dashboard(name):
    import click

    config = read_config(name)
    for kind in ("head", "worker"):
        commands = [p for c in config[f"{kind}_start_ray_commands"] for p in parse_ray_command(c)]
        assert [sub for _, sub, _ in commands] == ["stop", "start"]
        env, _, start = commands[1]
        assert env.get("RAY_AUTH_MODE") == "token"
        if kind == "head":
            assert start["head"] and start["port"] == 6379
            # a node whose network is gone is marked dead after about 30 s: 6 x (2 s + 3 s)
            assert {k: env.get(f"RAY_health_check_{k}") for k in ("period_ms", "timeout_ms", "failure_threshold")} == {
                "period_ms": "2000", "timeout_ms": "3000", "failure_threshold": "6"}
            assert start["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
            assert start["dashboard_host"] == "127.0.0.1"  # reached through `ray dashboard` only
        else:
            assert start["address"] == "10.0.0.1:6379" and not start["head"]
    with pytest.raises(click.UsageError):
        parse_ray_command("ray start --head --dashbord-host=127.0.0.1")


def pinned(commands):
    """{canonical name: version} of every "name==version" (extras allowed) in the commands."""
    text = " ".join(commands)
    return {canonicalize_name(n): v for n, v in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s\"']*)", text)}


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_checkout_with_the_dependency_pins_of_pyproject(name):
    import ray

    config = read_config(name)
    pins = pinned(config["setup_commands"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in map(Requirement, project["dependencies"]):
        key = canonicalize_name(dep.name)
        assert key in pins, f"{dep.name} is not pinned in {name} setup_commands"
        assert pins[key] in dep.specifier, f"{dep.name}=={pins[key]} is outside pyproject's {dep.specifier}"
    # `ray up` and `ray job submit` need the same Ray on your machine as on the cluster
    assert pins["ray"] == ray.__version__
    assert any(re.search(r"pip install .*-e ~/distbp$", c) for c in config["setup_commands"])
    mounts = config["file_mounts"]
    assert any(remote.endswith("/distbp") and local == "." for remote, local in mounts.items())
    # token authentication as Ray documents it for the cluster launcher: the token file on every
    # node, RAY_AUTH_MODE=token in every shell
    assert any(remote.endswith("/.ray/auth_token") and local == "~/.ray/auth_token" for remote, local in mounts.items())
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])


def test_the_onprem_head_address_is_written_in_one_place():
    """head_ip alone: the head's own start command takes it from the SSH session ray up opened."""
    text, config = CONFIGS["onprem"].read_text(), read_config("onprem")
    assert text.count(config["provider"]["head_ip"]) == 1
    head = [p for c in config["head_start_ray_commands"] for p in parse_ray_command(c)][1][2]
    assert head["node_ip_address"] == "10.0.0.1"  # what $SSH_CONNECTION's third field stands for here


def test_cloud_and_onprem_configs_install_the_same_way():
    aws, onprem = read_config("aws"), read_config("onprem")
    for key in ("setup_commands", "initialization_commands", "rsync_exclude"):
        assert aws[key] == onprem[key], key
    assert onprem["provider"]["type"] == "local" and onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]
    worker = aws["available_node_types"]["ray.worker.default"]
    assert worker["min_workers"] <= worker["max_workers"] <= aws["max_workers"]


# ---------------------------------------------------------------- a real multi-node cluster

def on_cluster(job, out, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **LOOPBACK_ONLY}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(DRIVER), str(job), str(out), *args],
                          capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


SHARDS_JOB = dict(name="shards", rows=400, train={"steps": 20, "optimizer": {"name": "adam", "lr": 0.01}, "checkpoint_every": 10},
                  cluster={"workers": 3})
LAYOUTS = ["1", "2", "per_worker", None]  # cluster.parameter_servers of the cluster's runs 0-3 (None: the default, auto)


@pytest.fixture(scope="module")
def cluster_runs(ray_session, tmp_path_factory):
    """One loopback cluster (head + 2 nodes, 1 CPU each) and `distbp run JOB --address` on it
    five times, each as its own process (cluster_driver.py --cli): runs 0-3 with 3 workers, one
    per node, and the parameter actors of LAYOUTS; run 4 with 2 workers. Returns (the job,
    the embedded runs' models for 3 and 2 workers, the cluster's report)."""
    folder = tmp_path_factory.mktemp("cluster")
    job = write_job(folder, **SHARDS_JOB)
    want = {k: model_arrays(Trainer(load(job, [f"output.dir={folder / f'embedded-{k}'}", f"cluster.workers={k}"])).run().model_path) for k in (3, 2)}
    sets = [f"{r}:cluster.parameter_servers={s}" for r, s in enumerate(LAYOUTS) if s] + ["4:cluster.workers=2"]
    report = on_cluster(job, folder / "cluster", "--cli", "--runs", "5", *[a for s in sets for a in ("--run-set", s)])
    return job, want, report


def test_distbp_run_address_spreads_workers_over_nodes_and_matches_the_embedded_run(cluster_runs):
    _, want, report = cluster_runs
    run = report["runs"][4]  # 2 workers on the 3 nodes
    assert run["address"].startswith("127.0.0.1:")  # loopback mode (README: Running on a shared network)
    assert run["returncode"] == 0 and "done: 20 steps" in run["stdout"], run["stderr"][-2000:]
    assert len(run["nodes"]) == 3
    workers = run["run_worker_nodes"]  # read from the cluster's own actor table
    assert len(workers) == 2 and len(set(workers)) == 2 and set(workers) <= set(run["nodes"])
    got = model_arrays(run["model"])
    assert got.keys() == want[2].keys() and all(np.array_equal(got[k], want[2][k]) for k in got)


# ---------------------------------------------------------------- S3 on loopback (moto)

BUCKET, KEY = "distbp-test", "teacher/teacher.parquet"
FOOTER_READ = 64 << 10  # Arrow's speculative read of a Parquet file's tail (footer + metadata)


class S3Server:
    """moto's S3 in a thread on 127.0.0.1. Logs every request with the client's process id
    (from the kernel's socket table), the Range it asked for and the bytes sent back."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class Quiet(MotoRequestHandler):
            def log_request(self, *args, **kwargs):
                pass

        self.log, self._lock = [], threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._counting, threaded=True, request_handler=Quiet)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _client_pid(self, port):
        for conn in psutil.net_connections("tcp4"):
            if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == self.port:
                return conn.pid
        return None

    def _counting(self, environ, start_response):
        record = {"method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
                  "range": environ.get("HTTP_RANGE"), "pid": self._client_pid(int(environ["REMOTE_PORT"])), "bytes": 0}
        with self._lock:
            self.log.append(record)
        for chunk in self._app(environ, start_response):
            record["bytes"] += len(chunk)
            yield chunk

    def stop(self):
        self._server.shutdown()
        self._thread.join()


def aws_env(endpoint, tmp):
    """Dummy credentials and the endpoint, and nothing that could send the AWS SDK elsewhere
    (no config files, no instance-metadata lookups)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(server, env, local copy) with a teacher set of 40,000 rows x 32 float32 features in row
    groups of 4,096 rows at s3://distbp-test/teacher/teacher.parquet, and a two-file set."""
    tmp = tmp_path_factory.mktemp("s3")
    server = S3Server()
    env = aws_env(server.endpoint, tmp)
    local = tmp / "teacher.parquet"
    tables.write_table(datasets.make_dataset("teacher", 40_000, seed=1, layers=(32, 16, 10)), str(local), row_group_size=4096)
    with pytest.MonkeyPatch.context() as mp:  # only while uploading: the session's Ray must not inherit it
        for k, v in env.items():
            mp.setenv(k, v)
        fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                               endpoint_override=f"127.0.0.1:{server.port}", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        with fs.open_output_stream(f"{BUCKET}/{KEY}") as out:
            out.write(local.read_bytes())
        for i, (a, b) in enumerate([(0, 700), (700, 1500)]):
            with fs.open_output_stream(f"{BUCKET}/parts/part-{i}.parquet") as out:
                pq.write_table(pq.read_table(local).slice(a, b - a), out, row_group_size=256)
    yield server, env, local
    server.stop()


def test_s3_folders_and_globs_read_like_local_files(s3, monkeypatch):
    server, env, local = s3
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    whole = pq.read_table(local).slice(0, 1500)
    options = f"?endpoint_override=127.0.0.1:{server.port}&scheme=http"  # options ride on every file
    for path in (f"s3://{BUCKET}/parts/*.parquet", f"s3://{BUCKET}/parts", f"s3://{BUCKET}/parts/*.parquet{options}"):
        source = tables.open_source(path)
        assert source.num_rows == 1500 and len(source.files) == 2
        assert all(f.startswith(f"s3://{BUCKET}/parts/part-") for f in source.files)
        assert all(f.endswith(options) == path.endswith(options) for f in source.files)
        assert source.read_rows(600, 900).equals(whole.slice(600, 300))  # across the two files


def row_group_extents(meta):
    """[(first byte, end byte)] of each row group's column chunks in the file."""
    extents = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        starts, ends = [], []
        for c in range(group.num_columns):
            col = group.column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            starts.append(start)
            ends.append(start + col.total_compressed_size)
        extents.append((min(starts), max(ends)))
    return extents


def requested_ranges(records, size):
    """[(start, end)] byte ranges of the GET requests; a GET without a Range fails the test."""
    out = []
    for r in records:
        if r["method"] == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", r["range"] or "")
            assert m, f"a GET of the whole object: {r}"
            out.append((int(m[1]), int(m[2]) + 1 if m[2] else size))
    return out


def merged(ranges):
    """The ranges as disjoint sorted intervals (touching ones joined)."""
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def inside(ranges, allowed):
    """Every range lies within the union of the allowed ranges."""
    return all(any(a <= lo and hi <= b for a, b in merged(allowed)) for lo, hi in ranges)


def covers(ranges, lo, hi):
    """The union of the ranges covers [lo, hi)."""
    return inside([(lo, hi)], ranges)


def shard_groups(meta, start, stop):
    """Row groups that hold any of rows [start, stop): an oracle apart from data.py's."""
    bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    return [g for g in range(meta.num_row_groups) if bounds[g] < stop and bounds[g + 1] > start]


def test_workers_read_only_their_own_row_groups_from_s3_and_match_the_local_run(s3, ray_session, tmp_path):
    server, env, local = s3
    job = {
        "name": "s3", "seed": 3,
        "data": {"path": f"s3://{BUCKET}/{KEY}", "label": "label"},
        "model": {"layers": [32, 16, 10], "activation": "tanh", "dtype": "float64"},
        "train": {"steps": 3, "optimizer": {"name": "sgd", "lr": 0.1}, "eval_every": 3, "checkpoint_every": 3},
        "cluster": {"workers": 2, "chunk_rows": 4096},
        "output": {"dir": str(tmp_path / "from-s3")},
    }
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump(job))
    server.log.clear()
    run_env = {**os.environ, **env, **LOOPBACK_ONLY}
    run_env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "distbp", "run", str(tmp_path / "s3.yaml"), "--quiet"],
                          capture_output=True, text=True, timeout=180, env=run_env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    size = local.stat().st_size
    meta = pq.ParquetFile(local).metadata
    extents = row_group_extents(meta)
    tail = (size - max(FOOTER_READ, meta.serialized_size + 8), size)
    records = [r for r in server.log if r["path"] == f"/{BUCKET}/{KEY}"]
    assert records and all(r["pid"] is not None for r in records)
    by_pid = {}
    for r in records:
        by_pid.setdefault(r["pid"], []).append(r)
    readers = {pid: rs for pid, rs in by_pid.items() if not inside(requested_ranges(rs, size), [tail])}
    assert len(readers) == 2, f"expected 2 processes reading row groups, got {len(readers)}"

    # Bytes requested = the union of a process's ranges, so a retried request (same range)
    # counts once; the bytes the server sent are printed alongside.
    claimed, total = [], 0
    for pid, rs in by_pid.items():
        ranges = requested_ranges(rs, size)
        requested, sent = sum(b - a for a, b in merged(ranges)), sum(r["bytes"] for r in rs)
        total += requested
        if pid not in readers:
            print(f"driver (pid {pid}): {requested} bytes requested, {sent} sent in {len(rs)} requests (footer)")
            continue
        owners = []
        for k, (a, b) in enumerate(rowmath.shard_ranges(meta.num_rows, 2)):
            own = [extents[g] for g in shard_groups(meta, a, b)]
            if inside(ranges, own + [tail]) and all(covers(ranges, x, y) for x, y in own):
                owners.append(k)
                bound = sum(y - x for x, y in own) + (tail[1] - tail[0])
                print(f"worker {k} (pid {pid}): {requested} bytes requested, {sent} sent in {len(rs)} requests; "
                      f"row groups {shard_groups(meta, a, b)} + footer = {bound} bytes; file {size} bytes")
                assert requested <= bound, f"worker {k} asked for {requested} bytes, more than its row groups + footer ({bound})"
        assert len(owners) == 1, f"process {pid} read ranges {ranges} that fit no single shard"
        claimed.append(owners[0])
    assert sorted(claimed) == [0, 1]
    # the file once, plus the row group the two shards share, plus a footer read per process
    assert total <= size + max(y - x for x, y in extents) + len(by_pid) * (tail[1] - tail[0])
    assert total < 0.6 * 2 * size

    local_job = {**job, "data": {**job["data"], "path": str(local)}, "output": {"dir": str(tmp_path / "from-local")}}
    want = Trainer(load(local_job)).run().model_path
    assert same_weights(tmp_path / "from-s3" / "model.npz", want)


def test_parameter_shards_on_the_workers_nodes_give_the_same_bits_as_one_actor(cluster_runs):
    """A 3-node cluster, 3 workers (one per node): the weights are bit-identical with one
    parameter actor, two, and one beside each worker (per_worker, what auto picks when the
    workers span nodes), and equal to the embedded run's. per_worker puts slice k on worker k's
    node: each worker reads its own slice in place and moves the others over the links."""
    _, want, report = cluster_runs
    want = want[3]
    runs = report["runs"][:4]  # the 4th: the default, auto
    assert all(r["returncode"] == 0 for r in runs), [r["stderr"][-2000:] for r in runs]
    for r in runs:
        got = model_arrays(r["model"])
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    for r in runs[2:]:  # per_worker, and auto: one parameter actor on each worker's node
        workers, servers = r["run_worker_nodes"], r["run_server_nodes"]
        assert len(set(workers)) == 3 and sorted(servers) == sorted(workers), r
    assert len(runs[0]["run_server_nodes"]) == 1 and len(runs[1]["run_server_nodes"]) == 2
