"""The I/O-free codecs: framing survives any chunking; bad input gets a typed error."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkio import ProtocolError, SerializationError
from forkio._codec import JsonCodec, PickleCodec, is_internal
from helpers import feed_in_chunks

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_pickle_frames_survive_any_chunking(messages: list[object], cuts: list[int]) -> None:
    """However the byte stream is cut, the decoder yields the same messages in order."""
    codec = PickleCodec()
    stream = b"".join(codec.encode(m) for m in messages)
    decoder = codec.decoder()
    out = feed_in_chunks(decoder, stream, cuts)
    assert out == messages
    assert decoder.pending == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_json_lines_survive_any_chunking(messages: list[object], cuts: list[int]) -> None:
    """Node's newline framing, cut anywhere (even inside a UTF-8 character), decodes exactly."""
    codec = JsonCodec()
    stream = b"".join(codec.encode(m) for m in messages)
    decoder = codec.decoder()
    out = feed_in_chunks(decoder, stream, cuts)
    assert out == messages


def test_json_encoding_is_nodes() -> None:
    """Compact separators, raw UTF-8 (U+2028 included), one trailing newline."""
    assert JsonCodec().encode({"a": 1, "s": "é\u2028"}) == '{"a":1,"s":"é\u2028"}\n'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [math.nan]}])
def test_json_refuses_what_crashes_node(bad: object) -> None:
    """NaN and Infinity would crash a Node peer: refused before anything is written."""
    with pytest.raises(SerializationError):
        JsonCodec().encode(bad)


def test_json_refuses_unserialisable() -> None:
    with pytest.raises(SerializationError, match="object"):
        JsonCodec().encode({"when": object()})


def test_pickle_refuses_unserialisable() -> None:
    with pytest.raises(SerializationError) as info:
        PickleCodec().encode(lambda: None)
    assert info.value.__cause__ is not None


def test_pickle_garbage_is_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="garbage"):
        PickleCodec().decoder().feed(b"GET / HTTP/1.1\r\n")


def test_pickle_oversized_frame_is_refused_before_buffering() -> None:
    """A header announcing more than max_frame_size fails at once, without waiting for the body."""
    decoder = PickleCodec(max_frame_size=1024).decoder()
    with pytest.raises(ProtocolError, match="exceeds max_frame_size"):
        decoder.feed(struct.pack(">BBBBI", 0xF5, 0, 0, 0, 4096))


def test_undecodable_pickle_is_an_item_not_a_stop() -> None:
    """A frame that fails to unpickle becomes an error item; the frames after it still decode."""
    codec = PickleCodec()
    bad = b"\x80\x05junk."
    stream = struct.pack(">BBBBI", 0xF5, 0, 0, 0, len(bad)) + bad + codec.encode("after")
    items = codec.decoder().feed(stream)
    assert isinstance(items[0][4], SerializationError)
    assert items[1][0] == "after"


def test_json_garbage_line_is_an_item_not_a_stop() -> None:
    items = JsonCodec().decoder().feed(b'{not json}\n\n"after"\n')
    assert isinstance(items[0][4], ProtocolError)
    assert items[1][0] == "after"  # the blank line is skipped


def test_json_line_longer_than_max_is_refused() -> None:
    """A line past max_frame_size is an error item as soon as the limit is passed; its rest is
    dropped as it arrives (never buffered), and the line after it decodes."""
    decoder = JsonCodec(max_frame_size=100).decoder()
    assert decoder.feed(b"[" + b"1," * 40) == []
    items = decoder.feed(b"1," * 40)
    assert len(items) == 1 and isinstance(items[0][4], ProtocolError)
    assert decoder.pending == 0
    for _ in range(100):
        assert decoder.feed(b"1," * 1000) == []
        assert decoder.pending == 0
    assert [i[0] for i in decoder.feed(b'1]\n"after"\n')] == ["after"]


