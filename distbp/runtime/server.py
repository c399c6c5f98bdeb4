"""The parameter actor: owns one contiguous slice of the flat parameter vector and its
optimizer state, adds the workers' partial gradients in rank order, divides once by the
row count, and steps. A thin wrapper over optim.py; its messages are in messages.py."""

import time
from collections import deque

import numpy as np

from distbp.backprop import optim
from distbp.errors import TrainingError
from distbp.runtime import link, shm
from distbp.runtime.messages import Endpoint, Snapshot, StepInfo, add_sums, loss_sum_of, rows_of
from distbp.text import count

RECENT = 512  # StepInfos kept for the driver to read after a failure: more than a window
RECV_BUDGET = 512 << 20  # bytes of per-worker gradient buffers a parameter actor may hold (see run)

def rank_order_sum(grads, out):
    """out = grads[0] + grads[1] + ..., added in this order (worker rank, never arrival):
    the one reduce of both engines, so that their bits are the same. `grads` may be an
    iterator whose slices arrive one by one (a buffer may be reused once it was added); the
    first may be `out` itself. g_0 + g_1 is one pass, the same bits as copying g_0 and adding g_1."""
    first = None
    for k, g in enumerate(grads):
        if k == 0:
            first = g
        elif k == 1:
            np.add(first, g, out=out)
        else:
            out += g
    if first is None:
        raise ValueError("no gradient to add")
    if k == 0 and first is not out:
        np.copyto(out, first)
    return out


