"""The Ray calls every part of the Ray side uses: distbp's own errors out of an actor as
themselves, the errors that mean an actor was lost, killing, pinging in the control group,
and placing actors. Ray itself is imported inside each function: importing this module loads
no Ray."""

from distbp.errors import DistbpError
from distbp.runtime.link import LinkError

CONTROL = "control"  # a concurrency group of its own: pings answer while a step computes


def unwrap(err):
    """A DistbpError or LinkError raised inside an actor, as itself; anything else unchanged."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, (DistbpError, LinkError)) else err


def get(refs, timeout=None):
    """ray.get that re-raises distbp's own errors from inside an actor as themselves."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        raise unwrap(err) from None


def recoverable():
    """The Ray errors that mean an actor, its node or its data were lost."""
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, LinkError)


def kill(actor):
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def placed(actors, wait_s, dead_ok=False):
    """The actors of `actors` that were placed and started within `wait_s` seconds, in their
    order; the others are killed (no node had room for them). An actor that died starting
    raises its Ray error, as a lost one does, unless `dead_ok`: then it is left out too."""
    import ray

    refs = [ping(a) for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=wait_s)
    started = []
    for actor, ref in zip(actors, refs):
        try:
            ray.get(ref, timeout=0)
            started.append(actor)
        except ray.exceptions.GetTimeoutError:
            kill(actor)
        except recoverable():
            if not dead_ok:
                raise
            kill(actor)
    return started


def remote_class(cls):
    """The Ray actor class of `cls`, with the control concurrency group (one thread)."""
    import ray

    return ray.remote(concurrency_groups={CONTROL: 1})(cls)


def ping(actor):
    """A ping in the actor's control group, so that it answers while the actor computes."""
    return actor.ping.options(concurrency_group=CONTROL).remote()
