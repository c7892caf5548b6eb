"""Shared-memory segments that carry large out-of-band buffers beside the channel's frames.

A segment is an anonymous memfd (Linux) or a POSIX shm object unlinked at once (elsewhere):
it has no name anyone can find, so it disappears when the last fd and mapping are gone,
whatever happens to either process. Nothing to clean up, nothing to leak.

Fresh shared memory is slow to fill (the kernel allocates and zeroes every page: ~2 GB/s
here, against ~10 GB/s for a copy into pages already there), so each sending side keeps its
segments and reuses them. The receiver must be done with one before it is written again:

- the sender sends a *new open file description* of the segment (``/proc/self/fd/N``
  reopened) with a shared ``flock`` on it, and closes its own copy once it is in flight;
- the receiver keeps that fd exactly as long as any object built on the segment is alive
  (a ctypes array over the mapping is the owner of every view; a finalizer closes the fd);
- so the lock is held while the message is in the socket or in use by the receiver, and
  goes away by itself if the receiver exits, crashes or drops the message. A segment is free
  when ``flock(LOCK_EX | LOCK_NB)`` on the sender's own description succeeds.

The receiver keeps the mapping of a reusable segment (by inode) for the next message that uses
it, which saves re-faulting its pages. Both caches are bounded (``CACHE_BYTES`` each) and
closed with the channel. Where there is no ``/proc`` to reopen from, each message gets a
fresh segment, used once.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_THRESHOLD = 256 * 1024
CACHE_BYTES = 512 * 1024 * 1024
CACHE_MAPPINGS = 8
_GRAIN = 1024 * 1024

_USE_MEMFD = hasattr(os, "memfd_create")
REUSABLE = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")


def create_segment(size: int) -> int:
    """A new anonymous shared-memory fd of ``size`` bytes (close-on-exec)."""
    if _USE_MEMFD:
        fd = os.memfd_create("forkio", os.MFD_CLOEXEC)
    else:
        fd = _posix_shm()
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _posix_shm() -> int:
    import _posixshmem  # type: ignore[import-not-found]
    import secrets

    for _ in range(100):
        name = f"/forkio-{os.getpid()}-{secrets.token_hex(6)}"  # macOS allows 31 characters
        try:
            fd: int = _posixshmem.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        _posixshmem.shm_unlink(name)  # anonymous from here on: nothing left to leak
        return fd
    raise FileExistsError("could not create a POSIX shared-memory object")


class _Segment:
    __slots__ = ("fd", "last_used", "mm", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = create_segment(size)
        self.mm: mmap.mmap | None = None  # mapped on first reuse: a fresh one is filled by pwritev
        self.last_used = time.monotonic()

    def fill(self, buffers: Sequence[memoryview], offsets: Sequence[int]) -> None:
        if self.mm is None:
            # Pages are allocated as they are written; pwritev does that about twice as fast
            # as faulting them in through a mapping.
            for buf, offset in zip(buffers, offsets, strict=True):
                done = 0
                while done < buf.nbytes:
                    done += os.pwritev(self.fd, [buf[done:]], offset + done)
            return
        mm = self.mm
        for buf, offset in zip(buffers, offsets, strict=True):
            mm[offset:offset + buf.nbytes] = buf

    def free(self) -> bool:
        """True when no receiver holds the segment (nobody else has a lock on it)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def lend(self) -> int:
        """A new description of the segment, locked for the receiver; the caller sends then closes it."""
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self, *, discard: bool = False) -> None:
        """Close this side; with ``discard`` also give the pages back now (only when free: a
        receiver may keep an idle mapping of it, which it never reads again)."""
        try:
            if discard:
                os.ftruncate(self.fd, 0)
            if self.mm is not None:
                self.mm.close()
        finally:
            os.close(self.fd)


