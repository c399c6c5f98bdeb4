"""Atomic save and load of npz files: checkpoints (weights, optimizer state, progress) and models.

A local file is written to a temporary name in the same folder, fsynced, then renamed over
the final name, so a crash leaves either the old file or the new one, never half of one.
Everything is a plain array; loading uses allow_pickle=False.
"""

import hashlib
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

from distbp import faults
from distbp.errors import UsageError, WriteFailed

_NAME = re.compile(r"^step-(\d{9})\.npz$")


DIGEST = "digest"  # the array that holds the SHA-256 of all the others


def digest(arrays):
    """SHA-256 (hex) of named arrays: each one's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != DIGEST):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def changed(arrays):
    """Whether `arrays` carry a digest that they no longer match: the file was changed after
    distbp wrote it. Files without one (written before digests were added) are taken as they are."""
    return DIGEST in arrays and str(arrays[DIGEST]) != digest(arrays)


def atomic_savez(path, arrays, during=lambda: None):
    """np.savez to `path`, with the digest of its arrays, through a temporary file + fsync +
    rename; `during()` is called once the temporary file exists (a test's fault hook)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {**arrays, DIGEST: np.array(digest(arrays))}

    def write(f):
        during()
        np.savez(f, **arrays)

    atomic_write(path, write)


def atomic_write(path, write):
    """`write(binary file)` into a temporary file in `path`'s folder, fsync, then rename it
    over `path`: a reader sees the old file or the new one, never half of one. An OSError
    (a full disk, no permission) names `path`, and leaves no temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    except OSError as err:  # named by the file asked for, not the temporary one
        raise WriteFailed(err.errno, err.strerror, path) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would make it: mkstemp's 0600 hides the file from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise WriteFailed(err.errno, err.strerror, path) from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


OPT = "opt_"  # a checkpoint file's optimizer-state arrays are stored under this prefix


@dataclass
class Checkpoint:
    step: int
    params: np.ndarray  # (num_params,)
    opt_state: dict  # name -> flat array
    job_hash: str
    seed: int
    finished: bool = False
    workers: int = 0  # the worker count that produced it (a different count changes the bits)
    stopping: np.ndarray | None = None  # early stopping's record: (best value, its step, evaluations since)
    best_params: np.ndarray | None = None  # the weights of the best validation step


def save(folder, ckpt, keep=3):
    """Write `folder/step-NNNNNNNNN.npz` atomically, then delete all but the newest `keep`."""
    arrays = {
        "params": ckpt.params,
        "step": np.array(ckpt.step, np.int64),
        "seed": np.array(ckpt.seed, np.int64),
        "finished": np.array(ckpt.finished),
        "job_hash": np.array(ckpt.job_hash),
        "workers": np.array(ckpt.workers, np.int64),
    }
    if ckpt.stopping is not None:  # stored as "best" (the name distbp 0.2 wrote)
        arrays["best"], arrays["best_params"] = ckpt.stopping, ckpt.best_params
    arrays.update({OPT + k: v for k, v in ckpt.opt_state.items()})
    path = os.path.join(folder, f"step-{ckpt.step:09d}.npz")
    atomic_savez(path, arrays, during=lambda: faults.hit("checkpoint_slow", ckpt.step))
    for old in list_steps(folder)[:-keep]:
        os.unlink(os.path.join(folder, f"step-{old:09d}.npz"))
    return path


def list_steps(folder):
    """Steps that have a checkpoint file in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(folder)) if m)


def load(path):
    """Read one checkpoint; UsageError if the file is damaged, changed after it was written
    (its digest), holds weights that are not finite, or is not a checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as z:
            z = {k: z[k] for k in z.files}
        ckpt = Checkpoint(
            step=int(z["step"]),
            params=z["params"],
            opt_state={k.removeprefix(OPT): v for k, v in z.items() if k.startswith(OPT)},
            job_hash=str(z["job_hash"]),
            seed=int(z["seed"]),
            finished=bool(z["finished"]),
            workers=int(z["workers"]),
            stopping=z.get("best"),
            best_params=z.get("best_params"),
        )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as err:
        raise UsageError(f"{path}: damaged checkpoint ({type(err).__name__})") from None
    for name in ("params", "best_params"):  # (Adam's float32 second moment may overflow to inf in a healthy run)
        if z.get(name) is not None and z[name].dtype.kind == "f" and not np.isfinite(z[name]).all():
            raise UsageError(f"{path}: damaged checkpoint ({name} holds NaN or infinite values; distbp never checkpoints a diverged step)")
    if changed(z):
        raise UsageError(f"{path}: damaged checkpoint (its arrays do not match their SHA-256 digest: the file was changed after distbp wrote it)")
    return ckpt


def load_latest(folder, warn=lambda msg: None):
    """The newest checkpoint in `folder` that reads cleanly, or None; damaged ones are skipped
    with a warning through `warn`."""
    for step in reversed(list_steps(folder)):
        path = os.path.join(folder, f"step-{step:09d}.npz")
        try:
            return load(path)
        except UsageError as err:
            warn(f"warning: skipping {err}")
    return None
