"""The channel keeps its promises against hostile peers and resource limits (issue 8, the I/O items):
fds belong to their frame, frames over max_frame_size are refused at send, shared memory is
bounded, released, unnamed and sealed, and "exit" comes after every message."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import forkio
from forkio import ProtocolError, SerializationError, _shm
from forkio._aio import AsyncEndpoint
from forkio._channel import Channel
from forkio._codec import HEADER
from helpers import channel_pair, open_fds

MB = 1024 * 1024


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """Two connected pickle channels in this process; no fd of theirs may outlive the test."""
    with channel_pair() as channels:
        yield channels


def _frame(obj: object) -> bytes:
    import pickle

    payload = pickle.dumps(obj, 5)
    return HEADER.pack(0xF5, 0, 0, 0, len(payload)) + payload


# ------------------------------------------------------------------ item 2: deep JSON
def test_deep_json_line_is_an_error_and_the_next_message_arrives() -> None:
    """A line nested 100000 deep raises ProtocolError from recv(); "after", from the same read, arrives."""
    a, b = socket.socketpair()
    channel = Channel(b, serialization="json")
    try:
        a.sendall(b'"before"\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n"after"\n')
        assert channel.recv(timeout=5) == "before"
        with pytest.raises(ProtocolError):
            channel.recv(timeout=5)
        assert channel.recv(timeout=5) == "after"
        assert channel.connected
    finally:
        a.close()
        channel.close()


# ------------------------------------------------------------ item 4: exit after messages
@pytest.mark.timeout(60)
def test_exit_event_after_every_message_of_a_burst(children: Path) -> None:
    """A child send_many()s 3000 messages and exits; with a slow listener, "exit" still comes last."""
    child = forkio.fork(children / "burst_exit.py", ["3000"])
    got: list[object] = []
    at_exit: list[int] = []
    exited = threading.Event()

    def on_message(message: object) -> None:
        threading.Event().wait(0.001)  # a slow listener: the reader falls far behind the exit
        got.append(message)

    child.on("message", on_message)
    child.on("exit", lambda code, sig: (at_exit.append(len(got)), exited.set()))
    try:
        assert exited.wait(50)
        assert at_exit == [3000] and got == list(range(3000))
    finally:
        child.close()


@pytest.mark.timeout(60)
def test_exit_event_waits_for_delivery_when_a_grandchild_holds_the_channel(children: Path) -> None:
    """No EOF comes while a grandchild keeps the child's end open: "exit" still fires, once every
    message was delivered, without waiting for the grandchild."""
    import psutil

    child = forkio.fork(children / "burst_exit.py", ["500", "hold"])
    grandchild = child.recv(timeout=10)
    got: list[object] = []
    at_exit: list[tuple[int, bool]] = []
    exited = threading.Event()

    def on_message(message: object) -> None:
        threading.Event().wait(0.002)
        got.append(message)

    child.on("message", on_message)
    child.on("exit", lambda code, sig: (at_exit.append((len(got), psutil.pid_exists(grandchild))),
                                        exited.set()))
    try:
        assert exited.wait(15)
        assert at_exit == [(500, True)]
    finally:
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.close()


# ------------------------------------------------------------------- item 6: stray fds
def test_stray_fds_are_closed_at_once_and_handles_get_their_own(pair: tuple[Channel, Channel]) -> None:
    """fds on frames that declare none never reach a later handle message, nor pile up."""
    left, right = pair
    raw = socket.socket(fileno=os.dup(left.fileno()))
    stray_r, stray_w = os.pipe()
    right_r, right_w = os.pipe()
    try:
        socket.send_fds(raw, [_frame("stray")], [stray_r])
        os.write(right_w, b"RIGHT")
        left.send("handle", right_r)
        assert right.recv(timeout=5, with_handle=True) == ("stray", None)
        message, handle = right.recv(timeout=5, with_handle=True)
        assert message == "handle" and os.read(handle, 10) == b"RIGHT"
        os.close(handle)
        base = open_fds()
        with open(os.devnull) as null:
            for i in range(300):
                socket.send_fds(raw, [_frame(i)], [null.fileno()])
                assert right.recv(timeout=5) == i
                assert open_fds() <= base + 1
    finally:
        raw.close()
        for fd in (stray_r, stray_w, right_r, right_w):
            os.close(fd)


# --------------------------------------------------------- item 18: max_frame_size at send
@pytest.mark.parametrize("serialization", ["pickle", "json"])
def test_oversized_message_is_refused_in_send_and_the_channel_stays_usable(serialization: str) -> None:
    """send() of a message bigger than max_frame_size raises SerializationError and writes nothing."""
    a, b = socket.socketpair()
    left = Channel(a, serialization=serialization, max_frame_size=MB)
    right = Channel(b, serialization=serialization, max_frame_size=MB)
    try:
        with pytest.raises(SerializationError, match="max_frame_size") as info:
            left.send(["x" * (2 * MB)])
        assert not isinstance(info.value.__cause__, MemoryError)
        with pytest.raises(SerializationError, match="max_frame_size"):
            left.send_many(["small", "y" * (2 * MB)])
        left.send("ping")
        assert right.recv(timeout=5) == "ping"
        assert left.connected and right.connected
    finally:
        left.close()
        right.close()


# --------------------------------------------------- item 19: backpressure on shared memory
@pytest.mark.timeout(30)
def test_zero_copy_sends_wait_while_the_peer_has_not_read(pair: tuple[Channel, Channel]) -> None:
    """Sends of big buffers stop once shm_in_flight_limit bytes are unread, and go on as the peer reads."""
    left, right = pair
    left.shm_in_flight_limit = 8 * MB
    blob = b"z" * (3 * MB)
    for _ in range(2):
        left.send(blob)
    with pytest.raises(BlockingIOError):
        left.encode(blob, wait=False)
    sent = threading.Event()
    sender = threading.Thread(target=lambda: (left.send(blob), sent.set()), daemon=True)
    sender.start()
    assert not sent.wait(0.5)  # blocked: the peer has 6 MiB unread
    for _ in range(3):
        assert right.recv(timeout=10) == blob
    assert sent.wait(10)
    sender.join(5)


@pytest.mark.timeout(30)
def test_a_message_bigger_than_the_limit_goes_alone(pair: tuple[Channel, Channel]) -> None:
    """A single message over the limit is not refused: it waits only for earlier ones to be read."""
    left, right = pair
    left.shm_in_flight_limit = MB
    left.send(b"a" * (2 * MB))
    with pytest.raises(BlockingIOError):
        left.encode(b"b" * (2 * MB), wait=False)
    assert right.recv(timeout=5) == b"a" * (2 * MB)
    left.send(b"b" * (2 * MB))
    assert right.recv(timeout=5) == b"b" * (2 * MB)


# ----------------------------------------------------- item 20: cancelled asyncio sends
@pytest.mark.timeout(30)
def test_cancelled_async_send_releases_its_segment(pair: tuple[Channel, Channel]) -> None:
    """An asyncio send cancelled before its frame started gives its shared segment back at once."""
    left, _right = pair
    endpoint = AsyncEndpoint(left)

    async def main() -> tuple[int, int]:
        while left.try_send(b"f" * 65536):  # fill the socket: later frames queue
            pass
        base = open_fds()
        blob = b"q" * (4 * MB)
        for _ in range(20):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(endpoint.send(blob), 0.01)
        return open_fds() - base, len(left._owned)

    grown, owned = asyncio.run(main())
    assert owned == 0 and grown <= 2
    assert left._unread == 0


# ------------------------------------------------------ item 21: no name without memfd
def test_without_memfd_segments_never_have_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback is an O_TMPFILE in /dev/shm: no name exists at any moment, and transfers work."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/dev/shm"):
        pytest.skip("needs O_TMPFILE and /dev/shm")
    monkeypatch.setattr(_shm, "_USE_MEMFD", False)
    calls: list[object] = []
    import _posixshmem  # type: ignore[import-not-found]

    monkeypatch.setattr(_posixshmem, "shm_open", lambda *args: calls.append(args))
    before = set(os.listdir("/dev/shm"))
    fd = _shm.create_segment(MB)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
        assert set(os.listdir("/dev/shm")) == before and not calls
    finally:
        os.close(fd)
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    try:
        left.send(b"t" * (2 * MB))
        assert right.recv(timeout=5) == b"t" * (2 * MB)
    finally:
        left.close()
        right.close()


# ------------------------------------------------ item 24: a segment shrunk behind our back
def test_our_segments_are_sealed_against_shrinking() -> None:
    """A receiver cannot truncate a segment we send (so it cannot SIGBUS us, nor we it)."""
    fd = _shm.create_segment(MB)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == MB
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_unsealed_segment_shrunk_after_receipt_cannot_crash_the_receiver() -> None:
    """A hostile sender's memfd that cannot be sealed is copied, not mapped: shrinking it after
    the message arrived does not raise SIGBUS in the receiver (run in a victim process)."""
    script = textwrap.dedent("""
        import os, socket
        from forkio._channel import Channel
        from forkio._codec import PickleCodec
        a, b = socket.socketpair()
        receiver = Channel(b)
        data, shared = PickleCodec().encode_shared(memoryview(b"\\x01" * (8 << 20)), threshold=1)
        seg = os.memfd_create("hostile")  # no MFD_ALLOW_SEALING: it cannot be sealed
        os.ftruncate(seg, 8 << 20)
        os.pwrite(seg, bytes(shared[0]), 0)
        socket.send_fds(a, [data], [seg])
        blob = receiver.recv(timeout=5)
        os.ftruncate(seg, 0)
        assert isinstance(blob, memoryview) and bytes(blob).count(1) == 8 << 20
        print("survived")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "survived"


