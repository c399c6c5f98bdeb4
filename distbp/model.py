"""The trained model file (model.npz): save, load, and predict with the stored preprocessing.

model.npz holds W1..WL (inputs, outputs), b1..bL, x_mean/x_std when inputs are standardised,
and `spec`, a JSON string (format_version 1) with the architecture, task, feature names,
label column(s) and the classes in sorted order. Nothing in it needs pickle.
"""

import json
from dataclasses import dataclass, field

import numpy as np

from . import nn
from .checkpoint import atomic_savez
from .errors import DataError, UsageError

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
        """Class labels (rows,) for classification, targets (rows, n_targets) for regression."""
        out = self.predict_proba(X)
        if self.task == "regression":
            return out
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


def load_model(path):
    """Read a model.npz written by distbp (never unpickles anything)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["spec"]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise UsageError(f"{path}: unsupported model format_version {meta.get('format_version')!r}")
            spec = nn.Spec(meta["layers"], meta["activations"], meta["output"], meta["loss"], meta.get("init", "xavier"), meta["dtype"])
            params = np.concatenate(
                [np.concatenate([z[f"W{l}"].ravel(), z[f"b{l}"]]) for l in range(1, spec.num_layers + 1)]
            ).astype(spec.np_dtype)
            x_mean = z["x_mean"] if "x_mean" in z.files else None
            x_std = z["x_std"] if "x_std" in z.files else None
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{path}: no such model file") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: not a distbp model.npz ({type(err).__name__}: {err})") from None
    return Model(spec, params, meta["task"], meta["features"], meta["labels"], meta["classes"], x_mean, x_std)
