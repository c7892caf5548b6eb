"""The compiled hot path (``_speedups.c``) and the pure-Python path behave the same.

Channels made while the ``path`` fixture says "pure" use no compiled code, so each test here runs
both ways in one process. The rest of the suite runs whichever path this install has (the compiled
one where a C compiler was found), and ``test_pure_python_path_passes_the_channel_suites`` reruns
the channel's own test files with ``FORKIO_PURE_PYTHON=1``: CI runs both paths.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkio import ChannelClosed, ProtocolError, SerializationError, WaitTimeout, _channel, _codec
from forkio._channel import Channel
from forkio._codec import HEADER, MAGIC, PickleCodec
from helpers import channel_pair

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


@pytest.fixture(params=["compiled", "pure"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which hot path the channels made in this test use."""
    if request.param == "compiled":
        if _codec.speedups is None:
            pytest.skip("the compiled hot path is not built here (or FORKIO_PURE_PYTHON is set)")
    else:
        monkeypatch.setattr(_channel, "speedups", None)
        monkeypatch.setattr(_codec, "_encode_plain", None)
    return str(request.param)


@pytest.fixture
def pair(path: str) -> Iterator[tuple[Channel, Channel]]:
    with channel_pair() as channels:
        assert (channels[0]._wire is None) == (path == "pure")
        yield channels


def test_compiled_path_is_built_where_a_compiler_is() -> None:
    """A build that failed quietly would leave only the fallback: CI (which has gcc) must not."""
    if os.environ.get("FORKIO_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("FORKIO_PURE_PYTHON asks for the pure-Python path")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not os.environ.get("CI") and not any(
            os.access(os.path.join(d, compiler), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip(f"no C compiler ({compiler}) here: the pure-Python path is the one installed")
    assert _codec.speedups is not None, "forkio._speedups did not build: run `pip install -e .` and read its output"


# ----------------------------------------------------------------------------- same bytes
_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
           | st.binary(max_size=40))
messages = st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=messages, threshold=st.sampled_from([None, 1, 64, 1 << 18]), max_frame=st.sampled_from([16, 1 << 20]))
def test_both_paths_encode_the_same_bytes(monkeypatch: pytest.MonkeyPatch, message: Any, threshold: int | None,
                                          max_frame: int) -> None:
    """Frame for frame, or the same error: the compiled encoder is the Python one, faster."""
    if _codec.speedups is None:
        pytest.skip("the compiled hot path is not built here")
    codec = PickleCodec(max_frame_size=max_frame)

    def encode() -> Any:
        try:
            data, shared = codec.encode_message(message, threshold, False)
        except SerializationError as exc:
            return type(exc), str(exc)
        return data, [bytes(view) for view in shared]

    compiled = encode()
    with monkeypatch.context() as patched:
        patched.setattr(_codec, "_encode_plain", None)
        assert encode() == compiled


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages, min_size=1, max_size=8))
def test_messages_arrive_whole_and_in_order(path: str, batch: list[Any]) -> None:
    with channel_pair() as (left, right):
        for message in batch:
            left.send(message)
        assert [right.recv(timeout=5) for _ in batch] == batch


