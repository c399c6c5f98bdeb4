"""link.exchange: every link moves its bytes at once, in both directions, with no peer waiting
for another; parts read later may depend on parts read before. Real sockets, no Ray."""

import socket
import threading

import numpy as np
import pytest

from distbp.runtime import link


def test_both_directions_of_several_links_at_once_deliver_every_byte():
    """Three links, each sending 4 MB and receiving 4 MB at the same time: more than the socket
    buffers hold, so sending everything first and then reading (or one link after the other,
    with every peer doing the same in another order) would deadlock."""
    pairs = [socket.socketpair() for _ in range(3)]
    rng = np.random.default_rng(0)
    size = 1 << 20  # float32 values: 4 MB a direction
    ours = [rng.standard_normal(size).astype(np.float32) for _ in pairs]
    theirs = [rng.standard_normal(size).astype(np.float32) for _ in pairs]
    got_here = [np.empty(size, np.float32) for _ in pairs]
    got_there = [np.empty(size, np.float32) for _ in pairs]
    heads = [bytearray(4) for _ in pairs]

    def peer():  # the far ends, themselves all at once and in the other order
        ends = [b for _, b in reversed(pairs)]
        link.exchange(sends=[(c, [link.as_bytes(t)]) for c, t in zip(ends, reversed(theirs))],
                      recvs=[(c, [h, link.as_bytes(g)]) for c, h, g in zip(ends, reversed(heads), reversed(got_there))])

    far = threading.Thread(target=peer)
    far.start()
    link.exchange(sends=[(a, [b"head", link.as_bytes(o)]) for (a, _), o in zip(pairs, ours)],
                  recvs=[(a, [link.as_bytes(g)]) for (a, _), g in zip(pairs, got_here)])
    far.join(timeout=60)
    assert not far.is_alive()
    assert all(np.array_equal(g, t) for g, t in zip(got_here, theirs))
    assert all(np.array_equal(g, o) for g, o in zip(got_there, ours)) and all(h == b"head" for h in heads)
    for a, b in pairs:
        a.close()
        b.close()


def test_what_is_read_next_can_depend_on_what_was_read():
    a, b = socket.socketpair()
    b.sendall(link.pack_order(link.Order(7, 0.1, False, False, 0)) + b"x" * 16)
    head, body = bytearray(link.ORDER.size), bytearray(16)

    def parts():
        yield head
        if link.unpack_order(bytes(head)).step:
            yield body

    link.exchange(recvs=[(a, parts())])
    assert bytes(body) == b"x" * 16
    a.close()
    b.close()


def test_parts_put_while_the_exchange_runs_go_out_in_order_and_it_ends_once_closed():
    """What a parameter actor does with the new weights: sent on part by part as the gradient
    comes in. Each part put after a read goes out behind those before; nothing ends the
    exchange before the Parts is closed."""
    a, b = socket.socketpair()
    outgoing, incoming = link.Parts([b"head"], closed=False), link.Parts([bytearray(4), bytearray(4)])

    def after_read():
        outgoing.put(b"part%d" % incoming.got)
        if incoming.got == 8:
            outgoing.close()

    run = threading.Thread(target=link.exchange, kwargs=dict(sends=[(a, outgoing)], recvs=[(a, incoming)], on_recv=after_read))
    run.start()
    b.settimeout(10)
    assert link.recv_exact(b, 4) == b"head"
    b.sendall(b"1234")
    assert link.recv_exact(b, 5) == b"part4"  # before the second part was sent
    b.sendall(b"5678")
    assert link.recv_exact(b, 5) == b"part8"
    run.join(timeout=10)
    assert not run.is_alive() and outgoing.done() and incoming.got == 8
    a.close()
    b.close()


def test_an_open_parts_with_nothing_to_wait_for_is_refused():
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="an open Parts with nothing to send"):
        link.exchange(sends=[(a, link.Parts([b"x"], closed=False))])
    a.close()
    b.close()


def test_a_closed_peer_is_a_link_error():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(link.LinkError):
        link.exchange(recvs=[(a, [bytearray(8)])])
    a.close()


def test_link_set_up_drops_bad_callers_and_keeps_waiting_for_the_workers():
    """Any local process can connect to a parameter actor's port. A silent connection (held
    open all along), 18 bytes of garbage, a wrong secret and a rank out of range are each
    dropped, and the two real workers still get through, in rank order."""
    server, address = link.listen("127.0.0.1")
    secret = b"s" * 32
    result = {}
    waiting = threading.Thread(target=lambda: result.update(links=link.accept(server, 2, secret, 60)))
    waiting.start()
    silent = socket.create_connection(address)
    garbage = socket.create_connection(address)
    garbage.sendall(b"\x00garbage-18-bytes!")
    garbage.close()
    wrong = socket.create_connection(address)
    wrong.sendall(link.HELLO.pack(0, b"x" * 32))
    outside = socket.create_connection(address)
    outside.sendall(link.HELLO.pack(7, secret))
    workers = [link.connect(address, rank, secret, 10) for rank in (1, 0)]
    waiting.join(timeout=30)  # a bound on a hang, not a speed check: accept must not wait on `silent`
    assert not waiting.is_alive(), "accept waited on a silent or bad connection"
    links = result["links"]
    for rank, conn in enumerate(links):  # rank order: each link reaches the worker of that rank
        workers[1 - rank].sendall(bytes([rank]))
        assert conn.recv(1) == bytes([rank])
    for sock in [silent, wrong, outside, *workers, *links]:
        sock.close()


