"""Tables on storage: finding and describing them, reading a row range, writing them, and
turning their columns into arrays.

This module owns everything between a data path and numpy arrays: the file format, the
`TableSource` that describes a table without loading it, reading rows [start, stop) straight
from storage (Parquet row groups, Feather record batches, a streamed CSV), column selection
and label encoding. The driver only ever calls `open_source` (metadata); each worker calls
`TableSource.read_rows` for its own range. No ray, no click: numpy and pyarrow only.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from distbp.errors import DataError, WriteFailed

FORMATS = ("parquet", "csv", "feather")
EXTENSIONS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".csv.gz": "csv", ".csv.bz2": "csv", ".csv.zst": "csv",
    ".feather": "feather", ".arrow": "feather", ".ipc": "feather",
}
CSV_BLOCK_BYTES = 4 << 20  # column types are inferred from the first block of a CSV file
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB = re.compile(r"[*?\[]")


# ---------------------------------------------------------------- paths and formats

def _is_uri(path: str) -> bool:
    return bool(_URI.match(path))


def _local(path: str) -> str:
    """A file:// URI as a plain local path (for writing atomically)."""
    if path.startswith("file://"):
        return unquote(urlparse(path).path)
    return path


def _format_of(name: str) -> str | None:
    lower = (name.split("?", 1)[0] if _is_uri(name) else name).lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _hidden(name: str) -> bool:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.startswith((".", "_"))  # temporary files, _SUCCESS, _metadata


def _list_files(path: str) -> list[str]:
    """Every file `path` names, sorted by name: itself, a folder's files, or glob matches.
    Local paths come back absolute; URIs (file:// included) come back as URIs."""
    if not _is_uri(path):
        if _GLOB.search(path) and not os.path.exists(path):
            files = sorted(p for p in glob.glob(path) if os.path.isfile(p) and not _hidden(p))
            if not files:
                raise DataError(f"data.path: no files match {path}")
            return [os.path.abspath(p) for p in files]
        if os.path.isdir(path):
            files = sorted(e.path for e in os.scandir(path) if e.is_file() and not _hidden(e.name))
            if not files:
                raise DataError(f"data.path: folder {path} holds no data files")
            return [os.path.abspath(p) for p in files]
        if not os.path.exists(path):
            raise DataError(f"data.path: {path} does not exist")
        if not os.path.isfile(path):  # a pipe, socket or device would block a reader, or never end
            raise DataError(f"data.path: {path} is not a regular file or a folder", hint="copy the rows into a file first")
        return [os.path.abspath(path)]
    try:
        fs, root = pafs.FileSystem.from_uri(path)
        base, _, query = path.partition("?")  # keep options such as ?region= on every file
        prefix = base[: len(base) - len(root)] if base.endswith(root) else base.split("://")[0] + "://"
        suffix = f"?{query}" if query else ""
        if _GLOB.search(root):  # a glob in the last component only
            folder, pattern = root.rsplit("/", 1)
            infos = fs.get_file_info(pafs.FileSelector(folder))
            names = [i.path for i in infos if i.type == pafs.FileType.File
                     and fnmatch.fnmatch(i.base_name, pattern)]
        else:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"data.path: {path} does not exist")
            if info.type == pafs.FileType.File:
                return [path]
            names = [i.path for i in fs.get_file_info(pafs.FileSelector(root))
                     if i.type == pafs.FileType.File]
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data.path: cannot list {path}: {_first_line(err)}") from None
    files = sorted(prefix + n + suffix for n in names if not _hidden(n))
    if not files:
        raise DataError(f"data.path: no data files at {path}")
    return files


def resolve_format(path: str, format: str = "auto") -> str:
    """'parquet', 'csv' or 'feather': `format` itself, or guessed from the file extension(s)."""
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"data.format: unknown format {format!r}", "use auto, parquet, csv or feather")
        return format
    guess = _format_of(path)
    if guess:
        return guess
    found = {f for f in map(_format_of, _list_files(path)) if f}
    if len(found) == 1:
        return found.pop()
    why = "it holds several formats" if found else "no .parquet, .csv or .feather extension"
    raise DataError(f"data.path: cannot tell the format of {path}: {why}", "set data.format")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    line = "".join(ch for ch in lines[0] if ch.isprintable()) if lines else ""
    return line.rstrip(": ") or type(err).__name__


