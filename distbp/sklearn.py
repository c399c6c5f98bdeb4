"""scikit-learn estimators over distbp: `MLPClassifier` and `MLPRegressor`.

    from distbp.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(64,), steps=300, workers=2).fit(X, y)
    clf.predict(X), clf.predict_proba(X), clf.score(X, y)

`fit(X, y)` takes numpy arrays, pandas or pyarrow tables. It trains through the same path as
`distbp run`: the rows go to a Parquet file in a temporary folder, a job is built from the
parameters (hidden_layer_sizes are the hidden widths only; the input and output widths come
from the data), and distbp's trainer runs it on Ray, so the same job and seed give the same
bits as `distbp run` on that file. No run folder is written unless `output_dir` is given (then
every fit writes there, replacing the last one), so cross-validation folds never collide.

Ray: the first fit starts an embedded, loopback-only Ray (or joins `address`), and every later
fit in the process reuses it, as `distbp.train` does; it shuts down when the process exits or
at `distbp.shutdown()`.

Classes can be any labels numpy can sort (ints, strings, floats, bools); they are trained as
their positions in `classes_`, exactly as distbp encodes a label column. Two classes use one
sigmoid unit, more use softmax. Regression fits identity outputs with the mse loss.
"""

import os
import shutil
import tempfile

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


def _as_array(X):
    """A pyarrow Table becomes a pandas DataFrame (so feature_names_in_ is kept), or without
    pandas a 2-D numpy array; anything else is passed on as given."""
    if type(X).__module__.startswith("pyarrow"):
        try:
            import pandas  # noqa: F401

            return X.to_pandas()
        except ImportError:
            return np.column_stack([column.to_numpy() for column in X.columns])
    return X


class _MLP(BaseEstimator):
    _task = None

    def __init__(
        self, hidden_layer_sizes=(64,), activation="tanh", optimizer="adam", lr=0.01, batch="full", steps=None,
        epochs=None, schedule=None, weight_decay=0.0, standardize=True, dtype="float32", workers=2, seed=0,
        output_dir=None, address=None,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.optimizer = optimizer
        self.lr = lr
        self.batch = batch
        self.steps = steps
        self.epochs = epochs
        self.schedule = schedule
        self.weight_decay = weight_decay
        self.standardize = standardize
        self.dtype = dtype
        self.workers = workers
        self.seed = seed
        self.output_dir = output_dir
        self.address = address

    # -- what subclasses fill in ----------------------------------------------------------
    def _targets(self, y):
        """(label columns {name: values}, output width, output, loss)."""
        raise NotImplementedError

    def _job(self, path, labels, n_features, n_out, output, loss, out_dir, n_rows):
        train = {"optimizer": {"name": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay}, "batch": self.batch}
        if self.epochs is not None:
            train["epochs"] = self.epochs
        else:
            train["steps"] = self.steps if self.steps is not None else 500
        if self.schedule is not None:
            train["schedule"] = dict(self.schedule)
        hidden = [self.hidden_layer_sizes] if np.isscalar(self.hidden_layer_sizes) else list(self.hidden_layer_sizes)
        return {
            "name": "sklearn",
            "seed": self.seed,
            "data": {"path": path, "label": labels if len(labels) > 1 else labels[0], "task": self._task, "standardize": self.standardize},
            "model": {"layers": [n_features, *map(int, hidden), n_out], "activation": self.activation, "output": output, "loss": loss, "dtype": self.dtype},
            "train": train,
            "cluster": {"workers": int(min(self.workers, n_rows)), "address": self.address},
            "output": {"dir": out_dir, "plot": self.output_dir is not None},
        }

    def fit(self, X, y):
        import pyarrow as pa

        from distbp.api import load
        from distbp.data import tables
        from distbp.run.model import load_model
        from distbp.trainer import Trainer

        X, y = validate_data(self, _as_array(X), y, multi_output=self._task == "regression", y_numeric=self._task == "regression", dtype=np.float64)
        labels, n_out, output, loss = self._targets(y)
        names = [f"x{i}" for i in range(X.shape[1])]  # model.npz keeps the DataFrame's names (feature_names_in_) as well
        scratch = tempfile.mkdtemp(prefix="distbp-fit-")
        try:
            path = os.path.join(scratch, "rows.parquet")
            tables.write_table(pa.table({**{n: X[:, i] for i, n in enumerate(names)}, **labels}), path)
            out_dir = self.output_dir or os.path.join(scratch, "run")
            job = load(self._job(path, list(labels), X.shape[1], n_out, output, loss, out_dir, len(X)))
            result = Trainer(job, force=True, keep_ray=True).run()
            self.model_ = load_model(result.model_path)
            self.final_ = result.final
            self.n_steps_ = result.steps
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self

    def _raw(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, _as_array(X), reset=False, dtype=np.float64)
        return self.model_.predict_proba(X).astype(np.float64)  # float64, as scikit-learn returns (same values)


class MLPClassifier(ClassifierMixin, _MLP):
    """A fully connected classifier trained data-parallel on Ray by distbp. Parameters mirror
    the job file: hidden_layer_sizes (hidden widths), activation, optimizer, lr, batch ("full"
    or a mini-batch size), steps (default 500) or epochs, schedule (a dict as train.schedule),
    weight_decay, standardize, dtype, workers, seed, output_dir (None: no run folder), address
    (None: an embedded Ray)."""

    _task = "classification"

    def _targets(self, y):
        check_classification_targets(y)
        self.classes_, index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"MLPClassifier needs at least 2 classes in y, got {len(self.classes_)} class")
        binary = len(self.classes_) == 2
        return {"label": index.astype(np.int64)}, 1 if binary else len(self.classes_), "sigmoid" if binary else "softmax", "binary_cross_entropy" if binary else "cross_entropy"

    def predict_proba(self, X):
        """(rows, classes): the probability of each class of `classes_`."""
        return self._raw(X)

    def predict(self, X):
        proba = self._raw(X)  # first: it checks that the estimator is fitted
        return self.classes_[np.argmax(proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class MLPRegressor(RegressorMixin, _MLP):
    """A fully connected regressor (identity outputs, mse loss) trained data-parallel on Ray
    by distbp; the parameters are MLPClassifier's. One target predicts (rows,), several
    (rows, targets)."""

    _task = "regression"

    def _targets(self, y):
        y = np.asarray(y, dtype=np.float64)
        self._one_target = y.ndim == 1
        columns = y.reshape(len(y), -1)
        return {f"y{t}": columns[:, t] for t in range(columns.shape[1])}, columns.shape[1], "identity", "mse"

    def predict(self, X):
        out = self._raw(X)
        return out[:, 0] if self._one_target else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # several targets: one identity output each
        return tags
