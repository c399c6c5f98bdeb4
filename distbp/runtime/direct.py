"""The direct engine: each shard worker holds a TCP link to each parameter actor, opened once
per run (and after a recovery), and a window of steps runs over those links with no Ray task,
object store or driver hop per step. Between an actor and a worker on the same node the
arrays do not cross the socket: they live in shared memory (shm.py).

- `DirectEngine`, the driver's side: opens the links (`rebuild`), hands the parameter actors a
  window of orders, and collects their StepInfos at its end.
- `DirectWorker` and `DirectServer`, the actors' sides, which ShardWorker and ParameterServer
  take on: connect and serve; listen, accept, attach and run. Both call the same step code as
  the task engine (ShardWorker._step; the parameter actor's rank-order sum and optimizer step),
  so the bits are the same.
"""

import secrets

import numpy as np

from distbp import faults
from distbp.runtime import link, shm
from distbp.runtime.calls import CONTROL, get, unwrap
from distbp.runtime.link import LinkError
from distbp.runtime.messages import Endpoint, rank_order_sum, split_step_returns

WINDOW_S = 0.25  # a direct window's target length: progress rows and signals are this fresh
MAX_WINDOW = 256
FIRST_WINDOW = 8  # steps in a window before the step time is known
CONNECT_S = 60
RECV_BUDGET = 512 << 20  # bytes of per-worker gradient buffers a parameter actor may hold (see run)


def pulls(shared):
    """Whether a worker whose links to the parameter actors are `shared` (through shared
    memory: an actor on its node) asks the others for each step's slice (READY): when it
    has both kinds."""
    return any(shared) and not all(shared)


class DirectWorker:
    """A shard worker's side of the links (ShardWorker takes it on)."""

    def connect(self, endpoints, secret, timeout_s, same_node):
        """Open this worker's link to each parameter actor (their Endpoints, in slice order).
        With an actor on this node (same_node[i]) its weights are read
        from its shared-memory segment, and this worker's gradient is written to a segment of
        its own, whose path it returns (else None)."""
        self.disconnect()
        spec = self.plan.spec
        self.links = [link.connect((e.host, e.port), self.plan.rank, secret, timeout_s) for e in endpoints]
        self.shared_w = [
            shm.attach(path, b - a, spec.np_dtype) if near and path else None
            for path, near, (a, b) in zip((e.segment for e in endpoints), same_node, self.slices)
        ]
        if any(w is not None for w in self.shared_w):
            self.grad_segment = shm.Segment(spec.num_params, spec.np_dtype)
            self.grad_out = self.grad_segment.array
        self.pull = pulls([w is not None for w in self.shared_w])
        return self.grad_segment and self.grad_segment.path

    def serve(self):
        """Run steps as the parameter actors send them, until they end the window. Per step:
        each actor's order and weight slice in (through its socket, or already in its shared
        segment), then this shard's gradient slices (through the socket, or written to this
        worker's segment) and its Sums out. With more than one link, every link moves its bytes
        at once (link.exchange): no actor waits for another's slice to pass.

        A worker with a parameter actor on its own node and others elsewhere (per_worker) asks
        those others for a step's slices (READY) only once its own actor has started the step.
        That actor starts once every gradient slice of the last step is in, so the slices
        coming in do not crowd this node's link while gradients for it still arrive."""
        links, shared, steps = self.links, self.shared_w, 0
        zero_copy = len(shared) == 1 and shared[0] is not None
        try:
            while links:
                link.poll(links[0])
                orders = self._orders_and_weights()
                if not orders[0].step:  # every parameter actor ends the window together
                    return steps
                for (a, b), weights in zip(self.slices, shared):
                    if weights is not None and not zero_copy:
                        np.copyto(self.weights[a:b], weights)
                grads, sums = split_step_returns(self._step(orders[0], shared[0] if zero_copy else self.weights, self.grad_out))
                payload = link.pack_sums(sums)
                outgoing = [[payload] if weights is not None else [link.as_bytes(np.ascontiguousarray(grad)), payload] for grad, weights in zip(grads, shared)]
                if len(links) == 1:
                    link.send(links[0], *outgoing[0])
                else:
                    link.exchange(sends=zip(links, outgoing))
                if orders[0].evaluate and self.plan.rank == 1:
                    faults.hit("worker_after_eval", orders[0].step)
                steps += 1
            raise link.LinkError("no links to the parameter actors")
        except BaseException:
            self.disconnect()
            raise

    def _orders_and_weights(self):
        """Each parameter actor's order of the next step, and its weight slice when it comes
        through the socket (read into place in self.weights)."""
        heads = [bytearray(link.ORDER.size) for _ in self.links]
        ask = range(len(self.links))
        if self.pull:  # the order of the actors beside this worker first, then READY to the others
            beside = [i for i, w in enumerate(self.shared_w) if w is not None]
            ask = [i for i, w in enumerate(self.shared_w) if w is None]
            for i in beside:
                link.recv_into(self.links[i], memoryview(heads[i]).cast("B"))
            if link.unpack_order(bytes(heads[beside[0]])).step:  # (not at the window's end)
                for i in ask:
                    link.send(self.links[i], link.READY)

        def parts(head, a, b, weights):
            yield head
            if weights is None and link.unpack_order(head).step:
                yield link.as_bytes(self.weights[a:b])

        incoming = [(self.links[i], parts(heads[i], *self.slices[i], self.shared_w[i])) for i in ask]
        if len(incoming) == 1:
            conn, views = incoming[0]
            for view in views:
                link.recv_into(conn, memoryview(view).cast("B"))
        else:
            link.exchange(recvs=incoming)
        return [link.unpack_order(bytes(head)) for head in heads]

    def seal_segment(self):
        """Every parameter actor has mapped this worker's gradient segment: no other process
        may open it from now on."""
        if getattr(self, "grad_segment", None):
            self.grad_segment.close()
        return True

    def disconnect(self):
        link.close(self.links)
        if getattr(self, "grad_segment", None):
            self.grad_segment.close()  # the mappings keep it until they end
        self.links, self.shared_w, self.grad_out, self.grad_segment, self.pull = [], [], None, None, False
        return True


