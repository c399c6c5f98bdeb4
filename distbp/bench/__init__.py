"""`distbp bench`: time per step against the matrix-product ceiling, one process and 1..K
Ray workers, measured side by side in one run (the JSON keys: docs/bench.md).

The ceiling of a step is the time of the products it really needs at the workload's shapes:
every layer's forward product and weight-gradient product, and the input-gradient product of
every layer but the first, timed here with numpy's BLAS. GFLOP/s use the nominal 6 * N * (number of weights), the
count the peer baselines use, so GFLOP/s ratios are inverse time ratios.

    harness.py   the workloads and the timing (ceiling, one process, 1..K workers)
    model.py     the scaling model (--model)
    report.py    the table, warnings, JSON and chart
"""

from distbp.bench.harness import (
    MAX_STEPS, WORKLOADS, ceiling_sec, run, step_count, steps_for, workload_data, workload_params, workload_spec,
)
from distbp.bench.model import PAYLOAD_SHARE, model_table, scaling_model
from distbp.bench.report import chart, flags, merge, ms, table, to_json

__all__ = [  # the bench's surface: the command, benchmarks/ and the tests use these
    "MAX_STEPS", "WORKLOADS", "ceiling_sec", "run", "step_count", "steps_for", "workload_data", "workload_params", "workload_spec",
    "PAYLOAD_SHARE", "model_table", "scaling_model", "chart", "flags", "merge", "ms", "table", "to_json",
]
