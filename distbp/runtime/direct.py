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
from distbp.errors import DistbpError, TrainingError
from distbp.runtime import link, shm
from distbp.runtime.calls import CONTROL, get, unwrap
from distbp.runtime.link import LinkError
from distbp.runtime.messages import Endpoint, rank_order_sum, split_step_returns

WINDOW_S = 0.25  # a direct window's target length: progress rows and signals are this fresh
MAX_WINDOW = 256
FIRST_WINDOW = 8  # steps in a window before the step time is known
CONNECT_S = 60
RECV_BUDGET = 512 << 20  # bytes of per-worker gradient buffers a parameter actor may hold (see run)
PART_BYTES = 128 << 10  # a parameter actor steps its slice, and sends it on, this much at a time


class DirectWorker:
    """A shard worker's side of the links (ShardWorker takes it on)."""

    def connect(self, endpoints, secret, timeout_s, same_node, congestion=None):
        """Open this worker's link to each parameter actor (their Endpoints, in slice order),
        with the TCP congestion control `congestion` (None: the system's). With an actor on
        this node (same_node[i]) its weights are read from its shared-memory segment, and this
        worker's gradient is written to a segment of its own. Returns (that segment's path or
        None, the congestion control the links use)."""
        self.disconnect()
        spec = self.plan.spec
        self.links = [link.connect((e.host, e.port), self.plan.rank, secret, timeout_s, congestion) for e in endpoints]
        self.shared_w = [
            shm.attach(path, b - a, spec.np_dtype) if near and path else None
            for path, near, (a, b) in zip((e.segment for e in endpoints), same_node, self.slices)
        ]
        zero_copy = len(self.shared_w) == 1 and self.shared_w[0] is not None  # serve reads the segment itself
        self.weights = None if zero_copy else np.empty(spec.num_params, spec.np_dtype)  # kept between windows
        if any(w is not None for w in self.shared_w):
            self.grad_segment = shm.Segment(spec.num_params, spec.np_dtype)
            self.grad_out = self.grad_segment.array
        return self.grad_segment and self.grad_segment.path, link.congestion(self.links[0])

    def serve(self):
        """Run steps as the parameter actors send them, until they end the window. Per step:
        each actor's order and weight slice in (through its socket, or already in its shared
        segment), then this shard's Sums and gradient slices (through the socket, or written to
        this worker's segment) out. Sending a step's gradients and taking the next step's
        orders and weights is one transfer (link.exchange): every link moves its bytes at once,
        in both directions, so no actor waits for another's slice to pass, and an actor's new
        weights may come in while this worker's gradients still go out. A window's end may
        bring the weights the next window starts from (their header says so)."""
        links, shared, steps = self.links, self.shared_w, 0
        zero_copy = len(shared) == 1 and shared[0] is not None
        heads = [bytearray(link.ORDER.size) for _ in links]
        try:
            if not links:
                raise link.LinkError("no links to the parameter actors")
            self._transfer(heads, [[] for _ in links], zero_copy)
            while True:
                order = link.unpack_order(bytes(heads[0]))
                if not order.step:  # every parameter actor ends the window together
                    return steps
                for (a, b), weights in zip(self.slices, shared):
                    if weights is not None and not zero_copy:
                        np.copyto(self.weights[a:b], weights)
                grads, sums = split_step_returns(self._step(order, shared[0] if zero_copy else self.weights, self.grad_out))
                payload = link.pack_sums(sums)
                outgoing = [[payload] if weights is not None else [payload, link.as_bytes(np.ascontiguousarray(grad))] for grad, weights in zip(grads, shared)]
                self._transfer(heads, outgoing, zero_copy)
                if order.evaluate and self.plan.rank == 1:
                    faults.hit("worker_after_eval", order.step)
                steps += 1
        except BaseException:
            self.disconnect()
            raise

    def _transfer(self, heads, outgoing, zero_copy):
        """Send `outgoing` on each link while reading each parameter actor's next header into
        `heads`, and its weight slice into place in self.weights when the header says it follows."""
        if zero_copy:  # one actor, beside this worker: nothing but the sums and the header cross
            link.send(self.links[0], *outgoing[0])
            link.poll(self.links[0])
            link.recv_into(self.links[0], memoryview(heads[0]))
            return

        def parts(head, a, b):
            yield head
            if link.weights_follow(head):
                yield link.as_bytes(self.weights[a:b])

        incoming = [parts(head, a, b) for head, (a, b) in zip(heads, self.slices)]
        link.exchange(sends=zip(self.links, outgoing), recvs=zip(self.links, incoming), spin=link.POLL_S)

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
        self.links, self.shared_w, self.grad_out, self.grad_segment = [], [], None, None
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

    def accept(self, num_workers, secret, timeout_s, congestion=None):
        self.links = link.accept(self.server_socket, num_workers, secret, timeout_s, congestion)
        self.recv_buf = np.empty_like(self.w)
        self.sent_ahead = False  # the workers elsewhere hold this slice's current weights (run)
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
        slice's weights, to a worker on another node) to every worker, take their Sums and
        gradient slices, add the slices in rank order, then step. Returns the StepInfos.

        When some worker is on another node, every link moves its bytes at once (`_pipelined`).
        Otherwise (all on this node, or the buffers would not fit) one worker after the other
        (`_one_by_one`)."""
        infos = []
        try:
            if self.torn is not None:
                raise self.torn
            if not self.links:
                raise link.LinkError("no links to the workers")
            for i, order in enumerate(orders):
                self._check_next(order)
                if self.recv_bufs:
                    following = orders[i + 1] if i + 1 < len(orders) else None
                    infos.append(self._pipelined(order, following, first=i == 0))
                else:
                    infos.append(self._step(order, *self._mean(self._one_by_one(order), order), len(self.links)))
            if not self.recv_bufs or not orders:  # (else the last step sent it, with the weights)
                for conn in self.links:
                    link.send(conn, link.END)
        except BaseException:
            self.disconnect()  # the workers see the link close and stop too
            raise
        return infos

    def _pipelined(self, order, following, first):
        """One step, every link moving its bytes at once, and the next step's weights sent on
        while this step's gradients still come in. Each worker's Sums come first, then its
        gradient slice, into a buffer of its own (at most RECV_BUDGET bytes for all of them).
        As soon as the first PART_BYTES of every worker's slice are in, that part is added in
        rank order, divided and stepped, and its new weights go out to the workers elsewhere,
        behind the header of the `following` order (or the window's end: the next window
        then starts without sending them again); and so on, part after part. A worker on
        this node reads the weights from shared memory once the whole slice has stepped, so
        its header comes last. The bits are those of stepping the whole slice at once. A part
        whose gradient is not finite ends the step with the divergence error; as the parts
        before it have moved, this actor then refuses every later step and snapshot with that
        error, so nothing torn is checkpointed or stepped on. Returns the step's StepInfo."""
        remote = [g is None for g in self.peer_grads]
        outgoing = [link.Parts(closed=False) for _ in self.links]
        if first:  # this step's order (and weights, unless the last window's end brought them)
            for box, far in zip(outgoing, remote):
                box.put(link.pack_order(order, far and not self.sent_ahead))
                if far and not self.sent_ahead:
                    box.put(link.as_bytes(self.w))
        for box, far in zip(outgoing, remote):
            if far:
                box.put(link.pack_order(following, True))
        raw = [bytearray(self.sums_size) for _ in self.links]
        grads = [shared if shared is not None else buf for shared, buf in zip(self.peer_grads, self.recv_bufs)]
        incoming = [link.Parts([r] if not far else [r, link.as_bytes(g)]) for r, far, g in zip(raw, remote, grads)]
        size, itemsize = len(self.w), self.w.itemsize
        part = max(1, PART_BYTES // itemsize)
        progress = {"done": 0, "totals": None}

        def step_parts():  # after each read: step every part that is now in from every worker
            if progress["totals"] is None:
                if any(box.got < self.sums_size for box in incoming):
                    return
                progress["totals"] = self._totals([link.unpack_sums(bytes(r)) for r in raw], order)
                self._begin(order)
            arrived = min((box.got - self.sums_size) // itemsize if far else size for box, far in zip(incoming, remote))
            a = progress["done"]
            while a < size and min(a + part, size) <= arrived:
                b = min(a + part, size)
                rank_order_sum([g[a:b] for g in grads], self.grad[a:b])
                try:
                    self._divide(progress["totals"], order, a, b)
                except TrainingError as err:  # the parts before (and Adam's count) have moved:
                    self.torn = err  # this actor refuses every later step and snapshot
                    raise
                scratch = self.grad[a:b].copy() if order.evaluate else self.grad[a:b]  # evaluate: norms below
                self.opt.update(self.w[a:b], scratch, self.state, order.lr, slice(a, b))
                for box, far in zip(outgoing, remote):
                    if far:
                        box.put(link.as_bytes(self.w[a:b]))
                progress["done"] = a = b
            if a == size and not outgoing[0].closed:
                for box, far in zip(outgoing, remote):
                    if not far:
                        box.put(link.pack_order(following))
                    box.close()

        link.exchange(sends=zip(self.links, outgoing), recvs=zip(self.links, incoming), on_recv=step_parts)
        self.sent_ahead = following is None
        return self._applied(order, progress["totals"], self._squares(self.grad, order), len(self.links))

    def _one_by_one(self, order):
        """One step's transfers a worker at a time; self.grad = the rank-order sum. Returns the Sums."""
        head, weights = link.pack_order(order), link.as_bytes(self.w)
        for conn, shared in sorted(zip(self.links, self.peer_grads), key=lambda t: t[1] is None):  # those beside it first
            if shared is None:  # a worker on another node gets the weights with the order
                link.send(conn, link.pack_order(order, True), weights)
            else:
                link.send(conn, head)
        sums = []

        def arriving():  # each worker's slice in rank order, read once the one before is added
            for k, (conn, shared) in enumerate(zip(self.links, self.peer_grads)):
                sums.append(link.unpack_sums(link.recv_exact(conn, self.sums_size)))
                if shared is None:  # through the socket: the first straight into the sum buffer
                    shared = self.grad if k == 0 else self.recv_buf
                    link.recv_into(conn, link.as_bytes(shared))
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
        congestion = link.CONGESTION[self.actors.job.cluster.tcp_congestion]
        endpoints = get([s.listen.remote(any(near[i])) for i, s in enumerate(servers)])
        accepted = [s.accept.remote(len(workers), secret, CONNECT_S, congestion) for s in servers]
        connected = get([w.connect.remote(endpoints, secret, CONNECT_S, [row[k] for row in near], congestion) for k, w in enumerate(workers)] + accepted)
        paths = [path for path, _ in connected[: len(workers)]]
        self.congestion = sorted({cc for _, cc in connected[: len(workers)] if cc})
        shared = [[bool(near[i][k] and endpoints[i].segment) for i in range(len(servers))] for k in range(len(workers))]
        get([
            s.attach.remote([p if shared[k][i] else None for k, p in enumerate(paths)], a, b)
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
        except Exception:
            self._settle(serving)
            self._own_error(running)
            raise
        except BaseException:
            self._settle(serving)
            raise
        get(serving)
        return [list(infos) for infos in zip(*per_server)]

    @staticmethod
    def _own_error(running):
        """After a failed window: raise a parameter actor's own error (a diverged step, say),
        if one had one, rather than the lost links it left the others with."""
        import ray

        ray.wait(running, num_returns=len(running), timeout=5)
        for ref in running:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayTaskError as err:
                if isinstance(unwrap(err), DistbpError):
                    raise unwrap(err) from None
            except Exception:  # lost, or still winding down
                pass

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
