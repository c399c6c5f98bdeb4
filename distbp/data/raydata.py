"""A ray.data.Dataset as a training source: `distbp.train(job, ray_dataset=ds)`.

The Dataset is materialised once, in its own order (Ray Data's preserve_order), into blocks in
the object store; the driver keeps only their references and row counts. `BlockSource` then
looks to the workers like a file-backed TableSource: rows [start, stop) of the blocks laid end
to end, so the rows are split at the same fixed boundaries as a file with the same rows, in the
same order. Each worker fetches only the blocks its shard overlaps.
"""

from dataclasses import dataclass

import pyarrow as pa

from distbp.data.tables import read_plan
from distbp.errors import DataError

LABEL = "<ray dataset>"


@dataclass(frozen=True)
class BlockSource:
    path: str  # for messages
    blocks: tuple  # ObjectRefs of pyarrow Tables, in the Dataset's order
    block_rows: tuple
    schema: pa.Schema
    format: str = "ray.data"

    @property
    def num_rows(self) -> int:
        return sum(self.block_rows)

    @property
    def columns(self) -> list:
        return list(self.schema.names)

    def read_rows(self, start, stop, columns=None):
        """Rows [start, stop), fetched from the blocks that overlap them."""
        import ray

        columns, target = read_plan(self, start, stop, columns)
        wanted, first = [], 0
        for ref, rows in zip(self.blocks, self.block_rows):
            lo, hi = max(start, first) - first, min(stop, first + rows) - first
            first += rows
            if lo < hi:
                wanted.append((ref, lo, hi))
        tables = ray.get([ref for ref, _, _ in wanted])
        pieces = [t.slice(lo, hi - lo).select(columns).cast(target) for t, (_, lo, hi) in zip(tables, wanted)]
        return pa.concat_tables(pieces) if pieces else target.empty_table()


def _rows(table):
    return table.num_rows


def block_source(ds):
    """(BlockSource, the materialised Dataset: keep it alive while the source is in use)."""
    import ray
    from ray.data import DataContext

    if not hasattr(ds, "to_arrow_refs"):
        raise DataError(f"ray_dataset: expected a ray.data.Dataset, got {type(ds).__name__}")
    context = DataContext.get_current()
    saved, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        materialized = ds.materialize()
        refs = materialized.to_arrow_refs()
        schema = materialized.schema()
    finally:
        context.execution_options.preserve_order = saved
    if schema is None:
        raise DataError("ray_dataset: the Dataset has no rows")
    schema = getattr(schema, "base_schema", schema)
    if not isinstance(schema, pa.Schema):
        raise DataError("ray_dataset: expected a Dataset of Arrow tables")
    counts = ray.get([ray.remote(_rows).remote(ref) for ref in refs])
    if not sum(counts):
        raise DataError("ray_dataset: the Dataset has no rows")
    return BlockSource(LABEL, tuple(refs), tuple(counts), schema.remove_metadata()), materialized