class DirectServer:
    """A parameter actor's side of the links (ParameterServer takes it on)."""

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

    def attach(self, grad_paths, start, stop, ready=None):
        """Map the gradient segment of each worker on this node (paths in rank order, None for
        the others); this actor's slice is [start, stop). `ready[k]`: worker k asks for each
        step's slice with READY (DirectWorker.serve). Its own segment is sealed: every worker
        has mapped it."""
        self.ready = list(ready) if ready else [False] * len(grad_paths)
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
        asked = [bytearray(len(link.READY)) if r else None for r in self.ready]
        grads = [shared if shared is not None else buf for shared, buf in zip(self.peer_grads, self.recv_bufs)]
        incoming = [([a] if a is not None else []) + ([view] if shared is not None else [link.as_bytes(buf), view])
                    for a, shared, buf, view in zip(asked, self.peer_grads, self.recv_bufs, raw)]
        held = [conn for conn, a in zip(self.links, asked) if a is not None]
        link.exchange(sends=zip(self.links, heads), recvs=zip(self.links, incoming), held=held)
        if any(a is not None and bytes(a) != link.READY for a in asked):
            raise link.LinkError("a worker sent something else than READY")
        rank_order_sum(grads, self.grad)
        return [link.unpack_sums(bytes(r)) for r in raw]

    def _one_by_one(self, head, weights):
        """One step's transfers a worker at a time; self.grad = the rank-order sum. Returns the Sums."""
        links = list(zip(self.links, self.peer_grads, self.ready))
        for conn, shared, ready in sorted(links, key=lambda t: t[1] is None):  # the workers beside it first
            if shared is None:  # a worker on another node gets the weights with the order
                if ready and link.recv_exact(conn, len(link.READY)) != link.READY:
                    raise link.LinkError("a worker sent something else than READY")
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
        shared = [[bool(near[i][k] and endpoints[i].segment) for i in range(len(servers))] for k in range(len(workers))]
        get([
            s.attach.remote([p if shared[k][i] else None for k, p in enumerate(paths[: len(workers)])], a, b,
                            [pulls(shared[k]) and not shared[k][i] for k in range(len(workers))])
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
