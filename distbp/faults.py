"""A test-only fault hook. DISTBP_FAULT=POINT[@STEP][,POINT[@STEP]...] makes the run fail at one named point,
every time, so that a test can open a failure window that a real failure hits only by chance.
Unset (always, outside tests), `hit` is one dictionary lookup and does nothing.

Driver points fire once per process; worker points fire in the worker of rank 1 at STEP.
    model_written       the driver exits hard after model.npz, before the checkpoint marked done
    checkpoint_write    writing a checkpoint fails with an OSError (a full disk)
    model_write         writing model.npz fails with an OSError (a full disk)
    checkpoint_slow     writing a checkpoint stalls 4 s once its temporary file exists (room for a second signal)
    snapshot            parameter actor 0 is killed as the driver gathers a snapshot
    recovery            a second worker is killed while recovery replaces the first
    metrics_rewrite     the driver exits hard halfway through rewriting metrics.csv
    worker_after_eval   the worker exits hard right after sending evaluation step STEP
    pause_ray           the driver waits (10 minutes) once Ray runs, before the actors start
    pause_actors        the driver waits once the actors have read the data, before the run folder changes
A pause or stall prints "fault: paused at POINT" on stderr first, so that a test can signal it there.
"""

import os
import sys
import time

ENV = "DISTBP_FAULT"
_fired = set()


def armed(point, step=None):
    """Whether DISTBP_FAULT names `point` (and `step`, when it gives one) and has not fired
    yet in this process."""
    for spec in filter(None, os.environ.get(ENV, "").split(",")):
        name, _, at = spec.partition("@")
        if name == point and point not in _fired and not (at and step is not None and int(at) != step):
            _fired.add(point)
            return True
    return False


def reset():
    """Forget which points fired: a parked worker renewed for a new run starts as a new
    process would (its environment, DISTBP_FAULT included, comes with the new run's plan)."""
    _fired.clear()


def hit(point, step=None):
    """Fail here if DISTBP_FAULT names this point. Kills (os._exit, ray.kill) are done by the
    caller's own code where they need an actor; the rest happen here."""
    if not armed(point, step):
        return False
    if point in ("model_written", "metrics_rewrite", "worker_after_eval"):
        os._exit(3)
    if point in ("checkpoint_write", "model_write"):
        raise OSError(28, "No space left on device (DISTBP_FAULT)")
    if point == "checkpoint_slow":
        print(f"fault: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(4)
    if point.startswith("pause_"):
        print(f"fault: paused at {point}", file=sys.stderr, flush=True)
        time.sleep(600)
    return True
