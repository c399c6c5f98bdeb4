"""Synthetic and fixed data sets as pyarrow tables: float features x0, x1, ... and a `label` column.

Every set is deterministic given its seed (numpy.random.default_rng). `make_dataset` is the
one entry point; `distbp.data.tables.write_table` puts a table on disk. numpy and pyarrow only;
scikit-learn is imported only for `digits`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from distbp.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

DIGITS_ROWS = 1797


def _table(x: np.ndarray, label: np.ndarray) -> pa.Table:
    """x: (rows, features); each column becomes x<j>. The copy to column order keeps each
    column contiguous, so pyarrow can wrap it without another copy."""
    import pyarrow as pa  # here, so that the job schema can read KINDS without pyarrow

    columns = np.ascontiguousarray(x.T)  # (features, rows)
    data = {f"x{j}": pa.array(columns[j]) for j in range(columns.shape[0])}
    data["label"] = pa.array(label.astype(np.int64))
    return pa.table(data)


def xor(rows: int, rng: np.random.Generator, noise: float = 0.0) -> pa.Table:
    """2 features uniform in [-1, 1]; label 1 where the signs of x0 and x1 differ, else 0.
    `noise` is the std of gaussian jitter added to the features after labelling."""
    x = rng.uniform(-1.0, 1.0, size=(rows, 2))
    label = (x[:, 0] > 0) != (x[:, 1] > 0)
    if noise:
        x += rng.normal(0.0, noise, size=x.shape)
    return _table(x, label)


def _class_sizes(rows: int, classes: int) -> list[int]:
    return [rows // classes + (c < rows % classes) for c in range(classes)]


def spirals(rows: int, rng: np.random.Generator, classes: int = 3, noise: float = 0.2) -> pa.Table:
    """Interleaved spiral arms, one per class (the CS231n set): radius r in [0, 1],
    angle = 4 * class + 4 * r + noise * N(0, 1). Rows are shuffled."""
    xs, labels = [], []
    for c, size in enumerate(_class_sizes(rows, classes)):
        r = np.linspace(0.0, 1.0, size)
        theta = 4.0 * c + 4.0 * r + noise * rng.standard_normal(size)
        xs.append(np.column_stack([r * np.sin(theta), r * np.cos(theta)]))
        labels.append(np.full(size, c))
    order = rng.permutation(rows)
    return _table(np.concatenate(xs)[order], np.concatenate(labels)[order])


def blobs(rows: int, rng: np.random.Generator, classes: int = 3, features: int = 2,
          spread: float = 1.0) -> pa.Table:
    """Gaussian clusters of std `spread` around seeded centres at least 8 * spread apart
    (so nearly every row is separable). Rows are shuffled."""
    centres: list[np.ndarray] = []
    box = 10.0 * spread
    while len(centres) < classes:
        for _ in range(200):
            c = rng.uniform(-box, box, size=features)
            if all(np.linalg.norm(c - other) >= 8.0 * spread for other in centres):
                centres.append(c)
                break
        else:
            box *= 1.5  # crowded: widen the box and keep placing
    sizes = _class_sizes(rows, classes)
    label = np.repeat(np.arange(classes), sizes)
    x = np.asarray(centres)[label] + spread * rng.standard_normal((rows, features))
    order = rng.permutation(rows)
    return _table(x[order], label[order])


def teacher(rows: int, rng: np.random.Generator, layers=(784, 256, 128, 10),
            chunk_rows: int = 8192) -> pa.Table:
    """Standard normal features labelled by a fixed random tanh network ("teacher"):
    label = argmax of its output. Features = layers[0], classes = layers[-1]. The teacher's
    weights depend on the seed only, not on `rows`. Built in chunks; features are float32."""
    layers = [int(n) for n in layers]
    weights = [(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)  # (n_in, n_out)
               for n_in, n_out in zip(layers[:-1], layers[1:])]  # 1/sqrt(n_in): zs of unit scale
    columns = np.empty((layers[0], rows), dtype=np.float32)  # (features, rows)
    label = np.empty(rows, dtype=np.int64)
    for lo in range(0, rows, chunk_rows):
        hi = min(lo + chunk_rows, rows)
        x = rng.standard_normal((hi - lo, layers[0]), dtype=np.float32)  # (chunk, features)
        activations = x
        for l, w in enumerate(weights):
            zs = activations @ w
            activations = zs if l == len(weights) - 1 else np.tanh(zs)
        label[lo:hi] = activations.argmax(axis=1)
        columns[:, lo:hi] = x.T
    import pyarrow as pa

    data = {f"x{j}": pa.array(columns[j]) for j in range(layers[0])}
    data["label"] = pa.array(label)
    return pa.table(data)


def digits(rows: int | None, rng: np.random.Generator) -> pa.Table:
    """The 8x8 handwritten digits shipped inside scikit-learn: 1,797 rows, 64 pixel features
    (0..16), labels 0..9. `rows` takes the first rows; None takes all. No download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits set needs scikit-learn, which is not installed",
                        "pip install 'distbp[digits]'") from None
    bunch = load_digits()
    return _table(bunch.data[:rows], bunch.target[:rows])


KINDS = {"xor": xor, "spirals": spirals, "blobs": blobs, "teacher": teacher, "digits": digits}
_OPTIONS = {"xor": {"noise"}, "spirals": {"classes", "noise"}, "blobs": {"classes", "features", "spread"},
            "teacher": {"layers"}, "digits": set()}


def _check_options(kind: str, options: dict) -> None:
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        known = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise DataError(f"data.make: unknown option {unknown[0]!r} for {kind}", f"options: {known}")
    for key in ("classes", "features"):
        value = options.get(key)
        least = 2 if key == "classes" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise DataError(f"data.make.{key}: expected an integer >= {least}, got {value!r}")
    for key in ("noise", "spread"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value < 0 or (key == "spread" and value == 0)):
            raise DataError(f"data.make.{key}: expected a number > 0, got {value!r}")
    layers = options.get("layers")
    if layers is not None and (not isinstance(layers, (list, tuple)) or len(layers) < 2
                               or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers)
                               or layers[-1] < 2):
        raise DataError(f"data.make.layers: expected a list of at least 2 positive integers "
                        f"ending in the class count (>= 2), got {layers!r}")


def make_dataset(kind: str, rows: int | None, seed: int = 0, **options) -> pa.Table:
    """A table of the set `kind` (xor, spirals, blobs, teacher, digits) with `rows` rows.
    `rows` is required for the synthetic sets; for digits it is optional (None = all 1,797)."""
    if kind not in KINDS:
        raise DataError(f"data.make.kind: unknown data set {kind!r}", f"choose one of {', '.join(KINDS)}")
    limit = DIGITS_ROWS if kind == "digits" else float("inf")
    integer = isinstance(rows, (int, np.integer)) and not isinstance(rows, bool)
    if (rows is not None or kind != "digits") and not (integer and 1 <= rows <= limit):
        bound = f"between 1 and {limit}" if kind == "digits" else "a positive integer"
        raise DataError(f"data.make.rows: {kind} needs rows {bound}, got {rows!r}")
    _check_options(kind, options)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed: expected an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    return KINDS[kind](None if rows is None else int(rows), rng, **options)