def test_node_internal_messages_are_recognised() -> None:
    assert is_internal({"cmd": "NODE_HANDLE_ACK"})
    assert not is_internal({"cmd": "hello"})
    assert not is_internal(["NODE_X"])
    assert not is_internal({"cmd": "NODE_"})  # Node wants something after the prefix


def test_fds_are_matched_to_their_frame() -> None:
    """A frame announcing an fd takes the fd that arrived with it; others take none."""
    codec = PickleCodec()
    r, w = os.pipe()
    try:
        decoder = codec.decoder()
        stream = codec.encode("plain") + codec.encode("with", "fd") + codec.encode("plain again")
        items = decoder.feed(stream, [r])
        assert [(i[0], i[1]) for i in items] == [("plain", []), ("with", [r]), ("plain again", [])]
    finally:
        os.close(r)
        os.close(w)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3_000_000), max_size=12), st.integers(1, 4))
def test_large_frames_fill_their_own_buffer_whatever_the_chunks(cuts: list[int], count: int) -> None:
    """Frames over LARGE_FRAME are received in place; cut anywhere, mixed with small ones, they decode."""
    codec = PickleCodec()
    messages: list[object] = []
    for i in range(count):
        messages += [{"small": i}, "x" * (1_200_000 + i), b"y" * 300]
    stream = b"".join(codec.encode(m) for m in messages)
    decoder = codec.decoder()
    out = feed_in_chunks(decoder, stream, cuts)
    assert out == messages
    assert decoder.pending == 0


def test_json_deeply_nested_line_is_an_item_and_later_lines_arrive() -> None:
    """A line nested deeper than Python recurses is a ProtocolError item; the lines after it in the
    same read still decode (issue 8, item 2)."""
    depth = 100_000
    items = JsonCodec().decoder().feed(b'"before"\n' + b"[" * depth + b"]" * depth + b'\n"after"\n')
    assert items[0][0] == "before"
    assert isinstance(items[1][4], ProtocolError)
    assert isinstance(items[1][4].__cause__, RecursionError)
    assert items[2][0] == "after"


def test_json_long_line_is_searched_once() -> None:
    """Bytes already buffered are not searched again for a newline (the decoder is linear in the
    line's length: issue 8, item 25). Counted, not timed: each byte goes through find once."""
    decoder = JsonCodec().decoder()
    line = b'"' + b"x" * 500_000 + b'"\n'
    searched = 0
    real_feed = decoder.feed

    class Counting(bytes):
        def rfind(self, *args: object) -> int:  # type: ignore[override]
            nonlocal searched
            searched += len(self)
            return super().rfind(*args)  # type: ignore[arg-type]

    out = []
    for start in range(0, len(line), 1000):
        out += real_feed(Counting(line[start:start + 1000]))
    assert [i[0] for i in out] == ["x" * 500_000]
    assert searched == len(line)


def _fd_frames(codec: PickleCodec, count: int) -> tuple[list[bytes], list[int], list[int]]:
    """``count`` frames each sending one pipe's read end as a handle; the read and write ends."""
    frames, reads, writes = [], [], []
    for i in range(count):
        r, w = os.pipe()
        os.write(w, str(i).encode())
        reads.append(r)
        writes.append(w)
        frames.append(codec.encode(i, "fd"))
    return frames, reads, writes


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_stray_fds_are_closed_at_once_and_never_claimed() -> None:
    """An fd that came with a frame declaring none is closed when that frame is decoded, and
    the next handle frame takes its own fd, not the stray one (issue 8, item 6)."""
    codec = PickleCodec()
    stray_r, stray_w = os.pipe()
    frames, reads, writes = _fd_frames(codec, 1)
    try:
        decoder = codec.decoder()
        assert [i[:2] for i in decoder.feed(codec.encode("stray"), [stray_r])] == [("stray", [])]
        assert not _is_open(stray_r)
        items = decoder.feed(frames[0], reads)
        assert items[0][:2] == (0, reads)
        assert os.read(items[0][1][0], 10) == b"0"
    finally:
        for fd in (stray_w, *reads, *writes):
            os.close(fd)


