"""Failure handling: which actors were lost, replacing lost workers (killed first, then started
again where a CPU is free), restoring the parameter actors from the newest checkpoint, and the
step to redo. A step is applied only when every gradient for it has arrived, and a parameter
actor refuses any step but the next, so a redo never applies an update twice or half.

An elastic run (cluster.elastic) that finds no CPU for a replacement goes on with the workers
it has, down to cluster.min_workers, and grows back to cluster.workers once capacity returns
(`grow`, called between steps). Either way the rows are resharded over the new workers before
the next step, so each step's gradient is still the sum over exactly its rows."""

import numpy as np

from distbp import faults
from distbp.backprop import nn
from distbp.errors import TrainingError
from distbp.runtime.actors import Start
from distbp.runtime.calls import get, kill, ping, recoverable
from distbp.text import count

DEAD_AFTER_S = 60  # an actor that does not answer a control-group ping this long counts as lost
# Growing back: once Ray reports free CPUs, how long new workers may take to start. Longer than
# a worker's start-up on a busy node; spent only when the CPUs were free a moment before.
START_S = 60


def lost(actors):
    """Indices of the actors Ray reports dead (or that stay silent DEAD_AFTER_S). Pings go to
    each actor's control group, so a busy actor answers at once and is never taken for dead."""
    import ray

    refs = [ping(a) for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=DEAD_AFTER_S)
    dead = []
    for i, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=0)
        except recoverable():
            dead.append(i)
        except ray.exceptions.GetTimeoutError:
            dead.append(i)
    return dead


class Recovery:
    """Counts failures against cluster.max_failures and brings the actors back."""

    def __init__(self, job, actors, outputs, save_applied, log):
        self.job, self.actors, self.outputs, self.log = job, actors, outputs, log
        self.save_applied = save_applied  # the trainer's: record what was applied, checkpoint it
        self.replacements = 0

    def _count(self, what):
        self.replacements += 1
        limit = self.job.cluster.max_failures
        if self.replacements > limit:
            raise TrainingError(
                f"{what}: more than cluster.max_failures ({limit}) failures in this run; stopping",
                hint=f"checkpoints are kept in {self.outputs.ckpt_dir}; continue with --resume",
            )

    def recover(self, err):
        """Replace what `err` took down. Returns (the step to go on from, whether the parameter
        actors were restored, the checkpoint they were restored from or None). When they were
        not, the steps they applied before it are kept: their StepInfos are still to be read."""
        first = type(err).__name__
        dead_servers = lost(self.actors.servers)
        dead_workers = lost(self.actors.workers)
        if not dead_servers and not dead_workers:
            raise err  # nothing was lost: a real error, not a failure to recover from
        wait_s = self.job.cluster.wait_for_nodes_s
        gone = []  # elastic: lost workers that no node had room to replace
        for k in dead_workers:
            self._count(f"worker {k} lost ({first})")
            self.log(f"warning: worker {k} lost; starting a replacement ({self.replacements} of at most {self.job.cluster.max_failures})")
            if faults.armed("recovery"):  # a second failure, while this one is being handled
                kill(self.actors.workers[(k + 1) % len(self.actors.workers)])
            if gone or not self.actors.replace_worker(k, wait_s):  # after one found no room, none will
                if not self.job.cluster.elastic:
                    self._save_before_giving_up(dead_servers)
                    raise TrainingError(
                        f"no capacity for a replacement of worker {k} within cluster.wait_for_nodes_s ({wait_s:g} s)",
                        hint=f"add nodes, or continue with fewer workers: distbp run JOB --resume --workers {len(self.actors.workers) - 1}",
                    ) from None
                gone.append(k)
        if gone:
            self._shrink(gone, dead_servers)
        if self.actors.reshard_due:  # a resharding that a failure cut short
            self.actors.reshard()
        alive = [s for i, s in enumerate(self.actors.servers) if i not in dead_servers]
        steps = set(self.actors.applied_steps(alive)) if alive else set()
        if dead_servers or len(steps) > 1:
            if not (self.actors.per_worker and dead_workers):  # per_worker: the same lost node, counted once
                self._count(f"parameter actor lost ({first})")
            return self._restore_servers()
        (applied,) = steps
        self.log(f"recovered: going on from step {applied + 1}")
        return applied + 1, False, None

    def _shrink(self, gone, dead_servers):
        """Go on without the workers `gone`, unless that leaves fewer than cluster.min_workers."""
        cluster = self.job.cluster
        left = len(self.actors.workers) - len(gone)
        what = f"{'worker' if len(gone) == 1 else 'workers'} {', '.join(map(str, gone))} lost and no capacity within cluster.wait_for_nodes_s ({cluster.wait_for_nodes_s:g} s)"
        if left < cluster.min_workers:
            self._save_before_giving_up(dead_servers)
            raise TrainingError(
                f"{what}; {count(left, 'worker')} left, below cluster.min_workers ({cluster.min_workers})",
                hint=f"checkpoints are kept in {self.outputs.ckpt_dir}; add nodes and continue with --resume, or lower cluster.min_workers",
            )
        self.log(f"warning: {what}; going on with {count(left, 'worker')}, rows resharded")
        self.actors.drop_workers(gone)

    def grow(self):
        """Between steps: an elastic run below cluster.workers takes back the CPUs that Ray
        reports free, and reshards. One look at Ray's resource view when nothing is free; never
        called on a full run. Returns whether the worker count changed (the engine is then to be
        rebuilt)."""
        import ray

        cluster, have = self.job.cluster, len(self.actors.workers)
        if not cluster.elastic or have >= cluster.workers:
            return False
        room = int(ray.available_resources().get("CPU", 0) // cluster.cpus_per_worker)
        if room < 1:
            return False
        added = self.actors.add_workers(min(room, cluster.workers - have), START_S)
        if added:
            self.actors.reslice()  # per_worker: a parameter actor beside each worker, again
            self.log(f"capacity back: going on with {count(have + added, 'worker')} instead of {have}, rows resharded")
        return added > 0

    def _save_before_giving_up(self, dead_servers):
        """Capacity is gone: checkpoint the last applied step, so --resume loses nothing."""
        if dead_servers:
            return
        try:
            self.save_applied()
        except Exception:  # keep the checkpoints already there
            pass

    def _restore_servers(self):
        self.actors.kill_servers()
        ckpt = self.outputs.latest_checkpoint()
        if ckpt is None:
            start = Start(nn.init_params(self.actors.spec, np.random.default_rng(self.job.seed)))
        else:
            start = Start(ckpt.params, ckpt.opt_state, ckpt.step, ckpt.best_params)
        self.actors.start_servers(start)
        get([ping(s) for s in self.actors.servers])
        self.log(f"warning: parameter actors restored from step {start.step}; replaying from step {start.step + 1}")
        return start.step + 1, True, ckpt
