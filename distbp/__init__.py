"""distbp: data-parallel backpropagation for fully connected networks on Ray.

    import distbp
    result = distbp.train("jobs/spirals.yaml", train__steps=200)   # or a dict or a Job
    model = distbp.load_model(result.model_path)
    model.predict(X), model.predict_proba(X)
    distbp.init(num_cpus=4)   # optional: the Ray that train() keeps, started now with 4 CPUs
    distbp.shutdown()   # the Ray the first train() (or init) started; otherwise at exit
"""

from distbp.errors import DataError, DistbpError, JobError, TrainingError, UsageError  # noqa: F401 (no heavy imports)

__version__ = "0.1.0"
__all__ = ["train", "init", "shutdown", "load_model", "DistbpError", "UsageError", "JobError", "DataError", "TrainingError"]


def __getattr__(name):
    # Imported on first use, so `import distbp.backprop.nn` stays free of ray and pyarrow.
    if name == "train":
        from distbp.api import train

        return train
    if name in ("init", "shutdown"):
        from distbp import api

        return getattr(api, name)
    if name == "load_model":
        from distbp.run.model import load_model

        return load_model
    raise AttributeError(f"module 'distbp' has no attribute {name!r}")