class ParameterServer:
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
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def applied_step(self):
        return self.step

    def weights(self):
        return self.w

    def assemble(self, num_workers, *parts, order=None):
        """The mean gradient of this slice: parts = K gradient slices then K Sums, added in
        worker-rank order (never arrival order) and divided once by the row count. Returns
        (buffer it writes into, the added Sums as (train, val, slowest))."""
        grads, sums = parts[:num_workers], parts[num_workers:]
        rank_order_sum(grads, self.grad)
        return self._mean(sums, order)

    def _mean(self, sums, order):
        """self.grad holds the rank-order sum of the slices: check it, divide by the row count."""
        totals = add_sums(sums)
        step = None if order is None else order.step
        if order is not None and order.rows and rows_of(totals[0]) != order.rows:
            # the shards must partition the step's rows: a gap or an overlap (after a
            # resharding, say) would divide the wrong sum by the wrong count
            raise TrainingError(
                f"step {step}: the gradients of {count(len(sums), 'worker')} cover {count(int(rows_of(totals[0])), 'row')}, the step has {order.rows}",
                hint="the shards no longer partition the training rows (a bug); the step was not applied, continue with --resume",
            )
        if not np.isfinite(loss_sum_of(totals[0])) or not np.isfinite(self.grad).all():
            raise TrainingError(
                f"training diverged at step {step}: the loss or gradient is NaN or inf",
                hint="lower train.optimizer.lr",
            )
        self.grad /= rows_of(totals[0])
        return self.grad, totals

    def apply(self, order, num_workers, *parts):
        """Assemble the mean gradient and take one optimizer step. Returns a StepInfo. Only
        the step after the last applied one is taken: a step handed twice is refused, so a
        redo after a failure can never apply an update twice."""
        self._check_next(order)
        return self._step(order, *self.assemble(num_workers, *parts, order=order), num_workers)

    def _check_next(self, order):
        if order.step != self.step + 1:
            raise TrainingError(f"parameter actor: asked to apply step {order.step} after step {self.step}")

    def _step(self, order, grad, totals, num_workers):
        train, val, slowest = totals
        squares = np.array([np.dot(grad[a:b], grad[a:b]) for _, a, b in self.layer_bounds] if order.evaluate else [])
        if order.keep:
            self.kept = (order.step, self.w.copy())
        self.opt.step(self.w, grad, self.state, order.lr)
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
        return Snapshot(np.array(self.w), dict(self.state), self.best_params)

    # -- the direct engine ---------------------------------------------------------------
    def listen(self, share):
        """Open a port on this node's Ray address for the workers' links. With `share` (a
        worker on this node), the weights move into a shared-memory segment that such workers
        map. Returns its Endpoint."""
        import ray

        self.disconnect()
        self.server_socket, (host, port) = link.listen(ray.util.get_node_ip_address())
        self.segment = None
        if share and shm.available():
            self.segment = shm.Segment(len(self.w), self.w.dtype)
            np.copyto(self.segment.array, self.w)
            self.w = self.segment.array  # updated in place from now on, where the workers read it
        return Endpoint(host, port, self.segment and self.segment.path)

    def accept(self, num_workers, secret, timeout_s):
        self.links = link.accept(self.server_socket, num_workers, secret, timeout_s)
        self.recv_buf = np.empty_like(self.w)
        return True

    def attach(self, grad_paths, start, stop):
        """Map the gradient segment of each worker on this node (paths in rank order, None for
        the others); this actor's slice is [start, stop). Its own segment is sealed: every
        worker has mapped it."""
        self.peer_grads = [None if path is None else shm.attach(path, stop, self.w.dtype)[start:stop] for path in grad_paths]
        remote = [g is None for g in self.peer_grads]
        together = len(remote) > 1 and any(remote) and len(remote) * self.w.nbytes <= RECV_BUDGET
        self.recv_bufs = [np.empty_like(self.w) if r else None for r in remote] if together else []
        if self.segment:
            self.segment.close()
        return True

    def run(self, orders):
        """Carry out a window of steps over the links: per step, send the order (and this
        slice's weights, to a worker on another node) to every worker, take their gradient
        slices and Sums, add the slices in rank order, then step. Returns the StepInfos.

        When some worker is on another node, every link moves its bytes at once: the weights go
        out to all workers together and each gradient is taken as it arrives, into a buffer of
        its own (at most RECV_BUDGET bytes for all of them), then added in rank order; so a
        node's link carries weights out and gradients in at the same time. Otherwise (all on
        this node, or the buffers would not fit) one worker after the other, as a sum needs no
        buffers: the first slice goes straight into the sum buffer and each next one is added."""
        infos, weights = [], link.as_bytes(self.w)
        try:
            if not self.links:
                raise link.LinkError("no links to the workers")
            for order in orders:
                self._check_next(order)
                head = link.pack_order(order)
                if self.recv_bufs:
                    sums = self._exchange(head, weights)
                else:
                    sums = self._one_by_one(head, weights)
                infos.append(self._step(order, *self._mean(sums, order), len(self.links)))
            for conn in self.links:
                link.send(conn, link.END)
        except BaseException:
            self.disconnect()  # the workers see the link close and stop too
            raise
        return infos

    def _exchange(self, head, weights):
        """One step's transfers on every link at once; self.grad = the rank-order sum. Returns the Sums."""
        heads = [[head] if shared is not None else [head, weights] for shared in self.peer_grads]
        raw = [bytearray(self.sums_size) for _ in self.links]
        grads = [shared if shared is not None else buf for shared, buf in zip(self.peer_grads, self.recv_bufs)]
        incoming = [[view] if shared is not None else [link.as_bytes(buf), view]
                    for shared, buf, view in zip(self.peer_grads, self.recv_bufs, raw)]
        link.exchange(sends=zip(self.links, heads), recvs=zip(self.links, incoming))
        rank_order_sum(grads, self.grad)
        return [link.unpack_sums(bytes(r)) for r in raw]

    def _one_by_one(self, head, weights):
        """One step's transfers a worker at a time; self.grad = the rank-order sum. Returns the Sums."""
        for conn, shared in zip(self.links, self.peer_grads):
            if shared is None:  # a worker on another node gets the weights with the order
                link.send(conn, head, weights)
            else:
                link.send(conn, head)
        sums = []

        def arriving():  # each worker's slice in rank order, read once the one before is added
            for k, (conn, shared) in enumerate(zip(self.links, self.peer_grads)):
                if shared is None:  # through the socket: the first straight into the sum buffer
                    shared = self.grad if k == 0 else self.recv_buf
                    link.recv_into(conn, link.as_bytes(shared))
                sums.append(link.unpack_sums(link.recv_exact(conn, self.sums_size)))
                yield shared

        rank_order_sum(arriving(), self.grad)
        return sums

    def disconnect(self):
        link.close(getattr(self, "links", []))
        self.links, self.peer_grads, self.recv_bufs = [], [], []
        if getattr(self, "server_socket", None) is not None:
            self.server_socket.close()
            self.server_socket = None
        if getattr(self, "segment", None):
            self.segment.close()  # the mappings keep it until they end
        return True
