"""Row math on arrays, no file in sight: contiguous shard ranges, the seeded validation split,
non-finite counts, and the partial sums behind standardisation that add up across shards.
numpy only."""

from __future__ import annotations

import numpy as np

from distbp.errors import DataError

# ---------------------------------------------------------------- shards and validation

def shard_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """k contiguous ranges that cover [0, n) once; the first n % k ranges hold one extra row."""
    if k < 1 or n < 0:
        raise ValueError(f"shard_ranges needs k >= 1 and n >= 0, got n={n}, k={k}")
    if k > n:
        raise DataError(f"more workers ({k}) than rows ({n}) to share among them",
                        "lower cluster.workers")
    size, extra = divmod(n, k)
    bounds = [r * size + min(r, extra) for r in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic is intended)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def validation_mask(start: int, stop: int, fraction: float, seed: int, chunk: int = 1 << 20) -> np.ndarray:
    """(stop - start,) bool: True where global row i is held out. A pure function of
    (seed, i), so it does not depend on how the rows are sharded."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1], got {fraction}")
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    out = np.empty(stop - start, dtype=bool)
    for lo in range(start, stop, chunk):
        i = np.arange(lo, min(lo + chunk, stop), dtype=np.uint64)
        u = (_splitmix64(key + (i + np.uint64(1)) * _GAMMA) >> np.uint64(11)) * 2.0**-53  # [0, 1)
        out[lo - start: lo - start + len(i)] = u < fraction
    return out


# ---------------------------------------------------------------- non-finite values
def nonfinite_counts(x: np.ndarray) -> np.ndarray:
    """(n_columns,) int64: how many NaN or inf values each column holds."""
    return (~np.isfinite(x)).sum(axis=0, dtype=np.int64)


def finite_row_mask(x: np.ndarray) -> np.ndarray:
    """(rows,) bool: True where every value of the row is finite."""
    return np.isfinite(x).all(axis=1)


# ---------------------------------------------------------------- standardisation

def moment_sums(x: np.ndarray, shift: np.ndarray | float = 0.0):
    """(sum, sumsq, count) of x - shift per column, in float64: partial sums that add up across
    shards. A common `shift` near the mean (say the first row) avoids cancellation."""
    d = np.asarray(x, dtype=np.float64) - shift
    return d.sum(axis=0), np.einsum("ij,ij->j", d, d), x.shape[0]


def finalize_standardization(sum, sumsq, count, shift: np.ndarray | float = 0.0):
    """(mean, std) from summed `moment_sums`. A column whose spread is zero or lost in
    rounding gets std 1.0, so dividing by it leaves the column centred, not infinite."""
    if count <= 0:
        raise ValueError("finalize_standardization needs count >= 1")
    mean_shifted = np.asarray(sum, dtype=np.float64) / count
    meansq = np.asarray(sumsq, dtype=np.float64) / count
    var = np.maximum(meansq - mean_shifted**2, 0.0)
    std = np.where(var <= 1e-12 * meansq, 1.0, np.sqrt(var))  # also catches var == 0 == meansq
    return mean_shifted + shift, std


def shard_moments(x: np.ndarray):
    """(count, mean, m2) per column of one shard, in float64; m2 = sum of squared deviations
    from the shard's own mean, computed in two passes so large offsets lose no precision."""
    if len(x) == 0:
        return 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.mean(axis=0, dtype=np.float64)
    m2 = np.zeros(x.shape[1])
    for start in range(0, len(x), 8192):  # float64 a block at a time: no full-size copy
        d = x[start : start + 8192].astype(np.float64) - mean
        m2 += np.einsum("ij,ij->j", d, d)
    return len(x), mean, m2


def merge_moments(parts):
    """(mean, std) over all rows from the shards' `shard_moments`, combined in the given order
    with Chan et al.'s pairwise update. A column with no spread gets std 1.0."""
    n, mean, m2 = 0, None, None
    for count, mean_k, m2_k in parts:
        if count == 0:
            continue
        if n == 0:
            n, mean, m2 = count, np.array(mean_k, np.float64), np.array(m2_k, np.float64)
            continue
        delta = mean_k - mean
        total = n + count
        mean = mean + delta * (count / total)
        m2 = m2 + m2_k + delta * delta * (n * count / total)
        n = total
    if n == 0:
        raise ValueError("merge_moments needs at least one row")
    var = m2 / n
    std = np.where(var <= (1e-12 * mean) ** 2, 1.0, np.sqrt(var))  # also var == 0
    return mean, std
