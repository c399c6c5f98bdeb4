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


def test_a_held_link_sends_only_once_its_first_part_came_in():
    """What a parameter actor does with a worker that asks for the weights (READY): nothing
    goes out on that link before the ask, while the other link sends at once."""
    (held, held_far), (free, free_far) = socket.socketpair(), socket.socketpair()
    asked, answer = bytearray(1), bytearray(8)
    result = []
    run = threading.Thread(target=lambda: result.append(link.exchange(
        sends=[(held, [b"weights!"]), (free, [b"at once!"])], recvs=[(held, [asked, answer])], held=[held])))
    run.start()
    assert free_far.recv(8) == b"at once!"
    held_far.settimeout(0.2)
    with pytest.raises(TimeoutError):  # nothing before the ask (a wrong implementation sends at once)
        held_far.recv(8)
    held_far.sendall(link.READY)
    held_far.settimeout(10)
    assert held_far.recv(8) == b"weights!"
    held_far.sendall(b"gradient")
    run.join(timeout=10)
    assert not run.is_alive() and result == [None]
    assert bytes(asked) == link.READY and bytes(answer) == b"gradient"
    for c in (held, held_far, free, free_far):
        c.close()


def test_a_held_link_must_receive_first():
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="a held link must receive first"):
        link.exchange(sends=[(a, [b"x"])], held=[a])
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


@pytest.mark.parametrize("together", [True, False], ids=["all-links-at-once", "one-worker-at-a-time"])
def test_a_parameter_actor_sends_its_slice_to_a_worker_elsewhere_only_once_it_asks(together):
    """A parameter actor with worker 0 beside it (its gradient in shared memory) and worker 1
    on another node that asks with READY (per_worker): worker 0 gets its order at once, worker
    1 nothing before it asks, then the order and the weights; the step applies the rank-order
    sum of both gradients, in both of the actor's ways of moving bytes."""
    from distbp.runtime.messages import Order, Sums, stats_vector
    from distbp.runtime.server import ParameterServer

    w0 = np.arange(4, dtype=np.float64)
    ps = ParameterServer(w0, {"name": "sgd"}, layer_bounds=[(0, 0, 4)])
    pairs = [socket.socketpair() for _ in range(2)]
    beside, elsewhere = pairs[0][1], pairs[1][1]
    g0, g1 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 0.5, 0.5, 0.5])
    ps.links, ps.peer_grads, ps.ready = [a for a, _ in pairs], [g0, None], [False, True]
    ps.recv_buf = np.empty_like(ps.w)
    ps.recv_bufs = [None, np.empty_like(ps.w)] if together else []
    sums = [link.pack_sums(Sums(stats_vector(1.0, n, 0, 0.0, np.zeros(1)), None)) for n in (2, 3)]
    infos = []
    run = threading.Thread(target=lambda: infos.extend(ps.run([Order(1, 0.1, False, False, 5)])))
    run.start()
    beside.settimeout(10)
    assert link.unpack_order(beside.recv(link.ORDER.size)).step == 1  # at once, no ask
    elsewhere.settimeout(0.3)
    with pytest.raises(TimeoutError):  # a wrong implementation sends the order and weights at once
        elsewhere.recv(1)
    elsewhere.settimeout(10)
    elsewhere.sendall(link.READY)
    head = link.recv_exact(elsewhere, link.ORDER.size)
    weights = np.frombuffer(link.recv_exact(elsewhere, w0.nbytes), np.float64)
    assert link.unpack_order(head).step == 1 and np.array_equal(weights, w0)
    beside.sendall(sums[0])
    elsewhere.sendall(g1.tobytes() + sums[1])
    assert link.recv_exact(beside, link.ORDER.size) == link.END == link.recv_exact(elsewhere, link.ORDER.size)
    run.join(timeout=10)
    assert not run.is_alive() and [i.step for i in infos] == [1]
    np.testing.assert_array_equal(ps.w, w0 - 0.1 * ((g0 + g1) / 5))
    for a, b in pairs:
        a.close()
        b.close()