def test_link_set_up_without_the_workers_fails_in_one_line_after_its_timeout():
    server, address = link.listen("127.0.0.1")
    silent = socket.create_connection(address)
    with pytest.raises(link.LinkError, match=r"workers did not connect within 0.5 s \(0 of 1 arrived\)"):
        link.accept(server, 1, b"s" * 32, 0.5)
    silent.close()


def _actor_with_a_worker_beside_and_one_elsewhere(w0, together):
    """A parameter actor with worker 0 beside it (its gradient in shared memory: here an
    array) and worker 1 on another node, over socket pairs; (actor, its links' far ends)."""
    from distbp.runtime.server import ParameterServer

    ps = ParameterServer(w0, {"name": "sgd"}, layer_bounds=[(0, 0, len(w0))])
    pairs = [socket.socketpair() for _ in range(2)]
    ps.links = [a for a, _ in pairs]
    ps.recv_buf, ps.sent_ahead = np.empty_like(ps.w), False
    ps.recv_bufs = [None, np.empty_like(ps.w)] if together else []
    for _, far in pairs:
        far.settimeout(10)
    return ps, [far for _, far in pairs]


def _sums(rows):
    from distbp.runtime.messages import Sums, stats_vector

    return link.pack_sums(Sums(stats_vector(1.0, rows, 0, 0.0, np.zeros(1)), None))


def _head(conn):
    head = link.recv_exact(conn, link.ORDER.size)
    return link.unpack_order(head).step, link.weights_follow(head)


def test_a_parameter_actor_sends_each_part_of_its_new_slice_on_before_the_rest_of_the_gradient_is_in(monkeypatch):
    """per_worker across nodes: while worker 1's gradient still comes in, the parts of the
    slice already in from both workers are added in rank order, stepped, and sent to worker 1
    behind the next step's header; worker 0, which reads shared memory, gets its header once
    the whole slice has stepped. The window's end brings worker 1 the weights, and the next
    window starts without them. The weights are those of whole-slice steps on the rank-order sum."""
    from distbp.runtime import direct
    from distbp.runtime.messages import Order

    monkeypatch.setattr(direct, "PART_BYTES", 16)  # parts of 2 float64 values
    w0 = np.arange(8, dtype=np.float64)
    ps, (beside, elsewhere) = _actor_with_a_worker_beside_and_one_elsewhere(w0, together=True)
    g0 = np.linspace(1, 2, 8)
    ps.peer_grads = [g0, None]
    g1 = [np.full(8, 0.5), np.full(8, -0.25)]
    infos = []
    run = threading.Thread(target=lambda: infos.extend(ps.run([Order(1, 0.1, False, False, 5), Order(2, 0.1, False, False, 5)])))
    run.start()
    assert _head(beside) == (1, False)
    assert _head(elsewhere) == (1, True)
    assert np.array_equal(np.frombuffer(link.recv_exact(elsewhere, 64), np.float64), w0)
    w1 = w0 - 0.1 * ((g0 + g1[0]) / 5)
    beside.sendall(_sums(2))
    elsewhere.sendall(_sums(3) + g1[0][:4].tobytes())  # half of worker 1's gradient
    assert _head(elsewhere) == (2, True)
    assert np.array_equal(np.frombuffer(link.recv_exact(elsewhere, 32), np.float64), w1[:4])  # before the rest is sent
    beside.setblocking(False)
    with pytest.raises(BlockingIOError):  # worker 0 reads the whole slice: nothing for it yet
        beside.recv(1)
    beside.setblocking(True)
    elsewhere.sendall(g1[0][4:].tobytes())
    assert np.array_equal(np.frombuffer(link.recv_exact(elsewhere, 32), np.float64), w1[4:])
    assert _head(beside) == (2, False)
    beside.sendall(_sums(2))
    elsewhere.sendall(_sums(3) + g1[1].tobytes())
    w2 = w1 - 0.1 * ((g0 + g1[1]) / 5)
    assert _head(beside) == (0, False) and _head(elsewhere) == (0, True)  # the window's end, and the weights
    assert np.array_equal(np.frombuffer(link.recv_exact(elsewhere, 64), np.float64), w2)
    run.join(timeout=10)
    assert not run.is_alive() and [i.step for i in infos] == [1, 2]
    np.testing.assert_array_equal(ps.w, w2)
    run = threading.Thread(target=lambda: infos.extend(ps.run([Order(3, 0.1, False, False, 5)])))
    run.start()
    assert _head(beside) == (3, False) and _head(elsewhere) == (3, False)  # worker 1 holds them already
    beside.sendall(_sums(2))
    elsewhere.sendall(_sums(3) + g1[0].tobytes())
    assert _head(beside) == (0, False) and _head(elsewhere) == (0, True)
    np.testing.assert_array_equal(np.frombuffer(link.recv_exact(elsewhere, 64), np.float64), w2 - 0.1 * ((g0 + g1[0]) / 5))
    run.join(timeout=10)
    assert not run.is_alive() and [i.step for i in infos] == [1, 2, 3]
    ps.disconnect()
    beside.close()
    elsewhere.close()


