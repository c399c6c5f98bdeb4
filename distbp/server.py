"""The parameter actor: owns one contiguous slice of the flat parameter vector and its
optimizer state, adds the workers' partial gradients in rank order, divides once by the
row count, and steps. A thin wrapper over optim.py."""

import numpy as np

from . import optim
from .errors import TrainingError
from .workers import COUNT, LOSS, SECONDS


class ParameterServer:
    def __init__(self, params, optimizer, opt_state=None, layer_bounds=(), step=0):
        self.w = np.array(params)  # (slice,) owned, writable copy
        self.grad = np.empty_like(self.w)
        self.opt = optim.make(**optimizer)
        self.state = opt_state if opt_state is not None else self.opt.init_state(len(self.w), self.w.dtype)
        self.state = {k: np.array(v) for k, v in self.state.items()}
        self.layer_bounds = list(layer_bounds)  # [(layer, start, stop)] within this slice
        self.step = step  # the last step applied

    def ping(self):
        return True

    def where(self):
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def applied_step(self):
        return self.step

    def weights(self):
        return self.w

    def assemble(self, num_workers, *parts, step=None):
        """The mean gradient of this slice: parts = K gradient slices then K stats vectors,
        added in worker-rank order (never arrival order) and divided once by the row count.
        Returns the buffer it writes into (a copy when called remotely)."""
        grads, stats = parts[:num_workers], parts[num_workers:]
        np.copyto(self.grad, grads[0])
        for g in grads[1:]:  # fixed order: bit-reproducible
            self.grad += g
        self.totals = totals = np.sum(stats, axis=0)
        if not np.isfinite(totals[LOSS]) or not np.isfinite(self.grad.sum(dtype=np.float64)):
            raise TrainingError(
                f"training diverged at step {step}: the loss or gradient is NaN or inf",
                hint="lower train.optimizer.lr",
            )
        self.grad /= totals[COUNT]
        return self.grad

    def apply(self, step, lr, num_workers, norms, *parts):
        """Assemble the mean gradient and take one optimizer step. Returns the new weights and
        an info vector: the summed worker stats, then (when `norms`) each layer's sum of
        squares of the mean gradient within this slice. The info of an applied step stays
        readable from here even if a worker is lost afterwards."""
        grad = self.assemble(num_workers, *parts, step=step)
        squares = [np.dot(grad[a:b], grad[a:b]) for _, a, b in self.layer_bounds] if norms else []
        worst = max(s[SECONDS] for s in parts[num_workers:])
        self.opt.step(self.w, grad, self.state, lr)
        self.step = step
        return self.w, np.concatenate([self.totals, [worst], squares])

    def graph_weights(self, order):
        return self.w

    def graph_apply(self, order, *outs):
        """The compiled-graph form of `apply`: outs are the workers' graph_step results in
        rank order. Returns the info vector and the summed validation stats (or None)."""
        step, lr, evaluate = order
        grads, stats = [o[0] for o in outs], [o[1] for o in outs]
        _, info = self.apply(step, lr, len(outs), evaluate, *grads, *stats)
        vals = [o[2] for o in outs if o[2] is not None]
        return info, (np.sum(vals, axis=0) if vals else None)

    def snapshot(self):
        """Weights and optimizer state, for a checkpoint."""
        return {"params": self.w, **{f"opt_{k}": v for k, v in self.state.items()}}
