"""distbp.sklearn: scikit-learn's own estimator checks, Pipelines, cross-validation and grid
search on one Ray (the test session's), the same bits as `distbp run`, and no run folder."""

import os
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.neural_network import MLPClassifier as SklearnMLP
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from distbp.data import tables
from distbp.api import load
from distbp.sklearn import MLPClassifier, MLPRegressor
from distbp.trainer import Trainer

from conftest import model_arrays


@parametrize_with_checks([MLPClassifier(steps=30, workers=1), MLPRegressor(steps=30, workers=1)])
def test_scikit_learn_estimator_checks(ray_session, estimator, check):
    check(estimator)


def test_breast_cancer_in_a_pipeline_scores_within_2_points_of_scikit_learn(ray_session):
    X, y = load_breast_cancer(return_X_y=True)
    ours = cross_val_score(make_pipeline(StandardScaler(), MLPClassifier()), X, y, cv=5).mean()
    theirs = cross_val_score(make_pipeline(StandardScaler(), SklearnMLP(max_iter=500, random_state=0)), X, y, cv=5).mean()
    assert ours >= 0.94 and abs(ours - theirs) <= 0.02, (ours, theirs)


def test_fit_gives_the_bits_of_distbp_run_on_the_same_rows(ray_session, make_job, tmp_path):
    job = make_job(name="same", rows=300, train={"steps": 25, "optimizer": {"name": "adam", "lr": 0.02}}, cluster={"chunk_rows": 8192})
    result = Trainer(load(job)).run()
    source = tables.open_source(load(job).data_path())
    table = source.read_rows(0, source.num_rows)
    X, y = tables.features_to_numpy(table, ["x0", "x1"], np.float64), table.column("label").to_numpy()
    clf = MLPClassifier(hidden_layer_sizes=(8, 8), activation="tanh", optimizer="sgd", lr=0.5, steps=5, dtype="float64", seed=3, workers=2)
    clf.set_params(optimizer="adam", lr=0.02, steps=25, output_dir=str(tmp_path / "fitted"))
    clf.fit(X, y)
    want, got = model_arrays(result.model_path), model_arrays(tmp_path / "fitted" / "model.npz")
    assert all(np.array_equal(want[f"{k}{l}"], got[f"{k}{l}"]) for k in "Wb" for l in (1, 2, 3))
    assert list(clf.classes_) == [0, 1, 2] and clf.n_features_in_ == 2


def test_numpy_pandas_and_pyarrow_inputs_agree_and_no_run_folder_is_left(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3))
    y = np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    before = set(os.listdir(tempfile.gettempdir()))
    fits = [MLPClassifier(steps=40, workers=2).fit(x, y) for x in (X, pd.DataFrame(X, columns=list("abc")), pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2]}))]
    predictions = [f.predict(x) for f, x in zip(fits, (X, pd.DataFrame(X, columns=list("abc")), pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2]})))]
    assert all(np.array_equal(predictions[0], p) for p in predictions) and set(predictions[0]) <= {"yes", "no"}
    assert list(fits[1].feature_names_in_) == ["a", "b", "c"]
    assert fits[0].score(X, y) > 0.9
    assert os.listdir(tmp_path) == []  # no runs/ folder
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("distbp-fit-")]


def test_grid_search_and_several_regression_targets(ray_session):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(160, 2))
    Y = np.column_stack([X[:, 0] * 2 + X[:, 1], np.tanh(X[:, 1])])
    search = GridSearchCV(MLPRegressor(steps=150, workers=2), {"lr": [0.001, 0.03]}, cv=2).fit(X, Y)
    assert search.best_params_ == {"lr": 0.03}
    assert search.best_estimator_.predict(X).shape == (160, 2) and search.best_estimator_.score(X, Y) > 0.8
    assert MLPRegressor(steps=20, workers=1).fit(X, Y[:, 0]).predict(X).shape == (160,)