# ------------------------------------------------------------------- what takes the Python way
def test_bytes_and_out_of_band_buffers_arrive(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    small, big = bytearray(b"s" * 100), b"b" * (2 * MB)
    left.send(small)
    left.send({"buffer": pickle.PickleBuffer(small), "big": big})
    left.send(memoryview(big))
    assert right.recv(timeout=5) == small
    got = right.recv(timeout=5)
    assert bytes(got["buffer"]) == small and got["big"] == big
    assert bytes(right.recv(timeout=5)) == big


def test_oversized_message_is_refused_and_the_channel_stays_usable(path: str) -> None:
    a, b = socket.socketpair()
    left, right = Channel(a, max_frame_size=MB), Channel(b, max_frame_size=MB)
    try:
        left.zero_copy_threshold = None  # nothing moves to shared memory: the frame itself is too big
        with pytest.raises(SerializationError, match="max_frame_size"):
            left.send(["x" * (2 * MB)])
        left.send("ping")
        assert right.recv(timeout=5) == "ping"
    finally:
        left.close()
        right.close()


class Interrupting:
    """Raises KeyboardInterrupt while being pickled (a Ctrl-C at a bad moment)."""

    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


def test_pickling_errors_read_the_same(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    with pytest.raises(SerializationError, match="cannot serialise function message"):
        left.send(lambda: 0)
    with pytest.raises(KeyboardInterrupt):  # not turned into a SerializationError, nothing sent
        left.send({"x": Interrupting()})
    left.send("after")
    assert right.recv(timeout=5) == "after"


# ---------------------------------------------------------------------------- reading
def test_frames_split_and_joined_and_mixed_with_fds(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    frame = left._pickle.encode({"n": 1})  # type: ignore[union-attr]
    left.sock.sendall(frame[:5])
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(right.recv(timeout=10)))
    reader.start()
    left.sock.sendall(frame[5:] + frame)  # the rest of one frame, then a whole one: one read
    reader.join(timeout=10)
    assert got == [{"n": 1}] and right.recv(timeout=5) == {"n": 1}
    r, w = os.pipe()
    try:
        left.send_fds("with fds", [r, w])
        left.send("plain")
        message, fds = right.recv_fds(timeout=5)
        assert message == "with fds" and len(fds) == 2
        for fd in fds:
            os.close(fd)
        assert right.recv(timeout=5) == "plain"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("serialization", ["pickle", "json"])
def test_a_read_of_many_messages_hands_them_all_out_in_order(path: str, serialization: str) -> None:
    """Whole messages, then an unusual one, then half of one, all in one read; then the rest."""
    a, b = socket.socketpair()
    left, right = Channel(a, serialization=serialization), Channel(b, serialization=serialization)
    try:
        encode = left.codec.encode
        odd = encode({"n": "odd"}, control=True) if serialization == "pickle" else b' {"n": "odd"}\n'
        tail = encode({"n": 99})
        left.sock.sendall(b"".join(encode({"n": i}) for i in range(50)) + odd + encode({"n": 50}) + tail[:3])
        got = [right.recv(timeout=5) for _ in range(51 if serialization == "pickle" else 52)]
        expected = [{"n": i} for i in range(50)] + ([] if serialization == "pickle" else [{"n": "odd"}]) + [{"n": 50}]
        assert got == expected
        left.sock.sendall(tail[3:])
        assert right.recv(timeout=5) == {"n": 99}
        assert right._decoder.idle and not right._inbox
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("serialization", ["pickle", "json"])
def test_a_reader_thread_fills_the_inbox(path: str, serialization: str) -> None:
    """fill() (a watcher thread's read, a Node peer's background reader) decodes a whole read
    into the inbox, and what it cannot decode goes the general way after it."""
    a, b = socket.socketpair()
    left, right = Channel(a, serialization=serialization), Channel(b, serialization=serialization)
    try:
        encode = left.codec.encode
        left.sock.sendall(encode([1]) + encode([2]) + encode([3])[:2])
        right.fill()
        assert len(right._inbox) == 2
        left.sock.sendall(encode([3])[2:])
        right.fill()
        assert [right.recv(timeout=5) for _ in range(3)] == [[1], [2], [3]]
    finally:
        left.close()
        right.close()


class InterruptsOnce:
    """Unpickling it raises KeyboardInterrupt the first time (a Ctrl-C while decoding)."""

    interrupted = False

    def __init__(self, n: int) -> None:
        self.n = n

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not InterruptsOnce.interrupted:
            InterruptsOnce.interrupted = True
            raise KeyboardInterrupt
        self.__dict__.update(state)


def test_ctrl_c_while_decoding_a_read_loses_no_message() -> None:
    """On the compiled path (recv without a timeout), messages decoded before and after the
    interruption all arrive. Compiled only: the pure-Python decoder drops the rest of that read
    (a known difference, in docs/design.md)."""
    if _codec.speedups is None:
        pytest.skip("the compiled hot path is not built here")
    with channel_pair() as (left, right):
        InterruptsOnce.interrupted = False
        encode = left.codec.encode
        left.sock.sendall(encode("before") + encode(InterruptsOnce(7)) + encode("after"))
        with pytest.raises(KeyboardInterrupt):
            right.recv()  # the data is there: no wait (and the test has a timeout)
        assert right.recv() == "before"
        assert right.recv().n == 7
        assert right.recv() == "after"


def test_recv_with_no_time_left_still_reads_what_has_arrived(pair: tuple[Channel, Channel]) -> None:
    """timeout=0 polls: a message already in the socket is returned, none is WaitTimeout."""
    left, right = pair
    with pytest.raises(WaitTimeout):
        right.recv(timeout=0)
    left.send("here")
    assert right.recv(timeout=0) == "here"
    with pytest.raises(WaitTimeout):
        right.recv(timeout=0)


def test_garbage_is_a_protocol_error(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    left.sock.sendall(HEADER.pack(0x00, 0, 0, 0, 3) + b"abc")
    with pytest.raises(ProtocolError):
        right.recv(timeout=5)


def test_a_bad_pickle_in_a_plain_frame_is_an_error_and_the_next_message_arrives(
        pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    left.sock.sendall(HEADER.pack(MAGIC, 0, 0, 0, 3) + b"\x80\x05X")
    with pytest.raises(SerializationError, match="cannot deserialise"):
        right.recv(timeout=5)
    left.send("next")
    assert right.recv(timeout=5) == "next"


def test_peer_gone_mid_frame_ends_the_channel(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    frame = left._pickle.encode("cut")  # type: ignore[union-attr]
    left.sock.sendall(frame[:-2])
    left.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelClosed):
        right.recv(timeout=5)
    assert not right.connected


def test_close_wakes_a_blocked_receiver(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    errors: list[BaseException] = []
    started = threading.Event()

    def receive() -> None:
        started.set()
        try:
            right.recv()
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=receive)
    reader.start()
    started.wait(5)
    left.close()
    reader.join(timeout=10)
    assert not reader.is_alive() and len(errors) == 1 and isinstance(errors[0], ChannelClosed)


def test_threads_share_a_channel(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    senders = [threading.Thread(target=lambda t=t: [left.send((t, i)) for i in range(300)]) for t in range(4)]
    got: list[tuple[int, int]] = []
    receivers = [threading.Thread(target=lambda: got.extend(right.recv(timeout=10) for _ in range(300)))
                 for _ in range(4)]
    for thread in senders + receivers:
        thread.start()
    for thread in senders + receivers:
        thread.join(timeout=30)
    assert sorted(got) == sorted((t, i) for t in range(4) for i in range(300))


@pytest.mark.timeout(30)
def test_a_signal_in_a_half_written_frame_breaks_the_channel_cleanly(pair: tuple[Channel, Channel]) -> None:
    """The handler raises while an inline frame is half written: no frame can follow it."""
    left, right = pair
    left.zero_copy_threshold = None  # the frame stays inline, far bigger than the socket buffer
    received = bytearray()

    def slow_reader() -> None:  # the write goes on bit by bit, as to a busy peer
        while chunk := right.sock.recv(16384):
            received.extend(chunk)
            threading.Event().wait(0.002)

    class Alarm(Exception):
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise Alarm

    reader = threading.Thread(target=slow_reader)
    reader.start()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Alarm):
            left.send("z" * (8 * MB))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ChannelClosed, match="broken"):
        left.send("after")
    reader.join(timeout=20)
    assert not reader.is_alive()
    # The peer got part of the frame and then the end of the stream: nothing after the cut.
    length = HEADER.unpack_from(received, 0)[4]
    assert 0 < len(received) < HEADER.size + length
    decoder = PickleCodec().decoder()
    assert decoder.feed(bytes(received)) == [] and decoder.pending == len(received)


# ---------------------------------------------------------------------------- JSON lines
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)


@pytest.fixture
def json_pair(path: str) -> Iterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair()
    left, right = Channel(a, serialization="json"), Channel(b, serialization="json")
    assert (left._wire is None) == (path == "pure")
    yield left, right
    left.close()
    right.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(json_values, min_size=1, max_size=6))
def test_json_lines_are_the_codec_s_bytes_and_arrive_in_order(json_pair: tuple[Channel, Channel],
                                                              batch: list[Any]) -> None:
    left, right = json_pair
    expected = b"".join(left.codec.encode(message) for message in batch)
    for message in batch:
        left.send(message)
    assert [right.recv(timeout=5) for _ in batch] == batch
    # And the bytes on the wire are the codec's own: send them raw, read them the same way.
    left.sock.sendall(expected)
    assert [right.recv(timeout=5) for _ in batch] == batch


def test_json_lines_that_take_the_long_way(json_pair: tuple[Channel, Channel]) -> None:
    """Whitespace around a value, a lone surrogate, Node's internal messages, a split line, garbage."""
    left, right = json_pair
    left.sock.sendall(b' {"a": 1} \n')
    assert right.recv(timeout=5) == {"a": 1}
    left.send(["\ud800 lone", "é"])  # escaped as \ud800, as JSON.stringify does: valid UTF-8
    assert right.recv(timeout=5) == ["\ud800 lone", "é"]
    left.sock.sendall(b'{"cmd":"NODE_SOMETHING","x":1}\n')  # internal: never returned by recv
    left.send({"cmd": "NODE_", "plain": True})  # "NODE_" alone is not internal (Node's rule)
    assert right.recv(timeout=5) == {"cmd": "NODE_", "plain": True}
    left.sock.sendall(b'{"sp')
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(right.recv(timeout=10)))
    reader.start()
    left.sock.sendall(b'lit": 2}\n[1]\n')
    reader.join(timeout=10)
    assert got == [{"split": 2}] and right.recv(timeout=5) == [1]
    left.sock.sendall(b"not json\n")
    with pytest.raises(ProtocolError):
        right.recv(timeout=5)
    left.send({"after": "garbage"})
    assert right.recv(timeout=5) == {"after": "garbage"}


