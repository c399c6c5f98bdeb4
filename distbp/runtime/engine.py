"""How steps are carried out: one interface, two engines.

    handle = engine.submit(orders)    # a window of steps; returns at once
    results = engine.collect(handle)  # per order, its StepInfos (one per parameter actor)
    engine.rebuild()                  # after actors were replaced or restored
    engine.close()

Windows run in the order submitted, so the driver submits the next window before it reads
the current one (unless the current one ends at a step it must act on): the actors go from
one window to the next while the driver writes rows.

Both engines call the same code in the actors (ShardWorker.step, and the parameter actor's
rank-order sum and optimizer step), so the bits are identical.

- `direct` (the default): each worker holds a TCP link to each parameter actor (link.py). The
  driver hands the parameter actors a window of orders; they and the workers run those steps
  over the links with no Ray task, object store or driver hop per step, and the parameter
  actors return the window's StepInfos at its end. Windows end at every step the driver must
  act on (a checkpoint, an early-stopping evaluation, the end) and last about WINDOW_S.
- `tasks` (cluster.engine: tasks): plain Ray actor tasks, one per worker and per parameter
  actor per step, the weights of step s + 1 chained as an object reference from step s.

A lost actor shows as a Ray error, or a broken link, from `run`; the trainer then replaces
actors (Ray's own report of which died) and calls `rebuild`.
"""

import os
import secrets

from distbp.errors import UsageError
from distbp.runtime.calls import CONTROL, get, unwrap
from distbp.runtime.link import LinkError

WINDOW_S = 0.25  # a direct window's target length: progress rows and signals are this fresh
MAX_WINDOW = 256
FIRST_WINDOW = 8  # steps in a window before the step time is known
CONNECT_S = 60


class TaskEngine:
    name = "tasks"
    in_flight = FIRST_WINDOW  # steps submitted ahead

    def __init__(self, actors):
        self.actors = actors
        self.rebuild()

    def rebuild(self):
        self.weights = [s.weights.remote() for s in self.actors.servers]

    def _submit(self, order):
        workers, servers = self.actors.workers, self.actors.servers
        K, S = len(workers), len(servers)
        outs = [w.step.options(num_returns=S + 1).remote(order, *self.weights) for w in workers]
        sums = [o[S] for o in outs]
        applied = [
            s.apply_publish.options(num_returns=2).remote(order, K, *[o[i] for o in outs], *sums)
            for i, s in enumerate(servers)
        ]
        self.weights = [a[0] for a in applied]
        return [a[1] for a in applied]

    def submit(self, orders):
        return [self._submit(order) for order in orders]

    def collect(self, handle):
        return [get(refs) for refs in handle]

    def window(self, step_sec):
        return self.in_flight  # two windows in flight: 16 steps

    def close(self):
        self.weights = []


class DirectEngine:
    name = "direct"

    def __init__(self, actors):
        self.actors = actors
        self.rebuild()

    def rebuild(self):
        """(Re)open every link: each parameter actor listens, each worker connects to all."""
        self.close()
        workers, servers = self.actors.workers, self.actors.servers
        nodes = [w["node_id"] for w in get([a.where.remote() for a in workers + servers])]
        near = [[nodes[len(workers) + i] == nodes[k] for k in range(len(workers))] for i in range(len(servers))]
        secret = secrets.token_bytes(32)
        endpoints = get([s.listen.remote(any(near[i])) for i, s in enumerate(servers)])
        accepted = [s.accept.remote(len(workers), secret, CONNECT_S) for s in servers]
        paths = get([w.connect.remote(endpoints, secret, CONNECT_S, [row[k] for row in near]) for k, w in enumerate(workers)] + accepted)
        get([
            s.attach.remote([p if near[i][k] and endpoints[i].segment else None for k, p in enumerate(paths[: len(workers)])], a, b)
            for i, (s, (a, b)) in enumerate(zip(servers, self.actors.slices))
        ])
        get([w.seal_segment.remote() for w in workers])  # mapped by all: no process may open one now

    def submit(self, orders):
        serving = [w.serve.remote() for w in self.actors.workers]
        return serving, [s.run.remote(orders) for s in self.actors.servers]

    def collect(self, handle):
        serving, running = handle
        try:
            per_server = get(running)
        except BaseException:
            self._settle(serving)
            raise
        get(serving)
        return [list(infos) for infos in zip(*per_server)]

    def _settle(self, serving):
        """After a failed window: wait (briefly) for the workers' serve calls to end, and raise a
        worker's own error when that, not a lost link, was the cause."""
        import ray

        ray.wait(serving, num_returns=len(serving), timeout=5)
        for ref in serving:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayTaskError as err:
                if not isinstance(unwrap(err), LinkError):
                    raise unwrap(err) from None
            except Exception:  # the worker died, or is still winding down: recovery sorts it out
                pass

    def window(self, step_sec):
        """Steps in the next window: about WINDOW_S of steps, at least 1 (FIRST_WINDOW before
        a step time is known)."""
        return max(1, min(MAX_WINDOW, int(WINDOW_S / step_sec))) if step_sec else FIRST_WINDOW

    def close(self):
        """Close every link (from each actor's control thread, so a blocked serve wakes up)."""
        import ray

        refs = [a.disconnect.options(concurrency_group=CONTROL).remote() for a in self.actors.workers + self.actors.servers]
        ray.wait(refs, num_returns=len(refs), timeout=10)


ENGINES = {"direct": DirectEngine, "tasks": TaskEngine}


def chosen(job):
    """The engine class of cluster.engine, or of DISTBP_ENGINE when set (an override for the
    tests' second pass); UsageError for another name."""
    name = os.environ.get("DISTBP_ENGINE")
    if name is None:
        return ENGINES[job.cluster.engine]
    if name not in ENGINES:
        raise UsageError(f"DISTBP_ENGINE: expected one of {', '.join(ENGINES)}, got {name!r}")
    return ENGINES[name]
