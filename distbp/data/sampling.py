"""Mini-batch selection: which training rows make up batch `index` of epoch `epoch`.

A batch is a pure function of (seed, epoch, index, batch, n), where rows are named by their
ordinal: the position of a row among the n training rows in file order. It therefore does not
depend on the worker count: every worker computes the same batch and keeps the ordinals that
fall in its own contiguous row range (`in_range`), and the union over any partition of [0, n)
into ranges is the whole batch.

Each epoch visits the rows in the order of a keyed pseudo-random permutation of [0, n), so
that every row appears exactly once per epoch. The permutation is never materialised (that
would cost O(n) memory per epoch): it is a 4-round Feistel network on [0, 2**k), the smallest
power of 2 >= n, with cycle-walking (re-encrypt until the value is < n; Black & Rogaway 2002),
keyed by (seed, epoch) through splitmix64. Mapping one batch of positions costs
O(batch) memory and a few vectorised uint64 operations per round.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 4
_M64 = (1 << 64) - 1
# splitmix64 constants (Steele, Lea & Flood 2014, as in Vigna's reference code)
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U_MIX1, _U_MIX2, _U29 = np.uint64(_MIX1), np.uint64(_MIX2), np.uint64(29)


def _splitmix64(x: int) -> int:
    """One splitmix64 output for state x (Python ints, mod 2**64)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def _round_keys(seed: int, epoch: int) -> list[int]:
    """ROUNDS 64-bit keys derived from (seed, epoch); a different pair gives unrelated keys."""
    state = _splitmix64(_splitmix64(seed & _M64) ^ (epoch & _M64))
    keys = []
    for _ in range(ROUNDS):
        state = (state + _GOLDEN) & _M64
        keys.append(_splitmix64(state))
    return keys


def _domain_bits(n: int) -> int:
    """k such that the Feistel domain [0, 2**k) is the smallest power of 2 (at least 4) holding [0, n)."""
    return max(2, (n - 1).bit_length())


def _feistel(x: np.ndarray, keys: list[np.uint64], bits: int) -> np.ndarray:
    """The keyed bijection on [0, 2**bits), applied elementwise to 1-D uint64 `x`.

    The value is split into a high part of `hi` bits and a low part of `lo` bits (they differ
    by at most one); each round maps (high, low) -> (low, high ^ F(low)), which is invertible
    whatever F is, so the parts swap widths from round to round.
    """
    hi, lo = bits - bits // 2, bits // 2
    high, low = x >> np.uint64(lo), x & np.uint64((1 << lo) - 1)
    for key in keys:
        # round function: a multiply-xorshift-multiply hash of (low + key), its top `hi` bits
        f = low + key
        f *= _U_MIX1
        f ^= f >> _U29
        f *= _U_MIX2
        f >>= np.uint64(64 - hi)
        f ^= high
        high, low = low, f
        hi, lo = lo, hi
    return (high << np.uint64(lo)) | low


def permute(positions, n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of [0, n) applied to `positions` (each in [0, n)) -> int64 ordinals."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pos = np.asarray(positions, dtype=np.int64)
    shape, pos = pos.shape, pos.reshape(-1)  # 1-D: uint64 arithmetic on arrays wraps silently
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    bits, limit = _domain_bits(n), np.uint64(n)
    keys = [np.uint64(k) for k in _round_keys(seed, epoch)]
    x = _feistel(pos.astype(np.uint64), keys, bits)
    # cycle-walking: a value that left [0, n) is encrypted again until it comes back. The
    # domain is < 2n (< 4 for tiny n), so each pass at least halves the stragglers on average.
    pending = np.flatnonzero(x >= limit)
    values = x[pending]
    while pending.size:
        values = _feistel(values, keys, bits)
        back = values < limit
        x[pending[back]] = values[back]
        pending, values = pending[~back], values[~back]
    return x.astype(np.int64).reshape(shape)


def steps_per_epoch(n: int, batch: int) -> int:
    """Batches in one pass over n rows: ceil(n / batch); the last one may be partial."""
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1, got n={n}, batch={batch}")
    return -(-n // batch)


def epoch_and_index(step: int, n: int, batch: int) -> tuple[int, int]:
    """Global optimizer step (1-based) -> (epoch, batch index within it), both 0-based."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return divmod(step - 1, steps_per_epoch(n, batch))


def batch_size(step: int, n: int, batch: int | None) -> int:
    """Rows in step `step`'s batch: n for the full batch (None), else min(batch, n - index*batch)."""
    if batch is None:
        return n
    _, index = epoch_and_index(step, n, batch)
    return min(batch, n - index * batch)


def batch_ordinals(seed: int, epoch: int, index: int, batch: int, n: int) -> np.ndarray:
    """Ordinals of batch `index` of `epoch`, sorted ascending: (min(batch, n - index*batch),) int64.

    Batch `index` holds the permutation positions [index*batch, min((index+1)*batch, n)).
    """
    if not 0 <= index < steps_per_epoch(n, batch):
        raise ValueError(f"batch index {index} outside [0, {steps_per_epoch(n, batch)})")
    start = index * batch
    positions = np.arange(start, min(start + batch, n), dtype=np.int64)
    return np.sort(permute(positions, n, seed, epoch))


def in_range(ordinals: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The sorted `ordinals` that fall in a worker's rows [start, stop), as a view."""
    lo, hi = np.searchsorted(ordinals, [start, stop])
    return ordinals[lo:hi]