def test_json_refusals_read_the_same(path: str) -> None:
    a, b = socket.socketpair()
    left, right = Channel(a, serialization="json", max_frame_size=64), Channel(b, serialization="json")
    try:
        with pytest.raises(SerializationError, match="max_frame_size"):
            left.send("x" * 100)
        with pytest.raises(SerializationError, match="cannot serialise"):
            left.send({"nan": float("nan")})
        with pytest.raises(SerializationError, match="cannot serialise"):
            left.send({1, 2})
        left.send("fine")
        assert right.recv(timeout=5) == "fine"
    finally:
        left.close()
        right.close()


# ------------------------------------------------------- any stream, cut anywhere: same items
def _pickle_pieces() -> st.SearchStrategy[bytes]:
    codec = PickleCodec()
    plain = messages.map(codec.encode)
    control = st.dictionaries(st.text(max_size=5), st.integers(), max_size=3).map(
        lambda m: codec.encode({**m, "cmd": "NODE_CLUSTER"}, control=True))
    broken = st.binary(min_size=1, max_size=20).map(lambda b: HEADER.pack(MAGIC, 0, 0, 0, len(b)) + b)
    return st.one_of(plain, plain, control, broken)


def _json_pieces() -> st.SearchStrategy[bytes]:
    codec = _codec.JsonCodec()
    plain = json_values.map(codec.encode)
    odd = st.sampled_from([b'  {"a": [1, 2]}\n', b"\n", b"not json\n", b'{"cmd":"NODE_X"}\n', b'"\xff"\n',
                           b'{"cmd":"NODE_"}\n', b"[1,2] \n"])
    return st.one_of(plain, plain, odd)


