"""The messages between the driver, the shard workers and the parameter actors, defined once.

One step: the driver sends an `Order`; the parameter actors publish their weight slices; each
worker returns one gradient slice per parameter actor and its `Sums`; each parameter actor adds
the slices in worker-rank order, steps, and returns a `StepInfo`. Around the steps: a worker
that has read its rows returns a `ShardSummary`, and a parameter actor's state for a checkpoint
is a `Snapshot`; the direct engine's links start at a parameter actor's `Endpoint`. All are small named tuples of plain numbers, dicts and numpy arrays, so they
pickle cheaply on any transport.
"""

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # (data.checks loads pyarrow; this module loads numpy only)
    from distbp.data.checks import RowCounts

# A stats vector (float64): sums over rows that add across workers. Its layout is read only
# here: elsewhere through stats_vector, rows_of, loss_sum_of, delta_means and figures.
_LOSS, _COUNT, _CORRECT, _SECONDS = 0, 1, 2, 3
_DELTAS = 4  # then one sum of |d_l| per layer, l = 1..L


def stats_vector(loss_sum, count, correct, seconds, delta_abs):
    """(stats_size(L),) float64: the loss sum, row count, correct count, seconds, then the
    sum of |d_l| per layer."""
    out = np.empty(stats_size(len(delta_abs)))
    out[:_DELTAS] = loss_sum, count, correct, seconds
    out[_DELTAS:] = delta_abs
    return out


def stats_size(num_layers):
    """The length of a stats vector of a network of `num_layers` layers."""
    return _DELTAS + num_layers


def rows_of(stats):
    """The rows a stats vector covers."""
    return stats[_COUNT]


def loss_sum_of(stats):
    """The loss summed over the rows a stats vector covers."""
    return stats[_LOSS]


def delta_means(stats, widths):
    """Per layer, the mean |d_l| over rows and units: the sum / (rows x the layer's width)."""
    return [float(total / (stats[_COUNT] * width)) for total, width in zip(stats[_DELTAS:], widths)]


class Order(NamedTuple):
    """What the driver asks of one step."""

    step: int  # counts from 1; a parameter actor applies only the step after its last
    lr: float
    evaluate: bool  # validation sums, per-layer norms and mean |delta| on this step
    keep: bool  # early stopping: the parameter actors keep this step's input weights
    rows: int = 0  # the step's training rows, which the workers' counts must add up to (0: unchecked)


class Sums(NamedTuple):
    """A worker's sums for one step."""

    train: np.ndarray  # stats vector over its rows of the step's batch
    val: np.ndarray | None  # stats vector over its validation rows (forward only), on evaluate steps


class StepInfo(NamedTuple):
    """What a parameter actor returns once it has applied a step."""

    step: int
    train: np.ndarray  # the workers' train stats vectors, added in rank order
    val: np.ndarray | None  # the workers' validation stats added, or None
    slowest: float  # the slowest worker's compute seconds
    squares: np.ndarray  # evaluate steps: per layer of this actor's slice, the mean gradient's sum of squares
    applied_at: float  # time.time() when the update was applied
    workers: int = 0  # the shard workers whose gradients made the update


class ShardSummary(NamedTuple):
    """What a worker returns once it has read its shard: sums the driver merges."""

    counts: "RowCounts"  # NaN or inf values, rows dropped, labels, rows, feature moments (data.checks)
    blas: dict  # what its bits depend on: blas.describe(), with rank and node


class Endpoint(NamedTuple):
    """Where a parameter actor takes its workers' links (the direct engine)."""

    host: str
    port: int
    segment: str | None  # its weights' shared-memory segment, for a worker on its node; else None


class Snapshot(NamedTuple):
    """A parameter actor's state for a checkpoint (its slice), or all of them joined."""

    params: np.ndarray  # the weights
    opt_state: dict  # name -> array: flat arrays cut like the weights, scalars whole
    best_params: np.ndarray | None  # early stopping: the input weights of the best validation step


# The task engine carries a step in Ray tasks, whose values go by position (num_returns): a
# worker's step returns its S gradient slices, then its Sums; a parameter actor's apply takes
# the K workers' slices of its part of the vector, then their K Sums. Only these four read
# those positions.
def step_returns(slices, sums):
    """What a worker's step returns: its gradient slices, one per parameter actor, then its Sums."""
    return (*slices, sums)


def split_step_returns(values):
    """(the gradient slices, the Sums) of a worker's step_returns, or of their object references."""
    return values[:-1], values[-1]


def apply_parts(slices, sums):
    """A parameter actor's apply arguments: the workers' slices in rank order, then their Sums."""
    return (*slices, *sums)


def split_apply_parts(parts):
    """(the K gradient slices, the K Sums) of apply_parts."""
    k = len(parts) // 2
    return parts[:k], parts[k:]


def add_sums(sums):
    """(train, val, slowest) of the workers' Sums, added in rank order."""
    train = np.sum([s.train for s in sums], axis=0)
    vals = [s.val for s in sums if s.val is not None]
    return train, (np.sum(vals, axis=0) if vals else None), max(s.train[_SECONDS] for s in sums)


def figures(stats, task, targets, sst=None, prefix=""):
    """What a stats vector says, as Python floats: the mean loss, then the accuracy
    (classification), or the RMSE over every target value and R^2 = 1 - SSE / SST
    (regression; R^2 when `sst`, the targets' total sum of squares, is known). The mse loss
    is half the squared error, so SSE = 2 * loss sum."""
    n = stats[_COUNT]
    out = {f"{prefix}loss": float(stats[_LOSS] / n)}
    if task == "classification":
        out[f"{prefix}accuracy"] = float(stats[_CORRECT] / n)
    else:
        out[f"{prefix}rmse"] = float(np.sqrt(2 * stats[_LOSS] / (n * targets)))
        if sst:
            out[f"{prefix}r2"] = float(1 - 2 * stats[_LOSS] / sst)
    return out


def layer_norms(infos, bounds, num_layers):
    """(L,) norm of each layer's mean gradient, from the squares that the parameter actors
    report for their slices; `bounds[i]` are actor i's [(layer, start, stop)]."""
    squares = np.zeros(num_layers)
    for info, layers in zip(infos, bounds):
        for (l, _, _), sq in zip(layers, info.squares):
            squares[l] += sq
    return np.sqrt(squares)


def rank_order_sum(grads, out):
    """out = grads[0] + grads[1] + ..., added in this order (worker rank, never arrival):
    the one reduce of both engines, so that their bits are the same. `grads` may be an
    iterator whose slices arrive one by one (a buffer may be reused once it was added); the
    first may be `out` itself. g_0 + g_1 is one pass, the same bits as copying g_0 and adding g_1."""
    first = None
    for k, g in enumerate(grads):
        if k == 0:
            first = g
        elif k == 1:
            np.add(first, g, out=out)
        else:
            out += g
    if first is None:
        raise ValueError("no gradient to add")
    if k == 0 and first is not out:
        np.copyto(out, first)
    return out