class Outbox:
    """The sending side's segments. Thread-safe; ``pack`` returns an fd the caller must close."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache_bytes = cache_bytes
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._closed = False

    def pack(self, buffers: Sequence[memoryview], offsets: Sequence[int], size: int) -> int:
        """Copy ``buffers`` into a segment at ``offsets``; return the fd to send with the frame."""
        size = -(-size // _GRAIN) * _GRAIN
        with self._lock:
            if self._closed:
                raise OSError("the channel is closed")
            seg, fd = self._take(size) if REUSABLE else (None, -1)
        if seg is None:  # not worth keeping (or no way to share it twice): used once
            seg = _Segment(size)
            try:
                seg.fill(buffers, offsets)
            except BaseException:
                seg.close()
                raise
            return seg.fd
        try:
            seg.fill(buffers, offsets)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _take(self, size: int) -> tuple[_Segment | None, int]:
        best = None
        for seg in self._segments:
            if size <= seg.size <= size + size // 4 + _GRAIN and (best is None or seg.size < best.size) and seg.free():
                best = seg
        if best is None:
            best = self._new(size)
            if best is None:
                return None, -1
        elif best.mm is None:
            best.mm = mmap.mmap(best.fd, best.size, flags=mmap.MAP_SHARED)
        best.last_used = time.monotonic()
        return best, best.lend()

    def _new(self, size: int) -> _Segment | None:
        if size > self.cache_bytes:
            return None
        used = sum(seg.size for seg in self._segments)
        if used + size > self.cache_bytes:
            for seg in sorted(self._segments, key=lambda s: s.last_used):
                if seg.free():
                    self._segments.remove(seg)
                    seg.close(discard=True)
                    used -= seg.size
                    if used + size <= self.cache_bytes:
                        break
            if used + size > self.cache_bytes:
                return None
        seg = _Segment(size)
        self._segments.append(seg)
        return seg

    @property
    def cached_bytes(self) -> int:
        return sum(seg.size for seg in self._segments)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            segments, self._segments = self._segments, []
        for seg in segments:
            seg.close(discard=seg.free())


class Inbox:
    """The receiving side: maps segments, keeping the mappings of reusable ones (by inode)."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache_bytes = cache_bytes
        self._mappings: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def map(self, fd: int, reusable: bool) -> memoryview:
        """A writable view of the whole segment behind ``fd`` (taking ownership of ``fd``).

        Every view cut from it keeps one lease object alive; when the last one goes, the fd is
        closed, which releases the sender's lock. A segment used once is not kept.
        """
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size <= 0:
                raise ValueError("empty shared segment")
            mm = None
            if reusable:
                key = (st.st_dev, st.st_ino)
                with self._lock:
                    mm = self._mappings.get(key)
                    if mm is not None and len(mm) == size:
                        self._mappings.move_to_end(key)
                    else:
                        mm = None
            if mm is None:
                if reusable:
                    # mmap keeps a dup of the fd it maps: map a fresh, unlocked description, so
                    # that the kept mapping does not hold the sender's lock forever.
                    plain = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                    try:
                        mm = mmap.mmap(plain, size, flags=mmap.MAP_SHARED)
                    finally:
                        os.close(plain)
                    self._keep(key, mm)
                else:
                    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            import ctypes

            lease = (ctypes.c_ubyte * size).from_buffer(mm)
        except BaseException:
            os.close(fd)
            raise
        if reusable:
            weakref.finalize(lease, _close_quietly, fd)
        else:
            os.close(fd)  # nobody waits for this one: the mapping alone keeps it alive
        return memoryview(lease).cast("B")

    def _keep(self, key: tuple[int, int], mm: mmap.mmap) -> None:
        with self._lock:
            self._mappings[key] = mm
            total = sum(len(m) for m in self._mappings.values())
            while len(self._mappings) > 1 and (total > self.cache_bytes or len(self._mappings) > CACHE_MAPPINGS):
                _, old = self._mappings.popitem(last=False)
                total -= len(old)  # views still using it keep it mapped until they go

    def close(self) -> None:
        with self._lock:
            self._mappings.clear()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def mapped_segments() -> int:
    """How many forkio segments this process has mapped now (Linux; for tests and diagnostics)."""
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/memfd:forkio" in line or "/forkio-" in line:
                count += 1
    return count
