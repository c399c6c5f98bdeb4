"""The trained model file (model.npz): save, load, and predict with the stored preprocessing.

model.npz holds W1..WL (inputs, outputs), b1..bL, x_mean/x_std when inputs are standardised,
and `spec`, a JSON string (format_version 1) with the architecture, task, feature names,
label column(s) and the classes in sorted order. Nothing in it needs pickle.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np

from distbp.backprop import nn
from distbp.errors import DataError, UsageError
from distbp.run.checkpoint import atomic_savez, changed

FORMAT_VERSION = 1


@dataclass
class Model:
    """A trained network plus what it needs to read raw features: standardisation and classes."""

    spec: nn.Spec
    params: np.ndarray  # (num_params,) flat, in spec.dtype
    task: str = "classification"
    features: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    classes: list = field(default_factory=list)
    x_mean: np.ndarray | None = None  # (n_features,)
    x_std: np.ndarray | None = None

    def standardized(self, X):
        """X cast to the model's dtype, then standardised in that dtype: the workers' own
        path in training, so training, eval and predict see the same inputs, bit for bit."""
        dtype = self.spec.np_dtype
        X = np.array(X, dtype=dtype)  # a copy: standardised in place
        if X.ndim != 2 or X.shape[1] != self.spec.layers[0]:
            raise DataError(f"expected {self.spec.layers[0]} feature columns {self.features}, got shape {X.shape}")
        if self.x_mean is not None:
            X -= self.x_mean.astype(dtype)
            X /= self.x_std.astype(dtype)
        return X

    def predict_proba(self, X):
        """Class probabilities (rows, classes) for classification; outputs for regression."""
        out = nn.predict(self.spec, self.params, self.standardized(X))
        if self.spec.output == "sigmoid":  # one unit holds P(class 1)
            out = np.hstack([1 - out, out])
        return out

    def predict(self, X):
        """Class labels (rows,) for classification; for regression the targets (rows,) for
        one target and (rows, targets) for several, as scikit-learn returns them."""
        out = self.predict_proba(X)
        if self.task == "regression":
            return out[:, 0] if out.shape[1] == 1 else out
        return np.asarray(self.classes, dtype=object if isinstance(self.classes[0], str) else None)[out.argmax(axis=1)]

    def spec_json(self):
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "layers": list(self.spec.layers),
                "activations": list(self.spec.activations),
                "output": self.spec.output,
                "loss": self.spec.loss,
                "init": self.spec.init,
                "dtype": self.spec.dtype,
                "task": self.task,
                "features": list(self.features),
                "labels": list(self.labels),
                "classes": list(self.classes),
            }
        )

    def save(self, path):
        """Write model.npz atomically (temporary file, fsync, rename)."""
        arrays = {"spec": np.array(self.spec_json())}
        for l, (W, b) in enumerate(nn.views(self.spec, self.params), start=1):
            arrays[f"W{l}"], arrays[f"b{l}"] = W, b
        if self.x_mean is not None:
            arrays["x_mean"], arrays["x_std"] = self.x_mean, self.x_std
        atomic_savez(path, arrays)


_SPEC_TYPES = {  # spec key -> (the JSON types it may hold, what the error says)
    "layers": (list, "a list of widths"), "activations": (list, "a list of names"), "output": (str, "a name"),
    "loss": (str, "a name"), "dtype": (str, "a name"), "task": (str, "classification or regression"),
    "features": (list, "a list of column names"), "labels": (list, "a list of column names"), "classes": (list, "a list"),
}


def load_model(path):
    """Read a model.npz written by distbp (never unpickles anything). Anything else, or a
    file whose arrays do not fit its spec, is a UsageError naming the file and what is wrong."""
    import zipfile

    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise UsageError(f"{path}: not a regular file (a pipe, socket or device)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"\x93NUM"):
            raise UsageError(f"{path}: not a distbp model.npz (a single .npy array)")
        if magic != b"PK\x03\x04":
            raise UsageError(f"{path}: not a distbp model.npz (not an npz file)")
        _check_headers(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except UsageError:
        raise
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a model.npz") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such model file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path}: not a distbp model.npz ({type(err).__name__}: {err})") from None
    except (AttributeError, TypeError):  # np.load gave one array: a .npy file, not a .npz
        raise UsageError(f"{path}: not a distbp model.npz (a single .npy array)") from None
    try:
        meta = json.loads(str(arrays["spec"]))
    except KeyError:
        raise UsageError(f"{path}: not a distbp model.npz (no 'spec')") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not a distbp model.npz (spec is not JSON: {err})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: not a distbp model.npz (spec is not a JSON object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path}: unsupported model format_version {meta.get('format_version')!r}", hint=f"this distbp reads format_version {FORMAT_VERSION}")
    for key, (kind, what) in _SPEC_TYPES.items():
        if not isinstance(meta.get(key), kind):
            raise UsageError(f"{path}: spec.{key}: expected {what}, got {meta.get(key)!r}")
    task = meta["task"]
    if task not in ("classification", "regression"):
        raise UsageError(f"{path}: spec.task: expected classification or regression, got {task!r}")
    if not all(isinstance(name, str) for name in meta["features"] + meta["labels"] + meta["activations"]):
        raise UsageError(f"{path}: spec: features, labels and activations must be strings")
    try:
        spec = nn.Spec(meta["layers"], meta["activations"], meta["output"], meta["loss"], meta.get("init", "xavier"), meta["dtype"])
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f"{path}: spec does not describe a network distbp can run ({err})") from None
    _check_fits(path, spec, meta, arrays)
    if changed(arrays):  # last: a file that breaks a rule above gets that rule's words
        raise UsageError(f"{path}: its arrays do not match the SHA-256 digest distbp wrote with them (the file was changed after it was written)")
    params = np.concatenate([np.concatenate([arrays[f"W{l}"].ravel(), arrays[f"b{l}"]]) for l in range(1, spec.num_layers + 1)]).astype(spec.np_dtype)
    x_mean, x_std = arrays.get("x_mean"), arrays.get("x_std")
    return Model(spec, params, task, meta["features"], meta["labels"], meta["classes"], x_mean, x_std)


def _check_headers(path):
    """Before any array is read: each member's .npy header may not declare more bytes than the
    member holds (a forged header would otherwise ask for any amount of memory)."""
    import math
    import zipfile

    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            try:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
            except ValueError as err:
                raise UsageError(f"{path}: {name}: not a .npy array ({err})") from None
            declared = math.prod(shape) * dtype.itemsize
            if dtype.hasobject or declared > info.file_size:
                raise UsageError(f"{path}: {name}: its header declares {dtype} {tuple(shape)} ({declared:,} bytes), the file holds {info.file_size:,}")


def _check_fits(path, spec, meta, arrays):
    """The arrays and names have the shapes the spec says."""
    n_in, n_out = spec.layers[0], spec.layers[-1]
    for l in range(1, spec.num_layers + 1):
        for name, shape in ((f"W{l}", (spec.layers[l - 1], spec.layers[l])), (f"b{l}", (spec.layers[l],))):
            array = arrays.get(name)
            if array is None:
                raise UsageError(f"{path}: not a distbp model.npz (no {name!r})")
            if array.shape != shape or array.dtype.kind != "f":
                raise UsageError(f"{path}: {name}: expected floats of shape {shape}, got {array.dtype} {array.shape}")
    for name in [f"{kind}{l}" for l in range(1, spec.num_layers + 1) for kind in "Wb"] + ["x_mean", "x_std"]:
        if name in arrays and arrays[name].dtype.kind == "f" and not np.isfinite(arrays[name]).all():
            raise UsageError(f"{path}: {name}: holds NaN or infinite values; a model must hold finite numbers (was it written by a run that diverged?)")
    if ("x_mean" in arrays) != ("x_std" in arrays):
        raise UsageError(f"{path}: x_mean and x_std come together, found only one")
    for name in ("x_mean", "x_std"):
        if name in arrays and (arrays[name].shape != (n_in,) or arrays[name].dtype.kind != "f"):
            raise UsageError(f"{path}: {name}: expected {n_in} floats, got {arrays[name].dtype} {arrays[name].shape}")
    if len(meta["features"]) != n_in:
        raise UsageError(f"{path}: spec.features: expected {n_in} names (the input width), got {len(meta['features'])}")
    if not meta["labels"]:
        raise UsageError(f"{path}: spec.labels: expected at least one label column")
    if meta["task"] == "classification":
        classes = len(meta["classes"])
        if classes < 2 or classes != (2 if spec.output == "sigmoid" else n_out):
            raise UsageError(f"{path}: spec.classes: {classes} classes do not fit a {spec.output} output of {n_out} units")
    elif len(meta["labels"]) != n_out:
        raise UsageError(f"{path}: spec.labels: {len(meta['labels'])} targets do not fit {n_out} outputs")
