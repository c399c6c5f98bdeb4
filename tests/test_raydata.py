"""distbp.train(job, ray_dataset=ds): the rows of a ray.data.Dataset, split at fixed row
boundaries in the Dataset's order, give what the same rows read from Parquet give."""

import numpy as np
import pytest

import distbp
from distbp.data import tables

from conftest import model_arrays


@pytest.fixture
def rows(make_job, tmp_path):
    """A job over a Parquet file, and the same rows as a Dataset of several uneven blocks."""
    import ray.data

    job = make_job(name="rd", rows=300, train={"steps": 15, "optimizer": {"name": "adam", "lr": 0.02}}, data={"validation": 0.2})
    from distbp.api import load

    source = tables.open_source(load(job).data_path())
    table = source.read_rows(0, source.num_rows)
    pieces = [table.slice(0, 70), table.slice(70, 1), table.slice(71, 150), table.slice(221)]
    ds = ray.data.from_arrow(pieces).map_batches(lambda batch: batch, batch_format="pyarrow")
    return job, ds


def weights(result):
    return model_arrays(result.model_path)


def test_a_dataset_trains_like_its_rows_in_parquet(ray_session, rows, tmp_path):
    job, ds = rows
    from_file = distbp.train(str(job), output__dir=str(tmp_path / "file"))
    from_ds = distbp.train(str(job), ray_dataset=ds, output__dir=str(tmp_path / "ds"))
    again = distbp.train(str(job), ray_dataset=ds, output__dir=str(tmp_path / "again"))
    one = distbp.train(str(job), ray_dataset=ds, output__dir=str(tmp_path / "one"), cluster__workers=1)
    a, b, c, d = map(weights, (from_file, from_ds, again, one))
    for key in a:
        if key not in ("spec", "digest"):  # the arrays; the digest is a string of them
            np.testing.assert_allclose(b[key], a[key], rtol=1e-12, atol=1e-14)  # the Parquet route, same workers
            assert np.array_equal(b[key], c[key])  # reruns: bit-identical
            np.testing.assert_allclose(d[key], b[key], rtol=1e-9, atol=1e-12)  # another worker count
    assert from_ds.metrics.num_rows == 15 and "val_loss" in from_ds.metrics.column_names


def test_a_dataset_without_the_label_column_is_refused_in_one_line(ray_session, rows, tmp_path):
    job, ds = rows
    with pytest.raises(distbp.UsageError) as refused:
        distbp.train(str(job), ray_dataset=ds.drop_columns(["label"]), output__dir=str(tmp_path / "no"))
    assert refused.value.exit_code == 2 and "label" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "no").exists()
    with pytest.raises(distbp.UsageError, match="expected a ray.data.Dataset"):
        distbp.train(str(job), ray_dataset=[1, 2, 3], output__dir=str(tmp_path / "no"))
