"""Plots of a finished or running run: metrics.csv in a run folder -> one PNG.

Panels, against the optimizer step:
1. loss (train, and validation where present) on a log scale, so the late steps do not lie
   flat; on a twin axis, accuracy (train, validation) for classification runs, or the
   validation r2 for regression runs, whose validation rmse shares the loss axis;
2. the learning rate applied;
3. per layer, the gradient norm (solid) and the mean |delta| (dashed, same colour) on a log
   scale, from the evaluation steps only (the other rows leave those cells empty).

matplotlib (a dependency of distbp) is imported inside
`plot_run` (or by `import_in_background`), never at module import, and only through its object
API (no pyplot state).
"""

from __future__ import annotations

import csv
import math
import os
import re
import threading

from distbp.errors import UsageError
from distbp.run.checkpoint import atomic_write

_LAYER_COLUMN = re.compile(r"^(grad_norm|delta_mean)_(\d+)$")


def _read_metrics(path: str) -> dict[str, list[float]]:
    """metrics.csv -> {column: values}, one value per row; an empty cell reads as NaN."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except csv.Error as err:
        raise UsageError(f"{path}: not a metrics.csv ({err})") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file", "is this a run folder? it holds metrics.csv") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if not rows:
        raise UsageError(f"{path}: no steps recorded yet")
    for i, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise UsageError(f"{path}: line {i} has another number of fields than the header ({len(reader.fieldnames)})")
    columns: dict[str, list[float]] = {}
    for name in rows[0]:
        try:
            columns[name] = [float(row[name]) if row[name] not in ("", None) else math.nan for row in rows]
        except ValueError:
            raise UsageError(f"{path}: column {name!r} holds a value that is not a number") from None
    if "step" not in columns or "loss" not in columns:
        raise UsageError(f"{path}: expected the columns step and loss")
    return columns


def _present(steps: list[float], values: list[float], positive: bool = False):
    """The (steps, values) pairs where the value is recorded (and > 0 for a log axis)."""
    pairs = [(s, v) for s, v in zip(steps, values) if not math.isnan(v) and (v > 0 or not positive)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _has(columns: dict, name: str) -> bool:
    return name in columns and any(not math.isnan(v) for v in columns[name])


def import_in_background():
    """Import what plot_run needs of matplotlib (about 0.5 s) in a thread of its own. A run
    starts it while Ray starts, which is mostly waiting, so that the plot at the end, which
    the run's exit waits for, does not pay for the import."""

    def load():
        try:
            import matplotlib.backends.backend_agg  # noqa: F401  (savefig's PNG canvas)
            import matplotlib.figure  # noqa: F401
        except ImportError:  # plot_run says so, in its own words
            pass

    threading.Thread(target=load, name="distbp-plot-import", daemon=True).start()


def plot_run(run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> str:
    """Draw run_dir/metrics.csv into a PNG (default run_dir/plot.png); returns the PNG's path."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such run folder")
    out_path = os.fspath(out_path) if out_path is not None else os.path.join(run_dir, "plot.png")
    if os.path.isdir(out_path):
        raise UsageError(f"-o {out_path}: is a folder", hint="give a file name, such as curves.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise UsageError(f"-o {out_path}: no folder {os.path.dirname(os.path.abspath(out_path))}")
    fig = figure(run_dir)
    # a temporary file in the same folder, then a rename: a reader never sees half a PNG
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=110))
    return out_path


def figure(run_dir: str):
    """The matplotlib Figure of run_dir/metrics.csv (panels: see the module's docstring)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("matplotlib is not installed", hint="distbp needs it for plots: pip install 'matplotlib>=3.7,<4'") from None
    columns = _read_metrics(os.path.join(run_dir, "metrics.csv"))
    steps = columns["step"]
    layers = sorted({int(m.group(2)) for m in map(_LAYER_COLUMN.match, columns) if m})
    layers = [l for l in layers if _has(columns, f"grad_norm_{l}") or _has(columns, f"delta_mean_{l}")]

    fig = Figure(figsize=(9, 10 if layers else 7), layout="constrained")
    axes = fig.subplots(3 if layers else 2, 1, sharex=True, height_ratios=[3, 1, 3][: 3 if layers else 2])
    ax_loss, ax_lr = axes[0], axes[1]

    # a log axis needs positive values: a loss of exactly 0 (or a negative one) is left out
    log = all(v > 0 for name in ("loss", "val_loss", "val_rmse") if name in columns for v in columns[name] if not math.isnan(v))
    ax_loss.plot(*_present(steps, columns["loss"]), color="C0", label="train loss")
    if _has(columns, "val_loss"):
        ax_loss.plot(*_present(steps, columns["val_loss"]), "o-", color="C1", ms=3, label="validation loss")
    if _has(columns, "val_rmse"):
        ax_loss.plot(*_present(steps, columns["val_rmse"]), "^:", color="C5", ms=3, label="validation rmse")
    if log:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (log scale)" if log else "loss")
    ax_loss.set_title(os.path.basename(os.path.abspath(run_dir)))
    handles, labels = ax_loss.get_legend_handles_labels()
    twin = [(name, label, style) for name, label, style in (
        ("accuracy", "train accuracy", "-"), ("val_accuracy", "validation accuracy", "s--"), ("val_r2", "validation r2", "d--"),
    ) if _has(columns, name)]
    if twin:
        ax_twin = ax_loss.twinx()
        for i, (name, label, style) in enumerate(twin):
            ax_twin.plot(*_present(steps, columns[name]), style, color=f"C{i + 2}", ms=3, alpha=0.8, label=label)
        ax_twin.set_ylabel("accuracy" if any(name.endswith("accuracy") for name, _, _ in twin) else "r2")
        low = min(0.0, *(v for name, _, _ in twin for v in columns[name] if not math.isnan(v)))
        ax_twin.set_ylim(max(low, -1.0), 1.02)  # an r2 far below 0 (a poor start) would flatten the rest
        more_handles, more_labels = ax_twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax_loss.legend(handles, labels, loc="center right", fontsize="small")
    ax_loss.grid(alpha=0.3, which="both" if log else "major")

    if _has(columns, "lr"):
        ax_lr.plot(*_present(steps, columns["lr"]), color="C4")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)

    if layers:
        ax_norm = axes[2]
        for i, l in enumerate(layers):
            colour = f"C{i % 10}"
            if _has(columns, f"grad_norm_{l}"):
                ax_norm.plot(*_present(steps, columns[f"grad_norm_{l}"], positive=True), "-", color=colour,
                             marker=".", label=f"‖grad W{l}‖")
            if _has(columns, f"delta_mean_{l}"):
                ax_norm.plot(*_present(steps, columns[f"delta_mean_{l}"], positive=True), "--", color=colour,
                             label=f"mean |delta {l}|")
        ax_norm.set_yscale("log")
        ax_norm.set_ylabel("per layer (log scale)")
        ax_norm.legend(loc="upper right", fontsize="small", ncol=2)
        ax_norm.grid(alpha=0.3, which="both")
    axes[-1].set_xlabel("step")
    return fig
