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


def test_a_closed_peer_is_a_link_error():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(link.LinkError):
        link.exchange(recvs=[(a, [bytearray(8)])])
    a.close()
