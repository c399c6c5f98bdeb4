"""Direct TCP links between the parameter actors and the shard workers, for the `direct` step
engine: each worker holds one connection to each parameter actor, opened once per run (and
again after a failure) with a per-run secret, then carries every step of a window.

Nothing on the wire is pickled. Per step, parameter actor i sends each worker an order header,
followed by its weight slice (raw bytes) when the header says so; the worker answers with its
sums as a fixed-size float64 vector, then its gradient slice (raw bytes). A header with step 0
ends the window; it too may be followed by the weights (those the next window starts from). A
parameter actor listens on its node's Ray address: 127.0.0.1 for an embedded or loopback Ray.
"""

import hmac
import select
import socket
import struct
import time
from collections import deque

import numpy as np

from distbp.runtime.messages import Order, Sums, stats_size

ORDER = struct.Struct("<qd??q?")  # step (0 = end of window), lr, evaluate, keep, rows; the weights follow
HELLO = struct.Struct("<q32s")  # worker rank, the run's secret
KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}  # a dead peer shows in ~25 s
# ... also while data is in flight to it, when keepalive does not run: without this, a peer whose
# network is gone (cable, switch, VM lost) shows only after TCP's retransmissions give up, about
# 15 minutes. A live peer acknowledges at the kernel, so a slow or stopped process never trips it.
USER_TIMEOUT_MS = 25_000
# A worker that has sent its gradient polls for the next order this long before it blocks:
# waking a process that slept (on a VM, a halted virtual CPU) costs up to milliseconds, more
# than a small network's whole step. Measured on 2 cores: median step 0.40 -> 0.32 ms, and
# the mean 0.61 -> 0.36 ms (the slow tail is what goes).
POLL_S = 300e-6
GREETING_S = 5.0  # how long a new connection to a parameter actor may take to say who it is
# The TCP congestion control of the links (cluster.tcp_congestion). In a step every node sends
# gradient slices to, and new weights from, K - 1 others at once, starting together from idle.
# With BBR (the kernel's default on some systems) those flows shared rate-limited links badly:
# measured at K = 3 over 100 Mbit/s, a step took 1.12x a DDP ring's; with Reno 0.99x
# (docs/scaling.md). Reno is built into every Linux kernel and any process may choose it.
CONGESTION = {"auto": "reno", "system": None}


class LinkError(ConnectionError):
    """A link to a worker or parameter actor broke: the peer died or its node was lost."""


def _tune(sock, congestion=None):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a step is a request and a reply
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in {**KEEPALIVE, "TCP_USER_TIMEOUT": USER_TIMEOUT_MS}.items():
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if congestion and hasattr(socket, "TCP_CONGESTION"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError:  # not in this kernel, or not allowed here: the system's default stays
            pass
    return sock


def congestion(sock):
    """The TCP congestion control `sock` uses ('reno', 'bbr', ...), or None where the system
    does not say (not Linux)."""
    if not hasattr(socket, "TCP_CONGESTION"):
        return None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0].decode()


def listen(host):
    """A listening socket on `host` at a free port; returns (socket, (host, port))."""
    server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    return server, (host, server.getsockname()[1])


def accept(server, count, secret, timeout_s, congestion=None):
    """`count` worker connections that present `secret`, in rank order, within `timeout_s`,
    each with the TCP congestion control `congestion` (None: the system's default).
    The listening port is open to every process on the node, so no caller is trusted: each
    connection gets GREETING_S to send its greeting, all are read side by side, and one that is
    silent, short, garbled or not of this run is dropped while the others go on."""
    deadline = time.monotonic() + timeout_s
    links, pending = {}, {}  # rank -> connection; connection -> (greeting so far, its deadline)
    try:
        while len(links) < count:
            now = time.monotonic()
            if now >= deadline:
                raise LinkError(f"workers did not connect within {timeout_s:g} s ({len(links)} of {count} arrived)")
            for conn, (_, due) in list(pending.items()):
                if now >= due:  # silent too long
                    del pending[conn]
                    conn.close()
            wait = min([deadline, *(due for _, due in pending.values())]) - now
            readable, _, _ = select.select([server, *pending], [], [], max(0.0, wait))
            for sock in readable:
                if sock is server:
                    conn, _ = server.accept()
                    pending[conn] = (bytearray(), now + GREETING_S)
                    continue
                greeting, due = pending[sock]
                try:
                    data = sock.recv(HELLO.size - len(greeting))
                except OSError:
                    data = b""
                if data:
                    greeting += data
                    if len(greeting) < HELLO.size:
                        continue
                del pending[sock]
                rank, token = HELLO.unpack(bytes(greeting)) if len(greeting) == HELLO.size else (-1, b"")
                if not hmac.compare_digest(token, secret) or rank in links or not 0 <= rank < count:
                    sock.close()  # closed early, or not one of this run's workers
                    continue
                sock.settimeout(None)
                links[rank] = _tune(sock, congestion)
    except BaseException as err:
        close(list(links.values()) + list(pending))
        if isinstance(err, OSError) and not isinstance(err, LinkError):
            raise LinkError(f"workers did not connect: {err}") from None
        raise
    finally:
        server.close()
    return [links[k] for k in range(count)]