def test_a_parameter_actor_one_worker_at_a_time_sends_the_weights_with_each_order():
    """The other way of moving bytes (all workers on this node, or buffers over the budget):
    worker 1 elsewhere gets the weights behind every order and none behind the window's end."""
    from distbp.runtime.messages import Order

    w0 = np.arange(4, dtype=np.float64)
    ps, (beside, elsewhere) = _actor_with_a_worker_beside_and_one_elsewhere(w0, together=False)
    g0, g1 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.5, 0.5, 0.5])
    ps.peer_grads = [g0, None]
    infos = []
    run = threading.Thread(target=lambda: infos.extend(ps.run([Order(1, 0.1, False, False, 5)])))
    run.start()
    assert _head(beside) == (1, False) and _head(elsewhere) == (1, True)
    assert np.array_equal(np.frombuffer(link.recv_exact(elsewhere, w0.nbytes), np.float64), w0)
    beside.sendall(_sums(2))
    elsewhere.sendall(_sums(3) + g1.tobytes())
    assert _head(beside) == (0, False) == _head(elsewhere)
    run.join(timeout=10)
    assert not run.is_alive() and [i.step for i in infos] == [1]
    np.testing.assert_array_equal(ps.w, w0 - 0.1 * ((g0 + g1) / 5))
    ps.disconnect()
    beside.close()
    elsewhere.close()


def test_an_empty_window_still_ends_on_every_link():
    """A window of no steps: every worker gets the window's end (it would wait for ever else),
    without weights, in both of the actor's ways of moving bytes."""
    for together in (True, False):
        ps, (beside, elsewhere) = _actor_with_a_worker_beside_and_one_elsewhere(np.arange(4, dtype=np.float64), together)
        ps.peer_grads = [np.zeros(4), None]
        assert ps.run([]) == []
        assert _head(beside) == (0, False) == _head(elsewhere)
        ps.disconnect()
        beside.close()
        elsewhere.close()


def test_a_gradient_that_turns_infinite_part_way_leaves_an_actor_that_refuses_to_go_on(monkeypatch):
    """A finite loss, and an infinite value in the second part of worker 1's gradient: the
    first part has stepped (and gone out) when the second is checked. The step ends with the
    divergence error, and the actor, whose slice is now torn, gives the same error for any
    later step or snapshot instead of stepping on from it or checkpointing it."""
    from distbp.errors import TrainingError
    from distbp.runtime import direct
    from distbp.runtime.messages import Order

    monkeypatch.setattr(direct, "PART_BYTES", 16)
    ps, (beside, elsewhere) = _actor_with_a_worker_beside_and_one_elsewhere(np.arange(4, dtype=np.float64), together=True)
    ps.peer_grads = [np.ones(4), None]
    errors = []

    def run():
        try:
            ps.run([Order(1, 0.1, False, False, 5)])
        except TrainingError as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    assert _head(beside) == (1, False) and _head(elsewhere) == (1, True)
    link.recv_exact(elsewhere, 32)
    beside.sendall(_sums(2))
    elsewhere.sendall(_sums(3) + np.array([1.0, 1.0, np.inf, 1.0]).tobytes())
    thread.join(timeout=10)
    assert not thread.is_alive() and len(errors) == 1 and "diverged at step 1" in errors[0].message
    for again in (lambda: ps.run([Order(1, 0.1, False, False, 5)]), ps.snapshot):
        with pytest.raises(TrainingError, match="diverged at step 1"):
            again()
    beside.close()
    elsewhere.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="the kernel names a socket's congestion control on Linux only")
@pytest.mark.parametrize("choice", ["auto", "system"])
def test_links_use_the_congestion_control_that_cluster_tcp_congestion_names(choice):
    """cluster.tcp_congestion: auto gives both ends of every link Reno; system leaves the
    kernel's default (this machine's /proc/sys/net/ipv4/tcp_congestion_control)."""
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        default = f.read().strip()
    want = {"auto": "reno", "system": default}[choice]
    server, address = link.listen("127.0.0.1")
    secret = b"s" * 32
    accepted = []
    far = threading.Thread(target=lambda: accepted.extend(link.accept(server, 2, secret, 30, link.CONGESTION[choice])))
    far.start()
    ours = [link.connect(address, rank, secret, 30, link.CONGESTION[choice]) for rank in range(2)]
    far.join(timeout=60)
    assert not far.is_alive() and len(accepted) == 2
    assert [link.congestion(s) for s in ours + accepted] == [want] * 4
    link.close(ours + accepted)
