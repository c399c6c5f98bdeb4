"""The parameter actor: owns one contiguous slice of the flat parameter vector and its
optimizer state, adds the workers' partial gradients in rank order, divides once by the
row count, and steps. A thin wrapper over optim.py; its messages are in messages.py."""

import os
import time
from collections import deque

import numpy as np

from distbp.backprop import optim
from distbp.errors import TrainingError
from distbp.runtime import link
from distbp.runtime.direct import DirectServer
from distbp.runtime.messages import Snapshot, StepInfo, add_sums, loss_sum_of, rank_order_sum, rows_of, split_apply_parts
from distbp.text import count

RECENT = 512  # StepInfos kept for the driver to read after a failure: more than a window

class ParameterServer(DirectServer):
    def __init__(self, params, optimizer, opt_state=None, layer_bounds=(), step=0, best_params=None, num_layers=1):
        self.w = np.array(params)  # (slice,) owned, writable copy
        self.grad = np.empty_like(self.w)
        self.opt = optim.make(**optimizer)
        self.state = opt_state if opt_state is not None else self.opt.init_state(len(self.w), self.w.dtype)
        self.state = {k: np.array(v) for k, v in self.state.items()}
        self.layer_bounds = list(layer_bounds)  # [(layer, start, stop)] within this slice
        self.sums_size = link.sums_size(num_layers)
        self.step = step  # the last step applied
        self.kept = None  # (step, input weights) of the last step applied with order.keep
        self.recent = deque(maxlen=RECENT)  # the StepInfos of the last steps applied
        self.torn = None  # the error of a step that diverged part-way (see DirectServer._pipelined)
        self.best_params = None if best_params is None else np.array(best_params)  # early stopping: the best step's weights

    def ping(self):
        return True

    def park(self):
        """Drop the run's links and state; the process waits, idle, for a later run to `renew` it."""
        if self.__dict__:
            self.disconnect()
            self.__dict__.clear()
        return True

    def renew(self, *args):
        """Start over as a new run's parameter actor, exactly as a new actor would."""
        self.park()
        self.__init__(*args)
        return True

    def where(self):
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def applied_step(self):
        return self.step

    def weights(self):
        return self.w

    def assemble(self, *parts, order=None):
        """The mean gradient of this slice: parts = K gradient slices then K Sums (apply_parts), added in
        worker-rank order (never arrival order) and divided once by the row count. Returns
        (buffer it writes into, the added Sums as (train, val, slowest))."""
        grads, sums = split_apply_parts(parts)
        rank_order_sum(grads, self.grad)
        return self._mean(sums, order)

    def _mean(self, sums, order):
        """self.grad holds the rank-order sum of the slices: check it, divide by the row count."""
        totals = self._totals(sums, order)
        self._divide(totals, order, 0, len(self.grad))
        return self.grad, totals

    def _totals(self, sums, order):
        """The workers' Sums added, once they are checked: they cover the step's rows, and the
        loss is finite."""
        totals = add_sums(sums)
        if order is not None and order.rows and rows_of(totals[0]) != order.rows:
            # the shards must partition the step's rows: a gap or an overlap (after a
            # resharding, say) would divide the wrong sum by the wrong count
            raise TrainingError(
                f"step {order.step}: the gradients of {count(len(sums), 'worker')} cover {count(int(rows_of(totals[0])), 'row')}, the step has {order.rows}",
                hint="the shards no longer partition the training rows (a bug); the step was not applied, continue with --resume",
            )
        if not np.isfinite(loss_sum_of(totals[0])):
            raise self._diverged(order)
        return totals

    def _divide(self, totals, order, a, b):
        """self.grad[a:b] holds the rank-order sum: check that it is finite, divide by the rows."""
        if not np.isfinite(self.grad[a:b]).all():
            raise self._diverged(order)
        self.grad[a:b] /= rows_of(totals[0])

    @staticmethod
    def _diverged(order):
        return TrainingError(
            f"training diverged at step {None if order is None else order.step}: the loss or gradient is NaN or inf",
            hint="lower train.optimizer.lr",
        )

    def apply(self, order, num_workers, *parts):
        """Assemble the mean gradient and take one optimizer step. Returns a StepInfo. Only
        the step after the last applied one is taken: a step handed twice is refused, so a
        redo after a failure can never apply an update twice."""
        self._check_next(order)
        return self._step(order, *self.assemble(*parts, order=order), num_workers)

    def _check_next(self, order):
        if order.step != self.step + 1:
            raise TrainingError(f"parameter actor: asked to apply step {order.step} after step {self.step}")

    def _step(self, order, grad, totals, num_workers):
        squares = self._squares(grad, order)
        self._begin(order)
        self.opt.update(self.w, grad, self.state, order.lr)
        return self._applied(order, totals, squares, num_workers)

    def _squares(self, grad, order):
        """Per layer, the squared norm of this slice's part of the mean gradient (evaluate steps)."""
        return np.array([np.dot(grad[a:b], grad[a:b]) for _, a, b in self.layer_bounds] if order.evaluate else [])

    def _begin(self, order):
        """Before the first update of a step (which may come a part at a time)."""
        if order.keep:
            self.kept = (order.step, self.w.copy())
        self.opt.begin(self.state)

    def _applied(self, order, totals, squares, num_workers):
        """After the last update of a step: record it. Returns its StepInfo."""
        train, val, slowest = totals
        self.step = order.step
        self.recent.append(StepInfo(order.step, train, val, slowest, squares, time.time(), num_workers))
        return self.recent[-1]

    def infos_after(self, step):
        """The StepInfos of the steps applied after `step` (those a failure kept from the driver)."""
        return [info for info in self.recent if info.step > step]

    def apply_publish(self, order, num_workers, *parts):
        """`apply`, then the new weights: the task engine chains their reference into the next step."""
        info = self.apply(order, num_workers, *parts)
        return self.w, info

    def promote(self, step):
        """Early stopping: the kept input weights of `step` become the best weights."""
        if self.kept is None or self.kept[0] != step:
            raise TrainingError(f"parameter actor: no weights kept for step {step}")
        self.best_params = self.kept[1]
        return True

    def snapshot(self):
        """This slice's Snapshot, for a checkpoint."""
        if self.torn is not None:
            raise self.torn
        return Snapshot(np.array(self.w), dict(self.state), self.best_params)
