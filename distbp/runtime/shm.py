"""Shared-memory arrays for the direct engine's links within one node: a parameter actor's
weights and a worker's gradient live in a file under /dev/shm that both processes map, so a
step moves no array bytes through the socket, only its header and the sums. The file is
unlinked as soon as every process has mapped it (the mappings outlive the name), so nothing
is left behind however the processes end."""

import mmap
import os
import secrets

import numpy as np

FOLDER = "/dev/shm"


def available():
    return os.path.isdir(FOLDER) and os.access(FOLDER, os.W_OK)


def _map(path, size, dtype, flags, access):
    nbytes = max(1, size * np.dtype(dtype).itemsize)
    fd = os.open(path, flags, 0o600)
    try:
        if flags & os.O_CREAT:
            os.ftruncate(fd, nbytes)
        return np.frombuffer(mmap.mmap(fd, nbytes, access=access), dtype, size)
    finally:
        os.close(fd)


def create(size, dtype):
    """(a writable array of `size` zeros in a new segment, the segment's path)."""
    path = os.path.join(FOLDER, f"distbp-{os.getpid()}-{secrets.token_hex(8)}")
    return _map(path, size, dtype, os.O_CREAT | os.O_EXCL | os.O_RDWR, mmap.ACCESS_WRITE), path


def attach(path, size, dtype):
    """A read-only array over the segment at `path`."""
    return _map(path, size, dtype, os.O_RDONLY, mmap.ACCESS_READ)


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