def test_posix_shm_fallback_unlinks_with_signals_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where neither memfd nor O_TMPFILE exists, the named window is closed to every catchable
    signal (a SIGTERM arriving there waits until the name is gone), and no name is left."""
    import _posixshmem  # type: ignore[import-not-found]

    masks: list[set[int]] = []
    real_open = _posixshmem.shm_open

    def spying_open(*args: object) -> int:
        masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        return int(real_open(*args))

    monkeypatch.setattr(_posixshmem, "shm_open", spying_open)
    before = set(os.listdir("/dev/shm"))
    fd = _shm._posix_shm()
    try:
        assert masks and signal.SIGTERM in masks[0] and signal.SIGINT in masks[0]
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert set(os.listdir("/dev/shm")) == before
    finally:
        os.close(fd)


def test_receiver_seals_a_sealable_segment_before_mapping_it() -> None:
    """A memfd that allows sealing but came unsealed is sealed by the receiver, then mapped: the
    sender can no longer shrink it under the receiver's mapping."""
    import fcntl

    fd = os.memfd_create("peer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MB)
    os.pwrite(fd, b"\x07" * MB, 0)
    keep = os.dup(fd)
    try:
        view = _shm.Inbox().map(fd, False)  # takes fd
        assert fcntl.fcntl(keep, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(keep, 0)
        assert bytes(view).count(7) == MB
        view.release()
    finally:
        os.close(keep)
