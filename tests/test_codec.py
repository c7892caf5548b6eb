"""The I/O-free codecs: framing survives any chunking; bad input gets a typed error."""

from __future__ import annotations

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
    decoder = JsonCodec(max_frame_size=100).decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"[" + b"1," * 200)


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
