"""Tests for distbp.data (tables, rowmath, datasets): real Parquet, CSV and Feather files, no Ray."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from distbp.data import tables, rowmath
from distbp.data.datasets import make_dataset
from distbp.errors import DataError

EXT = {"parquet": ".parquet", "csv": ".csv", "feather": ".feather"}


def sample_table(rows: int, seed: int = 0, offset: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "f": rng.standard_normal(rows),
        "i": np.arange(offset, offset + rows, dtype=np.int64),
        "s": [f"c{v}" for v in rng.integers(0, 4, rows)],
    })


@pytest.fixture
def small_csv_blocks(monkeypatch):
    """Tiny CSV blocks, so a CSV file streams as many batches, like a large one would."""
    monkeypatch.setattr(tables, "CSV_BLOCK_BYTES", 256)


def write_parts(folder, fmt: str, sizes, name="part") -> pa.Table:
    """Write one file per size, row groups / batches of 7 rows; returns the whole table."""
    parts = []
    for n, size in enumerate(sizes):
        part = sample_table(size, seed=n, offset=sum(sizes[:n]))
        tables.write_table(part, str(folder / f"{name}-{n:02d}{EXT[fmt]}"), row_group_size=7)
        parts.append(part)
    return pa.concat_tables(parts)


def check_random_ranges(source: tables.TableSource, full: pa.Table, seed: int = 0, trials: int = 60):
    n = full.num_rows
    rng = np.random.default_rng(seed)
    ranges = [(0, n), (0, 0), (n, n), (0, 1), (n - 1, n), (6, 8), (7, 14)]
    ranges += [tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(trials)]
    for start, stop in ranges:
        got = source.read_rows(int(start), int(stop))
        assert got.schema == full.schema
        assert got.equals(full.slice(start, stop - start)), (start, stop)
    got = source.read_rows(3, n - 2, columns=["s", "f"])
    assert got.column_names == ["s", "f"]
    assert got.equals(full.select(["s", "f"]).slice(3, n - 5))


# ---------------------------------------------------------------- reading row ranges

@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_read_rows_single_file_equals_slice(tmp_path, fmt, small_csv_blocks):
    full = sample_table(100)
    path = tmp_path / f"t{EXT[fmt]}"
    tables.write_table(full, str(path), row_group_size=7)
    source = tables.open_source(str(path))
    assert (source.format, source.num_rows, source.columns) == (fmt, 100, ["f", "i", "s"])
    assert source.files == (str(path),)
    check_random_ranges(source, full)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
@pytest.mark.parametrize("layout", ["folder", "glob", "uri", "uri_glob"])
def test_read_rows_many_files_equals_slice(tmp_path, fmt, layout, small_csv_blocks):
    full = write_parts(tmp_path, fmt, [37, 1, 55, 20])
    (tmp_path / "_SUCCESS").write_text("")       # skipped: starts with _
    (tmp_path / "README.md").write_text("notes")  # skipped: not a data file
    path = {"folder": str(tmp_path), "glob": str(tmp_path / f"part-*{EXT[fmt]}"),
            "uri": f"file://{tmp_path}", "uri_glob": f"file://{tmp_path}/part-*{EXT[fmt]}"}[layout]
    source = tables.open_source(path)
    assert source.num_rows == 113 and source.file_rows == (37, 1, 55, 20)
    assert [os.path.basename(f) for f in source.files] == [f"part-{n:02d}{EXT[fmt]}" for n in range(4)]
    check_random_ranges(source, full, seed=len(layout))


def test_source_is_picklable_and_reads_after_pickling(tmp_path):
    full = write_parts(tmp_path, "parquet", [10, 15])
    source = pickle.loads(pickle.dumps(tables.open_source(str(tmp_path))))
    assert source.read_rows(5, 20).equals(full.slice(5, 15))


def test_read_rows_rejects_out_of_range(tmp_path):
    tables.write_table(sample_table(10), str(tmp_path / "t.parquet"))
    source = tables.open_source(str(tmp_path / "t.parquet"))
    for start, stop in [(-1, 3), (3, 2), (0, 11)]:
        with pytest.raises(ValueError):
            source.read_rows(start, stop)
    with pytest.raises(DataError, match="'nope'"):
        source.read_rows(0, 3, columns=["nope"])


def _corrupt_parquet_row_group(path, group: int) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(group)
    with open(path, "r+b") as f:
        for c in range(meta.num_columns):
            col = meta.column(c)
            f.seek(col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset)
            f.write(b"\xff" * col.total_compressed_size)


def test_parquet_reads_only_overlapping_row_groups(tmp_path):
    # Row group 3 (rows 30..39) is destroyed after the metadata is taken: ranges that miss it
    # must still read, so read_rows cannot be touching it; ranges that hit it must fail.
    full = sample_table(100)
    path = str(tmp_path / "t.parquet")
    tables.write_table(full, path, row_group_size=10)
    source = tables.open_source(path)
    _corrupt_parquet_row_group(path, 3)
    with pytest.raises(OSError):
        pq.read_table(path)  # the file really is broken
    for start, stop in [(0, 30), (40, 100), (29, 30), (40, 41), (0, 0)]:
        assert source.read_rows(start, stop).equals(full.slice(start, stop - start))
    with pytest.raises(DataError, match=f"cannot read {path} as parquet"):
        source.read_rows(25, 31)


def test_feather_reads_only_overlapping_batches(tmp_path):
    full = sample_table(100)
    path = str(tmp_path / "t.feather")
    tables.write_table(full, path, row_group_size=10)
    source = tables.open_source(path)
    assert source.batch_rows == ((10,) * 10,)
    # Walk the IPC messages and garble the header of record batch 3 (rows 30..39).
    raw = bytearray(open(path, "rb").read())
    reader = pa.BufferReader(bytes(raw))
    reader.seek(8)  # past the magic "ARROW1\0\0"
    starts = []
    for _ in range(5):  # the schema message, then batches 0..3
        starts.append(reader.tell())
        header = ipc.read_message(reader).metadata.size
    raw[starts[4] + 8: starts[4] + 8 + header] = b"\x07" * header
    open(path, "wb").write(bytes(raw))
    for start, stop in [(0, 30), (40, 100), (35, 35)]:
        assert source.read_rows(start, stop).equals(full.slice(start, stop - start))
    with pytest.raises(DataError, match=f"cannot read {path} as feather"):
        source.read_rows(39, 40)


def test_csv_stops_streaming_after_stop(tmp_path, small_csv_blocks):
    full = sample_table(200)
    path = str(tmp_path / "t.csv")
    tables.write_table(full, path)
    source = tables.open_source(path)
    with open(path, "a") as f:  # a broken row at the end, added after the metadata pass
        f.write("1.0,2,x,extra,columns\n")
    for start, stop in [(10, 20), (150, 170)]:  # blocks of ~9 rows: far from the end
        assert source.read_rows(start, stop).equals(full.slice(start, stop - start))
    with pytest.raises(DataError, match=f"cannot read {path} as csv"):
        tables.open_source(path)  # reading the whole file does hit the broken row


def test_csv_types_unified_across_files(tmp_path):
    # One file looks integer, the other float: every range must come back as double.
    pacsv.write_csv(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), str(tmp_path / "p0.csv"))
    pacsv.write_csv(pa.table({"a": [0.5, 1.5], "b": ["u", "v"]}), str(tmp_path / "p1.csv"))
    source = tables.open_source(str(tmp_path))
    assert source.schema.field("a").type == pa.float64()
    assert source.read_rows(0, 2).column("a").type == pa.float64()
    assert source.read_rows(1, 5).column("a").to_pylist() == [2.0, 3.0, 0.5, 1.5]


def test_parquet_types_unified_and_mismatches_named(tmp_path):
    pq.write_table(pa.table({"a": pa.array([1, 2], pa.int32()), "b": [1.0, 2.0]}), tmp_path / "p0.parquet")
    pq.write_table(pa.table({"b": [3.0], "a": pa.array([3], pa.int64())}), tmp_path / "p1.parquet")
    source = tables.open_source(str(tmp_path))
    assert source.schema.field("a").type == pa.int64()
    assert source.read_rows(0, 3).to_pydict() == {"a": [1, 2, 3], "b": [1.0, 2.0, 3.0]}

    pq.write_table(pa.table({"a": [4], "c": [1.0]}), tmp_path / "p2.parquet")
    with pytest.raises(DataError, match="p2.parquet"):
        tables.open_source(str(tmp_path))
    os.remove(tmp_path / "p2.parquet")
    pq.write_table(pa.table({"a": ["text"], "b": [1.0]}), tmp_path / "p2.parquet")
    with pytest.raises(DataError, match="disagree on column types"):
        tables.open_source(str(tmp_path))


def test_compressed_csv(tmp_path):
    full = sample_table(30)
    with pa.CompressedOutputStream(str(tmp_path / "t.csv.gz"), "gzip") as out:
        pacsv.write_csv(full, out)
    source = tables.open_source(str(tmp_path / "t.csv.gz"))
    assert source.format == "csv" and source.read_rows(4, 9).equals(full.slice(4, 5))


# ---------------------------------------------------------------- errors name the path

def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and info.value.exit_code == 2
    return text


def test_missing_empty_and_corrupt_inputs(tmp_path, small_csv_blocks):
    missing = str(tmp_path / "nope.parquet")
    assert missing in one_line_error(tables.open_source, missing)
    pattern = str(tmp_path / "*.parquet")
    assert pattern in one_line_error(tables.open_source, pattern)
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in one_line_error(tables.open_source, str(tmp_path / "empty"))

    empty = str(tmp_path / "zero.parquet")
    pq.write_table(sample_table(0), empty)
    assert f"{empty} holds no rows" in one_line_error(tables.open_source, empty)
    header_only = tmp_path / "zero.csv"
    header_only.write_text("a,b\n")
    assert str(header_only) in one_line_error(tables.open_source, str(header_only))

    drift = tmp_path / "drift.csv"  # integers, then a word far below the first block
    drift.write_text("a\n" + "1\n" * 5000 + "oops\n")
    assert "convert the file to Parquet" in one_line_error(tables.open_source, str(drift))

    for fmt in EXT:
        bad = tmp_path / f"bad{EXT[fmt]}"
        bad.write_bytes(b"\x00garbage\xff" * 50)
        message = one_line_error(tables.open_source, str(bad))
        assert message.startswith(f"data.path: cannot read {bad} as {fmt}: "), message


def test_resolve_format(tmp_path):
    assert tables.resolve_format("x.parquet") == "parquet"
    assert tables.resolve_format("x.PQ") == "parquet"
    assert tables.resolve_format("x.csv") == "csv"
    assert tables.resolve_format("x.csv.gz") == "csv"
    assert tables.resolve_format("x.arrow") == "feather"
    assert tables.resolve_format("x.ipc") == "feather"
    assert tables.resolve_format("s3://bucket/x.feather") == "feather"
    assert tables.resolve_format("anything", "csv") == "csv"
    assert "xml" in one_line_error(tables.resolve_format, "x.csv", "xml")
    write_parts(tmp_path, "feather", [3])
    assert tables.resolve_format(str(tmp_path)) == "feather"
    write_parts(tmp_path, "csv", [3])
    assert "several formats" in one_line_error(tables.resolve_format, str(tmp_path))
    # an explicit format picks its files out of a mixed folder
    assert tables.open_source(str(tmp_path), "csv").files == (str(tmp_path / "part-00.csv"),)
    (tmp_path / "x.txt").write_text("a\n1\n")
    assert "data.format" in one_line_error(tables.resolve_format, str(tmp_path / "x.txt"))


# ---------------------------------------------------------------- shards and validation

def test_shard_ranges_cover_rows_once_and_balanced():
    for n in range(0, 60):
        for k in range(1, 14):
            if k > n:
                message = one_line_error(rowmath.shard_ranges, n, k)
                assert f"more workers ({k}) than rows ({n})" in message and "cluster.workers" in message
                continue
            ranges = rowmath.shard_ranges(n, k)
            assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [stop - start for start, stop in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)  # the first n % k get the extra row
    assert rowmath.shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert rowmath.shard_ranges(10**12 + 3, 4)[-1] == (750_000_000_003, 10**12 + 3)
    for n, k in [(5, 0), (-1, 2)]:
        with pytest.raises(ValueError):
            rowmath.shard_ranges(n, k)


def test_validation_mask_is_independent_of_sharding():
    n, rng = 5000, np.random.default_rng(3)
    whole = rowmath.validation_mask(0, n, 0.2, seed=7)
    assert whole.dtype == bool and whole.shape == (n,)
    for _ in range(10):
        cuts = [0, *sorted(rng.integers(0, n, 5)), n]
        pieces = [rowmath.validation_mask(a, b, 0.2, seed=7, chunk=int(rng.integers(1, 900)))
                  for a, b in zip(cuts, cuts[1:])]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)
    big = 10**15  # far-away rows: no array of that length is needed
    np.testing.assert_array_equal(rowmath.validation_mask(big + 3, big + 50, 0.5, 7),
                                  rowmath.validation_mask(big, big + 50, 0.5, 7)[3:])


def test_validation_mask_fraction_and_seed():
    n = 100_000
    for fraction in (0.05, 0.2, 0.5):
        held = rowmath.validation_mask(0, n, fraction, seed=1).sum()
        sigma = np.sqrt(n * fraction * (1 - fraction))
        assert abs(held - n * fraction) < 4 * sigma
    a, b = rowmath.validation_mask(0, n, 0.2, seed=1), rowmath.validation_mask(0, n, 0.2, seed=2)
    assert (a != b).any()
    # independent seeds overlap like independent coin flips: about 0.2 * 0.2 of the rows
    assert abs((a & b).sum() - n * 0.04) < 4 * np.sqrt(n * 0.04 * 0.96)
    # neighbouring rows are not correlated (a bad hash of i would stripe)
    assert abs((a[1:] & a[:-1]).sum() - n * 0.04) < 4 * np.sqrt(n * 0.04 * 0.96)
    assert not rowmath.validation_mask(0, 1000, 0.0, seed=1).any()
    assert rowmath.validation_mask(0, 1000, 1.0, seed=1).all()
    with pytest.raises(ValueError):
        rowmath.validation_mask(0, 10, 1.5, seed=1)


# ---------------------------------------------------------------- columns

SCHEMA = pa.schema([("x0", pa.float32()), ("x1", pa.int64()), ("flag", pa.bool_()),
                    ("name", pa.string()), ("day", pa.date32()), ("label", pa.string()),
                    ("y", pa.float64())])


def test_select_columns_defaults_and_choices():
    numeric = pa.schema([f for f in SCHEMA if f.name not in ("name", "day")])
    assert tables.select_columns(numeric, None, "label", "classification") == (["x0", "x1", "flag", "y"], ["label"])
    assert tables.select_columns(SCHEMA, ["x1", "x0"], ["label"], "classification") == (["x1", "x0"], ["label"])
    assert tables.select_columns(SCHEMA, ["x0"], ["y", "x1"], "regression") == (["x0"], ["y", "x1"])


def test_select_columns_errors_name_the_column_and_file(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({n: pa.array([None], SCHEMA.field(n).type) for n in SCHEMA.names}), path)
    source = tables.open_source(path)
    cases = [
        (["x0"], ["nolabel"], "classification", ["'nolabel'", path, "x0, x1, flag"]),
        (["x0", "ghost"], ["label"], "classification", ["'ghost'", path]),
        (["x0", "name"], ["label"], "classification", ["'name'", "string", path]),
        (["x0", "day"], ["label"], "classification", ["'day'", "date32"]),
        (["x0"], ["name"], "regression", ["'name'", "not numeric"]),
        (["x0"], ["y"], "classification", ["'y'", "double", "regression"]),
        (["x0", "label"], ["label"], "classification", ["'label'", "a label"]),
        (["x0"], ["x1", "y"], "classification", ["one label column"]),
    ]
    for features, labels, task, expected in cases:
        message = one_line_error(tables.select_columns, source, features, labels, task)
        for part in expected:
            assert part in message, (part, message)


def test_features_to_numpy_nulls_and_types():
    table = pa.Table.from_batches([
        pa.record_batch({"a": pa.array([1.5, None], pa.float64()), "b": [1, 2], "c": [True, None]}),
        pa.record_batch({"a": pa.array([3.0], pa.float64()), "b": [2**40 + 1], "c": [False]}),
    ])
    x = tables.features_to_numpy(table, ["b", "a", "c"], np.float64)
    assert x.dtype == np.float64 and x.flags.c_contiguous and x.shape == (3, 3)
    np.testing.assert_array_equal(x, [[1, 1.5, 1], [2, np.nan, np.nan], [2**40 + 1, 3, 0]])
    x32 = tables.features_to_numpy(table, ["a", "b"], np.float32)  # 2**40 + 1 rounds: allowed
    assert x32.dtype == np.float32 and x32[2, 1] == np.float32(2**40)
    np.testing.assert_array_equal(rowmath.nonfinite_counts(x), [0, 1, 1])
    np.testing.assert_array_equal(rowmath.finite_row_mask(x), [True, False, True])
    y = np.array([[np.inf, 0.0], [1.0, -np.inf], [2.0, 3.0]])
    np.testing.assert_array_equal(rowmath.nonfinite_counts(y), [1, 1])
    np.testing.assert_array_equal(rowmath.finite_row_mask(y), [False, False, True])
    t = tables.targets_to_numpy(pa.table({"y": [1, 2], "z": [0.5, None]}), ["y", "z"], np.float64)
    np.testing.assert_array_equal(t, [[1, 0.5], [2, np.nan]])


# ---------------------------------------------------------------- labels

@pytest.mark.parametrize("values", [
    [3, 1, 7, 1, 3, 3, -2],
    ["cat", "dog", "ant", "dog", "cat"],
])
def test_encode_labels_int_and_string(values):
    table = pa.Table.from_batches([pa.record_batch({"label": values[:3]}),
                                   pa.record_batch({"label": values[3:]})])
    array = tables.label_values(table, "label")
    classes = tables.unique_labels(array)
    assert classes == sorted(set(values)) and all(type(c) is type(values[0]) for c in classes)
    codes = tables.encode_labels(array, classes, column="label")
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, [classes.index(v) for v in values])
    # another shard holding only some classes keeps the global indices
    np.testing.assert_array_equal(tables.encode_labels(pa.array(values[-2:]), classes),
                                  [classes.index(v) for v in values[-2:]])


def test_label_errors_name_column_and_value():
    assert "'kind'" in one_line_error(tables.label_values, pa.table({"kind": [1, None, 2]}), "kind")
    message = one_line_error(tables.encode_labels, pa.array(["a", "zebra"]), ["a", "b"], column="kind")
    assert "'kind'" in message and "'zebra'" in message
    message = one_line_error(tables.encode_labels, pa.array([0, 9]), [0, 1], column="digit")
    assert "'digit'" in message and "9" in message
    assert "'kind'" in one_line_error(tables.encode_labels, pa.array(["a"]), [0, 1], column="kind")


def test_dictionary_and_narrow_int_labels():
    table = pa.table({"label": pa.array(["b", "a", "b"]).dictionary_encode()})
    array = tables.label_values(table, "label")
    assert tables.unique_labels(array) == ["a", "b"]
    np.testing.assert_array_equal(tables.encode_labels(array, ["a", "b"]), [1, 0, 1])
    np.testing.assert_array_equal(tables.encode_labels(pa.array([1, 0], pa.int8()), [0, 1, 300]), [1, 0])


# ---------------------------------------------------------------- standardisation

def test_partial_moment_sums_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 5))
    x[:, 2] = 4.25  # constant column
    x[:, 3] = 1e6 + rng.standard_normal(1000)  # large offset: needs the shift
    cuts = [0, *sorted(rng.integers(0, 1000, 6)), 1000]
    shift = x[0]
    parts = [rowmath.moment_sums(x[a:b], shift) for a, b in zip(cuts, cuts[1:])]
    total = [sum(p[i] for p in parts) for i in range(3)]
    assert total[2] == 1000
    mean, std = rowmath.finalize_standardization(*total, shift=shift)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    expected = x.std(axis=0)
    expected[2] = 1.0
    np.testing.assert_allclose(std, expected, rtol=1e-12)
    # float32 input is summed in float64; without a shift plain data still agrees
    mean, std = rowmath.finalize_standardization(*rowmath.moment_sums(x[:, :2].astype(np.float32)))
    x32 = x[:, :2].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mean, x32.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, x32.std(axis=0), rtol=1e-10)
    _, std = rowmath.finalize_standardization(*rowmath.moment_sums(np.full((7, 2), 0.1)))
    np.testing.assert_array_equal(std, [1.0, 1.0])  # rounding noise is not a spread
    with pytest.raises(ValueError):
        rowmath.finalize_standardization(np.zeros(2), np.zeros(2), 0)


# ---------------------------------------------------------------- synthetic sets

def labels_of(table):
    return table.column("label").to_numpy()


def nearest_neighbour_accuracy(table, n_features):
    """Held-out 1-NN accuracy: a cheap witness that the classes are separable."""
    x = tables.features_to_numpy(table, [f"x{j}" for j in range(n_features)], np.float64)
    y = labels_of(table)
    train, test = slice(0, len(y) // 2), slice(len(y) // 2, None)
    d = ((x[test, None, :] - x[None, train, :]) ** 2).sum(axis=2)
    return (y[train][d.argmin(axis=1)] == y[test]).mean()


@pytest.mark.parametrize("kind, options, n_features, classes", [
    ("xor", {}, 2, 2),
    ("xor", {"noise": 0.05}, 2, 2),
    ("spirals", {}, 2, 3),
    ("spirals", {"classes": 5}, 2, 5),
    ("blobs", {}, 2, 3),
    ("blobs", {"classes": 6, "features": 4}, 4, 6),
    ("teacher", {"layers": [12, 16, 8, 4]}, 12, 4),
])
def test_synthetic_sets_shape_classes_and_seed(kind, options, n_features, classes):
    table = make_dataset(kind, 1001, seed=3, **options)
    assert table.column_names == [f"x{j}" for j in range(n_features)] + ["label"]
    assert table.num_rows == 1001
    assert all(pa.types.is_floating(t) for t in table.schema.types[:-1])
    assert pa.types.is_integer(table.schema.field("label").type)
    counts = np.bincount(labels_of(table), minlength=classes)
    assert len(counts) == classes and counts.min() > 0
    assert counts.max() < 0.6 * 1001  # not degenerate
    assert make_dataset(kind, 1001, seed=3, **options).equals(table)
    assert not make_dataset(kind, 1001, seed=4, **options).equals(table)


@pytest.mark.parametrize("kind", ["xor", "spirals", "blobs"])
def test_synthetic_sets_are_separable(kind):
    assert nearest_neighbour_accuracy(make_dataset(kind, 2000, seed=0), 2) >= 0.95


def test_xor_labels_follow_signs():
    table = make_dataset("xor", 500, seed=1)
    x0, x1 = table.column("x0").to_numpy(), table.column("x1").to_numpy()
    assert ((x0 >= -1) & (x0 <= 1)).all()
    np.testing.assert_array_equal(labels_of(table), (np.sign(x0) != np.sign(x1)).astype(int))


def test_teacher_full_size_is_balanced():
    table = make_dataset("teacher", 60_000, seed=0)
    assert table.num_columns == 785
    counts = np.bincount(labels_of(table), minlength=10)
    assert len(counts) == 10 and counts.min() > 0.02 * 60_000
    # the teacher depends on the seed only, so fewer rows give the same first rows
    assert make_dataset("teacher", 100, seed=0).equals(table.slice(0, 100))


def test_digits():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        message = one_line_error(make_dataset, "digits", None)
        assert "pip install 'distbp[digits]'" in message
        return
    table = make_dataset("digits", None)
    assert table.num_rows == 1797 and table.num_columns == 65
    assert tables.unique_labels(table.column("label")) == list(range(10))
    assert make_dataset("digits", 100).equals(table.slice(0, 100))


def test_make_dataset_errors():
    assert "xor" in one_line_error(make_dataset, "xor", None)
    for rows in (0, -5, 2.5, True, "100"):
        assert "rows" in one_line_error(make_dataset, "spirals", rows)
    message = one_line_error(make_dataset, "mnist", 10)
    assert "'mnist'" in message and "spirals" in message and "teacher" in message
    assert "'classes'" in one_line_error(make_dataset, "xor", 10, classes=3)
    assert "classes" in one_line_error(make_dataset, "spirals", 10, classes=1)
    assert "layers" in one_line_error(make_dataset, "teacher", 10, layers=[5, 1])


# ---------------------------------------------------------------- writing

@pytest.mark.parametrize("fmt", ["parquet", "csv", "feather"])
def test_write_table_round_trip(tmp_path, fmt):
    table = make_dataset("blobs", 300, seed=0)
    path = tmp_path / "new" / "deeper" / f"blobs{EXT[fmt]}"
    tables.write_table(table, str(path), row_group_size=64)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    assert tables.open_source(str(path)).read_rows(0, 300).equals(table)
    if fmt == "parquet":
        assert pq.ParquetFile(path).metadata.num_row_groups == 5
    if fmt == "feather":
        assert ipc.open_file(str(path)).num_record_batches == 5


def test_write_table_is_atomic_and_checks_extension(tmp_path):
    path = tmp_path / "t.csv"
    tables.write_table(sample_table(5), str(path))
    before = path.read_bytes()
    nested = pa.table({"a": pa.array([[1, 2]], pa.list_(pa.int64()))})  # CSV cannot hold lists
    with pytest.raises(DataError, match="cannot write .*t.csv as csv: Unsupported Type"):
        tables.write_table(nested, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.csv"]
    message = one_line_error(tables.write_table, sample_table(5), str(tmp_path / "t.xlsx"))
    assert "t.xlsx" in message


def test_import_does_not_pull_ray_click_or_sklearn():
    code = ("import sys, distbp.data.tables, distbp.data.rowmath, distbp.data.datasets; "
            "print(sorted(m for m in ('ray', 'click', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("cuts", [[], [1], [3, 3, 10], [0, 50, 51]])
def test_merged_shard_moments_equal_whole_table_moments(cuts):
    rng = np.random.default_rng(11)
    x = rng.normal(loc=[1e6, 0.0, -5.0], scale=[3.0, 1.0, 1e-3], size=(80, 3))  # naive sumsq loses ~1e-5 here
    x[:, 1] = 7.0  # a constant column
    bounds = [0, *cuts, 80]
    mean, std = rowmath.merge_moments([rowmath.shard_moments(x[a:b]) for a, b in zip(bounds, bounds[1:])])
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(std[[0, 2]], x.std(axis=0)[[0, 2]], rtol=1e-9)
    assert std[1] == 1.0


# ---------------------------------------------------------------- distbp data convert

def test_data_convert_streams_a_folder_of_csv_files_into_one_parquet_file_and_back(tmp_path):
    from click.testing import CliRunner

    from distbp.cli import main

    folder = tmp_path / "parts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.array(["yes", "no, thanks", 'a "quoted" one'])
    whole = []
    for i in range(3):  # 3 files of 70,000 rows: more than one row group of 65,536 in the Parquet file
        part = pa.table({"x0": rng.standard_normal(70_000), "n": np.arange(70_000) + i * 70_000, "label": labels[rng.integers(0, 3, 70_000)]})
        tables.write_table(part, str(folder / f"part-{i}.csv"))
        whole.append(part)
    whole = pa.concat_tables(whole)
    result = CliRunner().invoke(main, ["data", "convert", str(folder), "-o", str(tmp_path / "all.parquet")])
    assert result.exit_code == 0 and result.output == f"wrote 210000 rows x 3 columns -> {tmp_path / 'all.parquet'}\n", result.output
    meta = pq.ParquetFile(tmp_path / "all.parquet").metadata
    assert meta.num_rows == 210_000 and meta.num_row_groups == 4 and meta.row_group(0).num_rows == 65_536
    assert pq.read_table(tmp_path / "all.parquet").equals(whole)
    back = CliRunner().invoke(main, ["data", "convert", str(tmp_path / "all.parquet"), "-o", str(tmp_path / "all.csv")])
    assert back.exit_code == 0, back.output
    assert tables.open_source(str(tmp_path / "all.csv")).read_rows(0, 210_000).equals(whole)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("args, line", [
    (["missing.csv", "-o", "x.parquet"], "error: missing.csv does not exist"),
    (["d.csv", "-o", "d.csv"], "error: -o d.csv: is the input itself (write to another file)"),
    (["d.csv", "-o", "d.txt"], "error: cannot write d.txt: unknown extension (use .parquet, .csv or .feather)"),
])
def test_data_convert_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, args, line):
    from click.testing import CliRunner

    from distbp.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("x0,label\n1.5,a\n")
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(main, ["data", "convert", *args])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [line], result.output
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "d.csv").read_text() == "x0,label\n1.5,a\n"


def test_data_convert_to_csv_refuses_a_column_csv_cannot_hold(tmp_path):
    from click.testing import CliRunner

    from distbp.cli import main

    pq.write_table(pa.table({"x0": [1.0, 2.0], "l": [[1, 2], [3]]}), tmp_path / "nested.parquet")
    result = CliRunner().invoke(main, ["data", "convert", str(tmp_path / "nested.parquet"), "-o", str(tmp_path / "n.csv")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot write {tmp_path / 'n.csv'} as csv: "), result.output
    assert sorted(os.listdir(tmp_path)) == ["nested.parquet"]


def test_streamed_parquet_groups_are_whole_from_many_tiny_blocks():
    blocks = [pa.table({"x": np.arange(i, i + 1, dtype=np.int64)}) for i in range(2000)]
    groups = list(tables._regrouped(iter(blocks), 512))
    assert [g.num_rows for g in groups] == [512, 512, 512, 464]
    assert all(g.column("x").num_chunks == 1 for g in groups)  # joined once, not block by block
    assert np.array_equal(np.concatenate([g.column("x").to_numpy() for g in groups]), np.arange(2000))