def _cannot_read(file: str, format: str, err: BaseException) -> DataError:
    reason = _first_line(err)
    hint = None
    if format == "csv" and "conversion error" in reason:
        hint = "CSV column types are guessed from the first rows; convert the file to Parquet"
    return DataError(f"data.path: cannot read {file} as {format}: {reason}", hint)


def _open_random(file: str):
    """A random-access pyarrow file; local files are memory-mapped."""
    if _is_uri(file):
        fs, inner = pafs.FileSystem.from_uri(file)  # credentials from the environment
        return fs.open_input_file(inner)
    return pa.memory_map(file)


def _open_stream(file: str):
    """A sequential pyarrow stream, decompressing .gz/.bz2/.zst by extension."""
    if _is_uri(file):
        fs, inner = pafs.FileSystem.from_uri(file)
        return fs.open_input_stream(inner, compression="detect")
    return pa.input_stream(file, compression="detect")


def _csv_reader(stream, schema: pa.Schema | None, columns: list[str] | None = None):
    convert = pacsv.ConvertOptions(
        column_types=dict(zip(schema.names, schema.types)) if schema else None,
        include_columns=columns)
    return pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                          convert_options=convert)


# ---------------------------------------------------------------- the table source

def read_plan(source, start, stop, columns):
    """(columns, their schema) of a read of rows [start, stop) from `source` (a TableSource,
    or anything with num_rows, columns, schema and path), after checking both."""
    if not 0 <= start <= stop <= source.num_rows:
        raise ValueError(f"rows [{start}, {stop}) outside [0, {source.num_rows})")
    columns = source.columns if columns is None else list(columns)
    missing = [c for c in columns if c not in source.schema.names]
    if missing:
        raise DataError(f"data.features: column {missing[0]!r} not found in {source.path}")
    return columns, pa.schema([source.schema.field(c) for c in columns])


