"""output.dir on object storage: one PUT per file, checkpoints followed by a `latest` marker,
and --resume reading them back (S3 served by moto on 127.0.0.1)."""

import io

import numpy as np
import pyarrow.fs as pafs
import pytest

from distbp.api import load
from distbp.trainer import Trainer

from conftest import model_arrays
from test_scale_out import S3Server, aws_env

BUCKET = "distbp-runs"


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    server = S3Server()
    for k, v in aws_env(server.endpoint, tmp_path).items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                           endpoint_override=f"127.0.0.1:{server.port}", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    yield server, fs
    server.stop()


def test_run_folder_on_s3_holds_the_outputs_and_resumes(ray_session, make_job, s3_env, tmp_path):
    server, fs = s3_env
    job = make_job(rows=120, name="remote", train={"steps": 6, "checkpoint_every": 3}, output={"plot": True})
    local = Trainer(load(job)).run()  # the same job with a local run folder
    uri = f"s3://{BUCKET}/runs/remote"
    result = Trainer(load(job, [f"output.dir={uri}"])).run()
    assert result.out_dir.startswith(uri) and result.model_path == f"{uri}/model.npz"
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/remote", recursive=True))}
    assert {"job.yaml", "metrics.csv", "model.npz", "plot.png", "step-000000003.npz", "step-000000006.npz", "latest"} <= names
    with fs.open_input_stream(f"{BUCKET}/runs/remote/checkpoints/latest") as f:
        assert f.read() == b"step-000000006.npz"
    puts = [r for r in server.log if r["method"] == "PUT" and r["path"].endswith("model.npz")]
    assert len(puts) == 1  # one PUT under the final name, no multipart pieces or renames
    with fs.open_input_stream(f"{BUCKET}/runs/remote/model.npz") as f:
        remote_model = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
    want = model_arrays(local.model_path)
    assert all(np.array_equal(remote_model[k], want[k]) for k in want)
    assert result.metrics.num_rows == 6
    with pytest.raises(Exception, match="already holds a run"):
        Trainer(load(job, [f"output.dir={uri}"])).run()
    again = Trainer(load(job, [f"output.dir={uri}"]), resume=True).run()
    assert again.already_finished and again.steps == 6
