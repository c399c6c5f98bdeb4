"""Shared-memory arrays for the direct engine's links within one node: a parameter actor's
weights and a worker's gradient live in an anonymous memory file (memfd) that both processes
map, so a step moves no array bytes through the socket, only its header and the sums.

The segment never has a name in /dev/shm or anywhere else: the other process opens it as
/proc/<creator's pid>/fd/<fd> while the creator holds the descriptor, and the memory is freed
by the kernel once the last process that maps it or holds it ends. So nothing is left behind
however the processes end, a set-up that fails part-way included."""

import mmap
import os

import numpy as np


def available():
    """Anonymous memory files, and /proc to open another process's: Linux."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class Segment:
    """A writable array of `size` zeros in a new anonymous segment. `path` opens it from
    another process of the same user, until `close` (the mapping stays valid after it)."""

    def __init__(self, size, dtype):
        nbytes = max(1, size * np.dtype(dtype).itemsize)
        self.fd = os.memfd_create("distbp", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, nbytes)
            self.array = np.frombuffer(mmap.mmap(self.fd, nbytes, access=mmap.ACCESS_WRITE), dtype, size)
        except BaseException:  # no memory for it: the descriptor goes too
            os.close(self.fd)
            raise
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self):
        """Drop the descriptor: no other process can open the segment from now on."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def attach(path, size, dtype):
    """A read-only array over another process's segment at `path`."""
    nbytes = max(1, size * np.dtype(dtype).itemsize)
    fd = os.open(path, os.O_RDONLY)
    try:
        return np.frombuffer(mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ), dtype, size)
    finally:
        os.close(fd)
