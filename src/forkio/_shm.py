"""Shared-memory segments that carry large out-of-band buffers beside the channel's frames.

A segment is an anonymous memfd (Linux), an unnamed ``O_TMPFILE`` in ``/dev/shm`` (Linux
without memfd), or elsewhere a POSIX shm object unlinked right after it is made: it has no
name anyone can find, so it disappears when the last fd and mapping are gone, whatever happens
to either process. (Only the last kind has a name, for the few instructions between
``shm_open`` and ``shm_unlink``.)

A peer must not be able to crash us through a segment: reading a mapping past the end of a
file that was truncated meanwhile raises SIGBUS. So memfd segments are sealed against shrinking
and growing (``F_SEAL_SHRINK | F_SEAL_GROW``) as soon as they have their size, the receiver
maps a segment only once it has checked that seal (adding it itself where the sender did not),
and takes its size from ``fstat`` after that. A segment that cannot be sealed is never mapped by
the receiver: it is read into private memory (a short read is a clear error, not a signal),
and the sender writes it with ``pwritev`` only.

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
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", None)
_GET_SEALS = getattr(fcntl, "F_GET_SEALS", None)
#: Bytes of shared segments a channel may have sent that its peer has not read yet (backpressure).
IN_FLIGHT_BYTES = 256 * 1024 * 1024


def create_segment(size: int) -> int:
    """A new anonymous shared-memory fd of ``size`` bytes (close-on-exec), sealed where possible."""
    if _USE_MEMFD:
        fd = os.memfd_create("forkio", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
    else:
        fd = _unnamed_shm()
    try:
        os.ftruncate(fd, size)
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal(fd: int) -> bool:
    """Make the segment's size final (no shrinking, no growing); False where it cannot be sealed."""
    if _GET_SEALS is None or _ADD_SEALS is None:
        return False
    try:
        if fcntl.fcntl(fd, _GET_SEALS) & _SEALS == _SEALS:
            return True
        fcntl.fcntl(fd, _ADD_SEALS, _SEALS)
    except OSError:  # not a memfd, or one made without MFD_ALLOW_SEALING
        return False
    return True


def _unnamed_shm() -> int:
    """Shared memory without memfd: an ``O_TMPFILE`` in ``/dev/shm`` never has a name at all."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile and os.path.isdir("/dev/shm"):
        try:
            return os.open("/dev/shm", os.O_RDWR | tmpfile | os.O_CLOEXEC, 0o600)
        except OSError:  # a kernel or file system without O_TMPFILE
            pass
    return _posix_shm()


def _posix_shm() -> int:
    """A POSIX shm object, unlinked at once. Between ``shm_open`` and ``shm_unlink`` it has a
    name: catchable signals are blocked for those two calls, so only SIGKILL (or a crash) there
    can leave the name behind."""
    import _posixshmem  # type: ignore[import-not-found]
    import secrets
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        for _ in range(100):
            name = f"/forkio-{os.getpid()}-{secrets.token_hex(6)}"  # macOS allows 31 characters
            try:
                fd: int = _posixshmem.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            _posixshmem.shm_unlink(name)  # anonymous from here on: nothing left to leak
            return fd
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    raise FileExistsError("could not create a POSIX shared-memory object")


class _Segment:
    __slots__ = ("fd", "last_used", "mm", "sealed", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = create_segment(size)
        self.sealed = seal(self.fd)  # unsealed: the receiver could shrink it, so never map it
        self.mm: mmap.mmap | None = None  # mapped on first reuse: a fresh one is filled by pwritev
        self.last_used = time.monotonic()

    def fill(self, buffers: Sequence[memoryview], offsets: Sequence[int]) -> None:
        if self.mm is None:  # unsealed segments are never mapped: pwritev cannot raise SIGBUS
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
                self._discard()
            if self.mm is not None:
                self.mm.close()
        finally:
            os.close(self.fd)

    def _discard(self) -> None:
        if not self.sealed:
            os.ftruncate(self.fd, 0)
            return
        # A sealed segment cannot shrink: punch its pages out instead.
        mm = self.mm if self.mm is not None else mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED)
        try:
            mm.madvise(mmap.MADV_REMOVE)
        except (AttributeError, OSError):
            pass  # the pages go when the last mapping does
        finally:
            if mm is not self.mm:
                mm.close()


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
        elif best.mm is None and best.sealed:
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
        closed, which releases the sender's lock. A segment used once is not kept. A segment
        that cannot be sealed against shrinking is copied into private memory instead.
        """
        try:
            sealed = seal(fd)  # before fstat: from here on the size cannot change
            st = os.fstat(fd)
            size = st.st_size
            if size <= 0:
                raise ValueError("empty shared segment")
            if not sealed:
                copy = _read_whole(fd, size)
                os.close(fd)  # the copy needs nothing of the sender's: release its lock now
                return copy
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


def _read_whole(fd: int, size: int) -> memoryview:
    """A private copy of an unsealed segment (the caller closes ``fd``).

    A peer that shrinks it meanwhile makes the read short, which the decoder reports for the
    buffers past the end; a mapping would have raised SIGBUS instead.
    """
    copy = bytearray(size)
    view = memoryview(copy)
    done = 0
    while done < size:
        got = os.preadv(fd, [view[done:]], done)
        if got <= 0:
            break
        done += got
    return view[:done]


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
