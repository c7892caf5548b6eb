"""Zero-copy payloads: large buffers travel through shared memory, arrive without a second copy,
and never leak a segment, an fd or a mapping, whatever either side does."""

from __future__ import annotations

import array
import asyncio
import gc
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import forkio
from forkio import SerializationError, _shm
from forkio._aio import AsyncEndpoint
from forkio._channel import Channel
from forkio._codec import HEADER, PickleCodec
from helpers import channel_pair, feed_in_chunks, open_fds

MB = 1024 * 1024


def _memfd_ranges() -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "/memfd:forkio" in line or "/forkio-" in line:
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _dev_shm() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith("forkio-")]


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """Two connected channels in this process; after the test, nothing of theirs may remain."""
    gc.collect()
    segments_before = _shm.mapped_segments()
    with channel_pair() as channels:  # checks that no fd leaked
        yield channels
    assert _shm.mapped_segments() == segments_before, "a shared segment is still mapped"


def _transfer(sender: Channel, receiver: Channel, message: Any) -> Any:
    """Send from another thread (a large frame need not fit the socket buffer) and receive here."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sender.send(message)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        return receiver.recv(timeout=20)
    finally:
        thread.join(20)
        if errors:
            raise errors[0]


def test_numpy_array_arrives_in_shared_memory_without_a_copy(pair: tuple[Channel, Channel]) -> None:
    """The received array's data lies inside a mapped forkio segment, writable, equal to the original."""
    left, right = pair
    sent = np.arange(2 * MB // 8, dtype=np.float64)
    got = _transfer(left, right, {"array": sent, "tag": 1})
    arr = got["array"]
    assert got["tag"] == 1 and arr.dtype == sent.dtype and np.array_equal(arr, sent)
    address = arr.__array_interface__["data"][0]
    assert any(lo <= address < hi for lo, hi in _memfd_ranges())
    assert arr.flags.writeable
    arr[0] = 42.0  # the receiver owns it now
    del arr, got


def test_large_bytes_likes_keep_their_types(pair: tuple[Channel, Channel]) -> None:
    """bytes, bytearray and memoryview (format and shape kept) go out of band and come back as such."""
    left, right = pair
    blob = os.urandom(MB)
    doubles = memoryview(array.array("d", range(2**16))).cast("B").cast("d", (256, 256))
    message = {"b": blob, "ba": bytearray(blob), "mv": doubles, "small": b"x" * 10}
    got = _transfer(left, right, message)
    assert type(got["b"]) is bytes and got["b"] == blob
    assert type(got["ba"]) is bytearray and got["ba"] == blob
    mv = got["mv"]
    assert type(mv) is memoryview and mv.format == "d" and mv.shape == (256, 256)
    assert mv.tolist() == doubles.tolist()
    assert got["small"] == b"x" * 10
    assert _transfer(left, right, blob) == blob  # a bare bytes message too
    del got, mv


def test_small_messages_stay_inline(pair: tuple[Channel, Channel]) -> None:
    """Below the threshold nothing goes to shared memory: no fd, no out-of-band table."""
    left, right = pair
    for message in ({"seq": 1, "args": [1, 2, 3]}, np.ones(16), b"y" * 1000):
        data, fds = left.encode(message)
        assert fds == []
        assert np.array_equal(_transfer(left, right, message), message)
    data, fds = left.encode({"seq": 1})
    assert HEADER.unpack_from(data)[3] == 0  # the plain frame of the hot path
    assert left._outbox is None


def test_threshold_is_tunable_and_none_disables(pair: tuple[Channel, Channel]) -> None:
    left, _ = pair
    left.zero_copy_threshold = None
    assert left.encode(np.ones(MB))[1] == []
    left.zero_copy_threshold = 1024
    _, fds = left.encode(np.ones(1024))
    assert len(fds) == 1
    left._disown(fds)


def test_segments_are_reused_once_the_receiver_is_done(pair: tuple[Channel, Channel]) -> None:
    """A segment is written again only after the receiver dropped what it built on it."""
    left, right = pair
    first = _transfer(left, right, np.full(MB // 8, 1.0))
    second = _transfer(left, right, np.full(MB // 8, 2.0))  # first still held: a second segment
    assert first[0] == 1.0 and second[0] == 2.0
    assert left._outbox is not None and len(left._outbox._segments) == 2
    del first, second
    gc.collect()
    for value in range(3, 8):
        assert _transfer(left, right, np.full(MB // 8, float(value)))[-1] == value
    assert len(left._outbox._segments) == 2


def test_many_out_of_band_buffers_in_one_message(pair: tuple[Channel, Channel]) -> None:
    """More buffers than the header's count byte can say, small and large mixed."""
    left, right = pair
    message = [np.full(3, i) for i in range(300)] + [np.full(MB // 8, 7.0)]
    got = _transfer(left, right, message)
    assert all(np.array_equal(a, b) for a, b in zip(got, message, strict=True))


def test_sender_failure_mid_message_leaves_nothing(pair: tuple[Channel, Channel]) -> None:
    """An object that fails to pickle after a large buffer was taken: SerializationError, no segment."""
    left, right = pair

    class Boom:
        def __reduce__(self) -> Any:
            raise RuntimeError("no")

    with pytest.raises(SerializationError):
        left.send([np.ones(MB), Boom()])
    assert not left._owned and left._outbox is None
    assert _transfer(left, right, "still fine") == "still fine"


def test_receiver_failure_mid_message_closes_the_segment(pair: tuple[Channel, Channel]) -> None:
    """A large message that fails to unpickle on the receiver: an error for that message only."""
    left, right = pair
    left.send({"a": np.ones(MB // 8), "b": _FailsOnLoad()})  # pickles fine, cannot be rebuilt
    with pytest.raises(SerializationError):
        right.recv(timeout=10)
    assert np.array_equal(_transfer(left, right, np.ones(MB // 8)), np.ones(MB // 8))


def _explode() -> None:
    raise ValueError("cannot rebuild")


class _FailsOnLoad:
    def __reduce__(self) -> Any:
        return (_explode, ())


def test_undelivered_messages_release_their_segments(pair: tuple[Channel, Channel]) -> None:
    """Messages still queued when the receiver closes are dropped with their segments."""
    left, right = pair
    for _ in range(3):
        left.send(np.ones(MB // 8))  # small frames: they fit the socket buffer
    right.read_available(block=True)
    assert len(right._inbox) >= 1


def test_posix_shm_fallback_leaves_nothing_in_dev_shm(pair: tuple[Channel, Channel],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without memfd (macOS) segments are POSIX shm objects, unlinked at once."""
    monkeypatch.setattr(_shm, "_USE_MEMFD", False)
    left, right = pair
    before = _dev_shm()
    got = _transfer(left, right, np.arange(MB // 8))
    assert np.array_equal(got, np.arange(MB // 8))
    assert _dev_shm() == before
    del got


def test_segments_used_once_where_they_cannot_be_shared_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without /proc to reopen a segment from (macOS), each message gets its own, freed after use."""
    monkeypatch.setattr(_shm, "REUSABLE", False)
    gc.collect()
    fds_before, segments_before = open_fds(), _shm.mapped_segments()
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    try:
        for value in (1.0, 2.0):
            got = _transfer(left, right, np.full(MB // 8, value))
            assert got[0] == value and left._outbox is not None and left._outbox._segments == []
            del got
    finally:
        left.close()
        right.close()
    gc.collect()
    assert open_fds() == fds_before and _shm.mapped_segments() == segments_before


def test_encode_then_send_bytes_hands_over_the_segment(pair: tuple[Channel, Channel]) -> None:
    """Code that frames messages itself (a pool's manager) passes encode()'s fds to send_bytes."""
    left, right = pair
    data, fds = left.encode({"a": np.full(MB // 8, 5.0)})
    assert len(fds) == 1
    left.send_bytes(data, fds)
    assert not left._owned
    got = right.recv(timeout=10)
    assert got["a"][0] == 5.0
    del got


def test_async_send_carries_the_segment(pair: tuple[Channel, Channel]) -> None:
    """The asyncio face (encode + try_send) sends the segment fd with the frame."""
    left, right = pair

    async def main() -> Any:
        endpoint = AsyncEndpoint(left)
        await endpoint.send({"a": np.full(MB // 8, 3.0)})
        return await AsyncEndpoint(right).recv(timeout=10)

    got = asyncio.run(main())
    assert got["a"][0] == 3.0 and not left._owned
    del got


numpy_messages = st.lists(
    st.one_of(st.integers(), st.text(max_size=5),
              st.integers(0, 5000).map(lambda n: np.arange(n, dtype=np.int16)),
              st.binary(max_size=3000).map(bytearray)),
    max_size=5)


@settings(max_examples=40, deadline=None)
@given(st.lists(numpy_messages, min_size=1, max_size=4), st.lists(st.integers(0, 50_000), max_size=8))
def test_frames_with_inline_buffers_survive_any_chunking(messages: list[Any], cuts: list[int]) -> None:
    """Out-of-band buffers kept inside the frame decode exactly however the stream is cut."""
    codec = PickleCodec()
    stream = b"".join(codec.encode(m) for m in messages)
    out = feed_in_chunks(codec.decoder(), stream, cuts)
    assert len(out) == len(messages)
    for got, sent in zip(out, messages, strict=True):
        assert len(got) == len(sent)
        for a, b in zip(got, sent, strict=True):
            assert type(a) is type(b)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


# ------------------------------------------------------------------ between processes
def test_parent_to_child_and_back(children: Path) -> None:
    with forkio.fork(children / "bigdata.py", ["echo"]) as child:
        arr = np.random.rand(4 * MB // 8)
        child.send(arr)
        back = child.recv(timeout=30)
        assert np.array_equal(back, arr)
        del back


def test_child_keeps_nothing_after_messages(children: Path) -> None:
    """The child's fds and mappings stay flat however many large messages it gets."""
    with forkio.fork(children / "bigdata.py", ["sum"]) as child:
        child.send("census")
        baseline = child.recv(timeout=30)
        for _ in range(6):
            child.send(np.full(2 * MB // 8, 1.0))
            assert child.recv(timeout=30) == 2 * MB // 8
        child.send("census")
        after = child.recv(timeout=30)
        # The child keeps at most the mappings of the two segments the parent alternates between.
        assert after["fds"] - baseline["fds"] <= 2 and after["segments"] - baseline["segments"] <= 2


def test_segment_outlives_a_sender_that_exits_at_once(children: Path) -> None:
    """A message sent right before os._exit arrives whole: the segment lives on in the socket."""
    child = forkio.fork(children / "bigdata.py", ["send", "8"])
    arr = child.recv(timeout=30)
    assert arr.shape == (MB,) and arr[0] == 2.0 and arr[-1] == 2.0
    assert child.wait(timeout=10) == 0
    del arr
    child.close()


def test_receiver_killed_mid_transfer_leaks_nothing_here(children: Path) -> None:
    """The child dies while large messages are in flight: the parent keeps no fd or mapping."""
    gc.collect()
    fds_before, segments_before = open_fds(), _shm.mapped_segments()
    child = forkio.fork(children / "bigdata.py", ["sum"])
    child.send("census")
    child.recv(timeout=30)
    sender_error: list[BaseException] = []

    def flood() -> None:
        try:
            for _ in range(50):
                child.send(np.ones(2 * MB // 8))
        except forkio.ChannelClosed as exc:
            sender_error.append(exc)

    thread = threading.Thread(target=flood)
    thread.start()
    child.kill(signal.SIGKILL)
    thread.join(30)
    child.close()
    gc.collect()
    assert open_fds() == fds_before
    assert _shm.mapped_segments() == segments_before


def test_sender_killed_mid_stream_leaks_nothing_here(children: Path) -> None:
    """The child is SIGKILLed while it sends large arrays: whatever arrived or was cut, nothing stays."""
    gc.collect()
    fds_before, segments_before = open_fds(), _shm.mapped_segments()
    child = forkio.fork(children / "bigdata.py", ["flood"])
    for _ in range(3):
        assert child.recv(timeout=30)[0] == 3.0
    child.kill(signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    received = []
    try:
        while True:
            received.append(child.recv(timeout=10))
    except forkio.ChannelClosed:
        pass
    assert all(a[0] == 3.0 for a in received)
    del received
    child.close()
    gc.collect()
    assert open_fds() == fds_before
    assert _shm.mapped_segments() == segments_before
