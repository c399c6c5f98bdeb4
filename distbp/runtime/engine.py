"""How steps are carried out: one interface, two engines.

    handle = engine.submit(orders)    # a window of steps; returns at once
    results = engine.collect(handle)  # per order, its StepInfos (one per parameter actor)
    engine.rebuild()                  # after actors were replaced or restored
    engine.congestion                 # the TCP congestion control its links use (none: [])
    engine.close()

Windows run in the order submitted. The driver reads them through a `Stream`, which submits
the next window before it reads the current one (unless the current one ends at a step the
driver must act on): the actors go from one window to the next while the driver writes rows.

Both engines call the same code in the actors (ShardWorker.step, and the parameter actor's
rank-order sum and optimizer step), so the bits are identical.

- `direct` (the default; direct.py, with the actors' side of it): each worker holds a TCP link
  to each parameter actor (link.py). The driver hands the parameter actors a window of orders; they and the workers run those steps
  over the links with no Ray task, object store or driver hop per step, and the parameter
  actors return the window's StepInfos at its end. Windows end at every step the driver must
  act on (a checkpoint, an early-stopping evaluation, the end) and last about WINDOW_S.
- `tasks` (cluster.engine: tasks): plain Ray actor tasks, one per worker and per parameter
  actor per step, the weights of step s + 1 chained as an object reference from step s.

A lost actor shows as a Ray error, or a broken link, from `run`; the trainer then replaces
actors (Ray's own report of which died) and calls `rebuild`.
"""

import os

from distbp.errors import UsageError
from distbp.runtime.calls import get
from distbp.runtime.direct import FIRST_WINDOW, DirectEngine
from distbp.runtime.messages import apply_parts, split_step_returns



class TaskEngine:
    name = "tasks"
    in_flight = FIRST_WINDOW  # steps submitted ahead
    congestion = []  # no links of its own: Ray carries every step

    def __init__(self, actors):
        self.actors = actors
        self.rebuild()

    def rebuild(self):
        self.weights = [s.weights.remote() for s in self.actors.servers]

    def _submit(self, order):
        workers, servers = self.actors.workers, self.actors.servers
        K, S = len(workers), len(servers)
        outs = [split_step_returns(w.step.options(num_returns=S + 1).remote(order, *self.weights)) for w in workers]
        sums = [s for _, s in outs]
        applied = [
            s.apply_publish.options(num_returns=2).remote(order, K, *apply_parts([slices[i] for slices, _ in outs], sums))
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


ENGINES = {"direct": DirectEngine, "tasks": TaskEngine}


class Stream:
    """The look-ahead, behind the engine. `read(step)` returns a window of steps from `step`
    and their results; before it waits for them, it submits the window after it, so the actors
    go on while the driver writes this window's rows. No window is submitted past a barrier
    (`barrier(order)`: the driver must act once that step is applied) or while `hold` is set.
    `plan(step, size)` gives a window's orders: at most `size`, ending at the first barrier.
    Sizes follow the engine's pace: one step first, then about WINDOW_S of steps."""

    def __init__(self, engine, plan, barrier):
        self.engine, self.plan, self.barrier = engine, plan, barrier
        self.size = 1
        self.ahead = None  # (orders, handle) of the window submitted before the current one was read

    def read(self, step, hold=False):
        """(orders, per order its StepInfos) of the window from `step`: the step after the
        last window read, or where a recovery goes on from (after `drop`)."""
        if self.ahead is None:
            orders = self.plan(step, self.size)
            handle = self.engine.submit(orders)
        else:
            (orders, handle), self.ahead = self.ahead, None
        if not self.barrier(orders[-1]) and not hold:
            more = self.plan(orders[-1].step + 1, self.size)
            self.ahead = (more, self.engine.submit(more))
        results = self.engine.collect(handle)
        if len(results) > 1:
            self.size = self.engine.window((results[-1][0].applied_at - results[0][0].applied_at) / (len(results) - 1))
        elif self.size == 1:  # after the first step: the engine's window before any step time is known
            self.size = self.engine.window(None)
        return orders, results

    @property
    def in_flight(self):
        """Whether a window is submitted and not yet read."""
        return self.ahead is not None

    def drop(self):
        """After a failure: the window ahead went with the actors."""
        self.ahead = None


def chosen(job):
    """The engine class of cluster.engine, or of DISTBP_ENGINE when set (an override for the
    tests' second pass); UsageError for another name."""
    name = os.environ.get("DISTBP_ENGINE")
    if not name:  # unset or empty
        return ENGINES[job.cluster.engine]
    if name not in ENGINES:
        raise UsageError(f"DISTBP_ENGINE: expected one of {', '.join(ENGINES)}, got {name!r}")
    return ENGINES[name]