def _items_after(serialization: str, pure: bool, stream: bytes, cuts: list[int],
                 monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What a receiving channel's inbox holds after ``stream`` arrives in the given pieces."""
    with monkeypatch.context() as patched:
        if pure:
            patched.setattr(_channel, "speedups", None)
        a, b = socket.socketpair()
        left, right = Channel(a, serialization=serialization), Channel(b, serialization=serialization)
    try:
        got: list[Any] = []
        bounds = [0, *sorted(set(cuts)), len(stream)]
        for start, end in itertools.pairwise(bounds):
            if end > start:
                left.sock.sendall(stream[start:end])
                while right.connected and right.read_available():
                    pass
        got.extend((item[0], type(item[4]).__name__) for item in right._inbox)
        return got
    finally:
        left.close()
        right.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), serialization=st.sampled_from(["pickle", "json"]))
def test_any_stream_cut_anywhere_decodes_the_same_on_both_paths(monkeypatch: pytest.MonkeyPatch,
                                                                data: st.DataObject, serialization: str) -> None:
    """The compiled reader and the Python decoder agree item for item (messages, errors, order)
    on streams of plain, internal, odd and broken messages, however the reads cut them."""
    if _codec.speedups is None:
        pytest.skip("the compiled hot path is not built here")
    pieces = _pickle_pieces() if serialization == "pickle" else _json_pieces()
    stream = b"".join(data.draw(st.lists(pieces, min_size=1, max_size=12)))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    compiled = _items_after(serialization, False, stream, cuts, monkeypatch)
    assert compiled == _items_after(serialization, True, stream, cuts, monkeypatch)


# ------------------------------------------------------------------- the rest of the suite, pure
CHANNEL_SUITES = ["test_codec.py", "test_hardening_io.py", "test_zerocopy.py", "test_fork.py", "test_api.py",
                  "test_aio.py", "test_aio_wakeup.py", "test_node_protocol.py", "test_node.py"]


@pytest.mark.timeout(900)
def test_pure_python_path_passes_the_channel_suites() -> None:
    """The fallback is tested as thoroughly as the compiled path: the channel's own suites, rerun."""
    if _codec.speedups is None:
        pytest.skip("this whole run is already on the pure-Python path")
    env = {**os.environ, "FORKIO_PURE_PYTHON": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *(f"tests/{name}" for name in CHANNEL_SUITES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_a_wire_that_was_never_set_up_refuses_to_work() -> None:
    if _codec.speedups is None:
        pytest.skip("the compiled hot path is not built here")
    wire = _codec.speedups.Wire.__new__(_codec.speedups.Wire)
    for call in (lambda: wire.send(1, None), lambda: wire.read(True), wire.recv_message, lambda: wire.fill(True)):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