def connect(address, rank, secret, timeout_s, congestion=None):
    conn = socket.create_connection(tuple(address), timeout=timeout_s)
    conn.sendall(HELLO.pack(rank, secret))
    conn.settimeout(None)
    return _tune(conn, congestion)


def poll(conn, seconds=POLL_S):
    """Busy-wait up to `seconds` for `conn` to have data (then a read will not sleep)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if select.select([conn], [], [], 0)[0]:
            return


def recv_exact(conn, size):
    buf = bytearray(size)
    recv_into(conn, memoryview(buf))
    return bytes(buf)


def recv_into(conn, view):
    """Fill `view` (a writable byte memoryview) from `conn`; LinkError if the peer is gone."""
    got = 0
    try:
        while got < len(view):
            n = conn.recv_into(view[got:])
            if n == 0:
                raise LinkError("the peer closed the link")
            got += n
    except OSError as err:
        raise LinkError(str(err)) from None


def exchange(sends=(), recvs=(), on_recv=None, spin=0.0):
    """Carry out every transfer at once, each link busy in both directions: for each
    (conn, parts) of `sends` send its byte views in order, and for each (conn, parts) of
    `recvs` fill its writable byte views in order. No peer waits for another, so a slow link
    holds back only its own bytes. LinkError when a peer is gone.

    `parts` may be a Parts, which the caller can read (`got`) and add to while the exchange
    runs: `on_recv()` is called after each read, and may `put` more parts on an open Parts;
    the exchange ends once every Parts is closed and sent. `recvs` parts may be a generator,
    so that what is read next can depend on what came before (it resumes once the view it
    yielded is full). With only reads left, it polls for `spin` seconds before it sleeps."""
    out = {conn: p if isinstance(p, Parts) else Parts(p) for conn, p in sends}
    inn = {conn: p if isinstance(p, Parts) else Parts(p) for conn, p in recvs}
    inn = {c: t for c, t in inn.items() if t.current() is not None}
    spin_until = None
    try:
        while inn or any(not t.done() for t in out.values()):
            writable = [c for c, t in out.items() if t.current() is not None]
            if not writable and not inn:
                raise ValueError("an open Parts with nothing to send, and nothing to receive")
            timeout = None
            if spin and not writable:
                spin_until = spin_until or time.perf_counter() + spin
                timeout = 0 if time.perf_counter() < spin_until else None
            readable, writable, _ = select.select(list(inn), writable, [], timeout)
            for conn in writable:
                t = out[conn]
                try:
                    t.advance(conn.send(t.view, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    continue
            for conn in readable:
                t = inn[conn]
                try:
                    n = conn.recv_into(t.view, len(t.view), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if n == 0:
                    raise LinkError("the peer closed the link")
                t.advance(n)
                if t.current() is None:
                    del inn[conn]
            if readable and on_recv is not None:
                on_recv()
    except OSError as err:  # LinkError is one too: passed on as it is
        raise err if isinstance(err, LinkError) else LinkError(str(err)) from None


class Parts:
    """The byte views one link sends or fills, in order: those given first (a list or a
    generator), then those `put` later while it is open. `got` counts the bytes done."""

    __slots__ = ("parts", "later", "view", "got", "closed")

    def __init__(self, parts=(), closed=True):
        self.parts, self.later, self.view, self.got, self.closed = iter(parts), deque(), None, 0, closed

    def put(self, part):
        self.later.append(part)

    def close(self):
        self.closed = True

    def current(self):
        """The view to send or fill now; None when there is none (yet)."""
        while self.view is None or not len(self.view):
            part = next(self.parts, None)
            if part is None:
                if not self.later:
                    self.view = None
                    return None
                part = self.later.popleft()
            self.view = memoryview(part).cast("B")
        return self.view

    def advance(self, n):
        self.view = self.view[n:]
        self.got += n

    def done(self):
        return self.closed and self.current() is None


def send(conn, *parts):
    try:
        for part in parts:
            conn.sendall(part)
    except OSError as err:
        raise LinkError(str(err)) from None


def close(links):
    for conn in links:
        try:
            conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it
        except OSError:
            pass
        conn.close()


def as_bytes(array):
    """A byte view of a contiguous array, for sending or receiving in place."""
    return memoryview(array).cast("B")


def pack_order(order, weights=False):
    """The header of `order` (None: the end of the window); `weights`: the weight slice follows."""
    if order is None:
        return ORDER.pack(0, 0.0, False, False, 0, weights)
    return ORDER.pack(order.step, order.lr, order.evaluate, order.keep, order.rows, weights)


END = pack_order(None)


def unpack_order(data):
    return Order(*ORDER.unpack(data)[:-1])


def weights_follow(data):
    """Whether the weight slice follows the header `data`."""
    return ORDER.unpack(data)[-1]


def sums_size(num_layers):
    return 8 * (1 + 2 * stats_size(num_layers))


def pack_sums(sums):
    """[has_val, train..., val...] as float64 bytes."""
    n = len(sums.train)
    out = np.zeros(1 + 2 * n)
    out[1 : 1 + n] = sums.train
    if sums.val is not None:
        out[0] = 1.0
        out[1 + n :] = sums.val
    return out.tobytes()


def unpack_sums(data):
    vec = np.frombuffer(data, np.float64)
    n = (len(vec) - 1) // 2
    return Sums(vec[1 : 1 + n].copy(), vec[1 + n :].copy() if vec[0] else None)