@dataclass(frozen=True)
class TableSource:
    """A table spread over one or more files, described by metadata only. Picklable; holds no
    open files or filesystems, so it can travel to Ray workers. Build it with `open_source`."""

    path: str                                   # what the user wrote, for messages
    format: str                                 # parquet | csv | feather
    files: tuple[str, ...]                      # local absolute paths or URIs, in table order
    file_rows: tuple[int, ...]                  # rows in each file
    schema: pa.Schema                           # unified over the files, no metadata
    batch_rows: tuple[tuple[int, ...], ...] = ()  # Feather: rows per record batch, per file

    @property
    def num_rows(self) -> int:
        return sum(self.file_rows)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def read_rows(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) of the files laid end to end, reading only the files, Parquet
        row groups and Feather batches that overlap; a CSV file is streamed up to `stop`."""
        columns, target = read_plan(self, start, stop, columns)
        pieces = []
        first = 0  # global index of this file's first row
        for i, (file, rows) in enumerate(zip(self.files, self.file_rows)):
            lo, hi = max(start, first) - first, min(stop, first + rows) - first
            first += rows
            if lo >= hi:
                continue
            try:
                piece = self._read_file(i, lo, hi, columns)
                pieces.append(piece.select(columns).cast(target))
            except (pa.ArrowException, OSError) as err:
                raise _cannot_read(file, self.format, err) from None
        if not pieces:
            return target.empty_table()
        return pa.concat_tables(pieces)

    def blocks(self, columns: list[str] | None = None):
        """(first row, table) of each block of the files laid end to end, reading every file
        once: its Parquet row groups, Feather record batches or CSV read blocks, in order."""
        columns, target = read_plan(self, 0, self.num_rows, columns)
        first = 0
        for i, file in enumerate(self.files):
            try:
                for batch in self._file_batches(i, columns):
                    if batch.num_rows:
                        yield first, pa.Table.from_batches([batch]).select(columns).cast(target)
                        first += batch.num_rows
            except (pa.ArrowException, OSError) as err:
                raise _cannot_read(file, self.format, err) from None

    def _file_batches(self, i: int, columns: list[str]):
        file = self.files[i]
        if self.format == "csv":
            with _open_stream(file) as f:
                yield from _csv_reader(f, self.schema, columns)
            return
        with _open_random(file) as f:
            if self.format == "parquet":
                yield from pq.ParquetFile(f).iter_batches(columns=columns)
            else:
                reader = ipc.open_file(f)
                for b in range(reader.num_record_batches):
                    yield reader.get_batch(b).select(columns)

    def _read_file(self, i: int, lo: int, hi: int, columns: list[str]) -> pa.Table:
        """Rows [lo, hi) of file i."""
        file = self.files[i]
        if self.format == "parquet":
            with _open_random(file) as f:
                parquet = pq.ParquetFile(f)
                meta = parquet.metadata
                groups, skip = _overlapping([meta.row_group(g).num_rows
                                             for g in range(meta.num_row_groups)], lo, hi)
                table = parquet.read_row_groups(groups, columns=columns)
            return table.slice(skip, hi - lo)
        if self.format == "feather":
            with _open_random(file) as f:
                reader = ipc.open_file(f)
                batches, skip = _overlapping(self.batch_rows[i], lo, hi)
                table = pa.Table.from_batches([reader.get_batch(b) for b in batches], reader.schema)
            return table.slice(skip, hi - lo)
        pieces, seen = [], 0
        with _open_stream(file) as f:
            for batch in _csv_reader(f, self.schema, columns):
                if seen + batch.num_rows > lo:  # whole batches before lo are skipped
                    pieces.append(batch.slice(max(lo - seen, 0), hi - max(lo, seen)))
                seen += batch.num_rows
                if seen >= hi:
                    break
        return pa.Table.from_batches(pieces, pa.schema([self.schema.field(c) for c in columns]))


def _overlapping(sizes, lo: int, hi: int) -> tuple[list[int], int]:
    """Indices of the consecutive blocks of `sizes` that overlap rows [lo, hi), and how many
    rows of the first of them lie before lo."""
    picked, skip, first = [], 0, 0
    for b, size in enumerate(sizes):
        if first < hi and first + size > lo:
            if not picked:
                skip = lo - first
            picked.append(b)
        first += size
    return picked, skip


def _describe(file: str, format: str) -> tuple[pa.Schema, int, tuple[int, ...]]:
    """(schema, rows, rows per Feather batch) of one file, from metadata where the format has it."""
    try:
        if format == "parquet":
            with _open_random(file) as f:
                pf = pq.ParquetFile(f)
                return pf.schema_arrow, pf.metadata.num_rows, ()
        if format == "feather":
            with _open_random(file) as f:
                reader = ipc.open_file(f)
                sizes = tuple(reader.get_batch(b).num_rows for b in range(reader.num_record_batches))
                return reader.schema, sum(sizes), sizes
        rows = 0
        with _open_stream(file) as f:  # bounded memory: one block at a time
            reader = _csv_reader(f, None)
            for batch in reader:
                rows += batch.num_rows
            return reader.schema, rows, ()
    except (pa.ArrowException, OSError) as err:
        raise _cannot_read(file, format, err) from None


def open_source(path: str, format: str = "auto", key: str | None = "data.path") -> TableSource:
    """Describe the table at `path` (a file, folder, glob or pyarrow.fs URI) without loading it.

    Files are taken in name order. Their schemas must have the same columns; types are
    unified (int64 with double gives double). Raises DataError for missing, empty,
    unreadable or mismatched files, naming `key`: the job key the path came from
    (data.validation for a validation file), or None for a path given on the command line."""
    try:
        return _open_source(str(path), format)
    except DataError as err:
        if key == "data.path" or not err.message.startswith("data.path: "):
            raise
        message = err.message[len("data.path: "):]
        raise DataError(f"{key}: {message}" if key else message, err.hint) from None


def _open_source(path: str, format: str) -> TableSource:
    format = resolve_format(path, format)
    files = _list_files(path)
    files = [f for f in files if _format_of(f) == format] or files  # else: format was set explicitly
    schemas, rows, batches = zip(*(_describe(f, format) for f in files))
    names = sorted(schemas[0].names)
    for file, schema in zip(files, schemas):
        if sorted(schema.names) != names:
            raise DataError(f"data.path: {file} has columns {schema.names}, "
                            f"but {files[0]} has {schemas[0].names}")
    try:
        schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data.path: the files of {path} disagree on column types: {_first_line(err)}") from None
    if sum(rows) == 0:
        raise DataError(f"data.path: {path} holds no rows")
    return TableSource(path, format, tuple(files), tuple(rows), schema,
                       tuple(batches) if format == "feather" else ())


_STRUCTURAL = '[,"\r\n]'  # what forces a CSV field into quotes


def _write_csv(table: pa.Table, sink, header: bool = True) -> None:
    """CSV as spreadsheets and pandas write it: quotes only around a name or value that holds
    a comma, a quote or a line break (pyarrow's writer quotes every name and every string).
    pyarrow writes the rows unless some string needs quotes; then Python's csv module does."""
    import csv
    import io

    def lines(rows):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return out.getvalue().encode()

    if header:
        sink.write(lines([table.column_names]))
    strings = [c for c in table.columns if pa.types.is_string(c.type) or pa.types.is_large_string(c.type)]
    if not any(pc.any(pc.match_substring_regex(c, _STRUCTURAL)).as_py() for c in strings):
        pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        return
    # every column as Arrow formats it (as pyarrow's writer does), so that a file streamed in
    # blocks reads the same whichever writer each block took
    as_text = [c if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else pc.cast(c, pa.string()) for c in table.columns]
    for batch in pa.table(as_text, names=table.column_names).to_batches(max_chunksize=65536):
        sink.write(lines(zip(*(column.to_pylist() for column in batch.columns))))


def write_table(table: pa.Table, path: str, row_group_size: int = 65536) -> None:
    """Write `table` as Parquet, CSV or Feather by the extension of `path`, atomically: a
    temporary file in the same folder, then a rename. A URI is written with one upload."""
    write_blocks([table], table.schema, path, row_group_size)


def _regrouped(blocks, rows: int):
    """The rows of the tables `blocks`, in tables of exactly `rows` rows (the last may hold fewer),
    each joined once from the pieces that make it."""
    pending, held = [], 0
    for block in blocks:
        while block.num_rows:
            take = min(rows - held, block.num_rows)
            pending.append(block.slice(0, take))
            held += take
            block = block.slice(take)
            if held == rows:
                yield pa.concat_tables(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def write_blocks(blocks, schema: pa.Schema, path: str, row_group_size: int = 65536) -> None:
    """Write the tables `blocks` (each of `schema`), one after the other, as one table: as
    `write_table` does, streaming, so the whole table is never held at once. The file appears
    only once complete: locally by a rename, on object storage by one upload of a finished
    local file. A path that cannot take a file, or a table the format cannot hold, is a
    DataError naming `path`; a write that fails on the way (a full disk) is WriteFailed; either
    way nothing is left at `path` but what was there before."""
    path = _local(str(path))
    format = _format_of(path)
    if format is None or path.lower().endswith((".gz", ".bz2", ".zst")):
        raise DataError(f"cannot write {path}: unknown extension", "use .parquet, .csv or .feather")

    def write(sink) -> None:
        if format == "parquet":
            with pq.ParquetWriter(sink, schema) as writer:
                for table in _regrouped(blocks, row_group_size):
                    writer.write_table(table, row_group_size=row_group_size)
        elif format == "feather":
            with ipc.new_file(sink, schema) as writer:
                for table in blocks:
                    writer.write_table(table, max_chunksize=row_group_size)
        else:
            _write_csv(schema.empty_table(), sink)
            for table in blocks:
                _write_csv(table, sink, header=False)

    if _is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot write {path}: {_first_line(err)}") from None
        with tempfile.TemporaryDirectory(prefix="distbp-") as staging:
            local = os.path.join(staging, os.path.basename(inner) or "table")
            write_blocks(blocks, schema, local, row_group_size)  # complete before anything is uploaded
            try:
                with open(local, "rb") as src, fs.open_output_stream(inner) as dst:
                    shutil.copyfileobj(src, dst, length=8 << 20)
            except (pa.ArrowException, OSError) as err:
                raise WriteFailed(getattr(err, "errno", None), _first_line(err), path) from None
        return
    if os.path.isdir(path):
        raise DataError(f"cannot write {path}: it is a folder", "name a file")
    folder = os.path.dirname(os.path.abspath(path))
    try:  # a file in the way of the folder, or no permission: nothing is written
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or _first_line(err)}") from None
    try:
        with open(fd, "wb") as f:
            write(pa.PythonFile(f, mode="w"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        os.unlink(tmp)
        raise WriteFailed(err.errno, err.strerror or _first_line(err), path) from None
    except pa.ArrowException as err:  # a type the format cannot hold (a list column in CSV)
        os.unlink(tmp)
        raise DataError(f"cannot write {path} as {format}: {_first_line(err)}") from None
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------- columns

def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _label_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t) \
        or pa.types.is_boolean(t)


def select_columns(source_or_schema, features: list[str] | None, labels, task: str):
    """(feature_names, label_names) after checking they exist and have usable types.
    `features=None` takes every column except the label(s)."""
    if not isinstance(source_or_schema, pa.Schema):  # a TableSource, or a Dataset's BlockSource
        schema, where = source_or_schema.schema, source_or_schema.path
    else:
        schema, where = source_or_schema, "the data"
    labels = [labels] if isinstance(labels, str) else list(labels)
    available = ", ".join(schema.names)
    if task == "classification" and len(labels) != 1:
        raise DataError(f"data.label: classification takes one label column, got {labels}")
    for name in labels:
        if name not in schema.names:
            raise DataError(f"data.label: column {name!r} not found in {where} (columns: {available})")
        kind = schema.field(name).type
        if task == "regression" and not _numeric(kind):
            raise DataError(f"data.label: regression target {name!r} in {where} is {kind}, not numeric")
        if task == "classification" and not _label_type_ok(kind):
            raise DataError(f"data.label: label column {name!r} in {where} is {kind}",
                            "class labels must be integers or strings; use task: regression for numbers")
    if features is None:
        features = [c for c in schema.names if c not in labels]
        if not features:
            raise DataError(f"data.features: {where} has no columns besides the label(s)")
    for name in features:
        if name in labels:
            raise DataError(f"data.features: column {name!r} is a label and cannot be a feature too")
        if name not in schema.names:
            raise DataError(f"data.features: column {name!r} not found in {where} (columns: {available})")
        kind = schema.field(name).type
        if not _numeric(kind):
            raise DataError(f"data.features: column {name!r} in {where} is {kind}, not numeric",
                            "list only numeric columns in data.features")
    return list(features), labels


def features_to_numpy(table: pa.Table, feature_names: list[str], dtype=np.float32) -> np.ndarray:
    """(rows, n_features) C-contiguous array of the named columns; nulls become NaN."""
    dtype = np.dtype(dtype)
    out = np.empty((table.num_rows, len(feature_names)), dtype=dtype)
    arrow_type = pa.from_numpy_dtype(dtype)
    for j, name in enumerate(feature_names):
        if name not in table.column_names:
            raise DataError(f"column {name!r} not found (columns: {', '.join(table.column_names)})")
        try:
            column = table.column(name).cast(arrow_type, safe=False)  # int64 -> float32 may round
        except pa.ArrowException as err:  # strings, lists, ...: what select_columns refuses up front
            raise DataError(f"column {name!r} is {table.column(name).type}, not numeric: {_first_line(err)}") from None
        out[:, j] = column.to_numpy()  # a ChunkedArray's nulls become NaN for float types
    return out


def targets_to_numpy(table: pa.Table, label_names: list[str], dtype=np.float32) -> np.ndarray:
    """(rows, n_targets) regression targets; nulls become NaN, like features."""
    return features_to_numpy(table, label_names, dtype)



# ---------------------------------------------------------------- labels

def label_values(table: pa.Table, label_name: str) -> pa.Array:
    """The class-label column as one Array (dictionaries decoded). A null is a DataError."""
    values = table.column(label_name).combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if values.null_count:
        raise DataError(f"data.label: column {label_name!r} has {values.null_count} missing values",
                        "drop or fill those rows")
    return values


def unique_labels(array: pa.Array) -> list:
    """The distinct labels as sorted python values (ints or strings)."""
    return sorted(pc.unique(array).to_pylist())


def encode_labels(array: pa.Array, classes: list, column: str = "label") -> np.ndarray:
    """(rows,) int64: the index of each label in `classes`."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = pa.int64() if pa.types.is_integer(array.type) else array.type
    try:
        indices = pc.index_in(array.cast(kind), value_set=pa.array(classes, type=kind))
    except (pa.ArrowException, OverflowError, TypeError) as err:
        raise DataError(f"data.label: labels of column {column!r} ({array.type}) do not match "
                        f"the classes {classes[:10]}: {_first_line(err)}") from None
    if indices.null_count:
        bad = array.filter(indices.is_null())[0].as_py()
        raise DataError(f"data.label: column {column!r} holds {bad!r}, which is not a known class "
                        f"(classes: {classes[:20]})")
    return indices.to_numpy().astype(np.int64, copy=False)