def test_frame_missing_its_fds_is_an_error_item() -> None:
    """A frame that announces an fd which did not come with it fails alone; it never takes an fd
    that came earlier (closed then) or later."""
    codec = PickleCodec()
    decoder = codec.decoder()
    r, w = os.pipe()
    try:
        decoder.feed(codec.encode("plain"), [r])  # r is stray: closed
        items = decoder.feed(codec.encode("handle", "fd") + codec.encode("after"))
        assert isinstance(items[0][4], SerializationError)
        assert items[1][0] == "after"
        assert not _is_open(r)
    finally:
        os.close(w)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=6), st.lists(st.integers(0, 100_000), max_size=6),
       st.integers(0, 2_000_000))
def test_fds_follow_their_frame_whatever_the_chunks(with_fd: list[bool], cuts: list[int], pad: int) -> None:
    """Frames with and without fds (some over LARGE_FRAME), cut anywhere: fds are fed with the
    chunk holding their frame's first byte, as the kernel delivers them, and each frame gets
    exactly its own; nothing stays open after the decoder is done."""
    codec = PickleCodec()
    frames: list[bytes] = []
    starts: list[tuple[int, int]] = []  # (stream offset of a frame with an fd, the fd)
    opened: list[int] = []
    pos = 0
    for i, has_fd in enumerate(with_fd):
        message = (i, b"p" * (pad if i == 0 else 10))
        if has_fd:
            r, w = os.pipe()
            os.write(w, str(i).encode())
            os.close(w)
            opened.append(r)
            frame = codec.encode(message, "fd")
            starts.append((pos, r))
        else:
            frame = codec.encode(message)
        frames.append(frame)
        pos += len(frame)
    stream = b"".join(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {start for start, _ in starts})
    decoder = codec.decoder()
    out = []
    begin = 0
    try:
        for point in [*points, len(stream)]:
            if point == begin and begin != len(stream):
                continue
            fds = [fd for start, fd in starts if begin <= start < point]
            out += decoder.feed(stream[begin:point], fds)
            begin = point
        assert [item[0][0] for item in out] == list(range(len(with_fd)))
        for item, has_fd in zip(out, with_fd, strict=True):
            assert len(item[1]) == int(has_fd)
            if has_fd:
                assert os.read(item[1][0], 10) == str(item[0][0]).encode()
    finally:
        decoder.close()
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass


def test_handle_frame_without_its_pair_fails_alone() -> None:
    """A handle frame whose payload is not (message, kind) is an error item; its fd is closed and
    the frames after it decode."""
    import pickle

    r, w = os.pipe()
    try:
        payload = pickle.dumps("not a pair", 5)
        stream = struct.pack(">BBBBI", 0xF5, 1, 1, 0, len(payload)) + payload + PickleCodec().encode("after")
        items = PickleCodec().decoder().feed(stream, [r])
        assert isinstance(items[0][4], SerializationError) and items[1][0] == "after"
        assert not _is_open(r)
    finally:
        os.close(w)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=8), st.lists(st.integers(0, 2_000), max_size=10))
def test_json_lines_over_the_limit_cost_only_themselves(texts: list[str], cuts: list[int]) -> None:
    """With a small max_frame_size and any chunking, each line too long becomes one error item in
    its place, every other line decodes, and nothing over the limit is ever held."""
    limit = 40
    codec = JsonCodec(max_frame_size=limit)
    lines = [json.dumps(t, ensure_ascii=False).encode() for t in texts]
    stream = b"".join(line + b"\n" for line in lines)
    expected = [("error" if len(line) > limit else t) for line, t in zip(lines, texts, strict=True)]
    decoder = codec.decoder()
    points = sorted({c % (len(stream) + 1) for c in cuts})
    out: list[object] = []
    start = 0
    for point in [*points, len(stream)]:
        for item in decoder.feed(stream[start:point]):
            out.append("error" if isinstance(item[4], ProtocolError) else item[0])
        assert decoder.pending <= limit
        start = point
    assert out == expected
