"""Wire codecs: I/O-free encoders and incremental decoders for the two channel formats.

``"pickle"`` frames (between Python processes)::

    magic 0xF5 | kind u8 | n_fds u8 | n_buffers u8 | payload length u32 (big-endian) | payload

``kind`` says how to read the payload (a message, a message with a handle, a control
message). ``n_fds`` fds arrive with the frame as SCM_RIGHTS data; ``n_buffers`` is reserved
for out-of-band buffers, so both ride along without a change of format.

``"json"`` is Node's own format: ``JSON.stringify(message) + "\\n"``, UTF-8. Objects whose
``cmd`` starts with ``NODE_`` are Node's internal messages (handle passing, cluster).

A decoder is fed bytes and the fds that came with them, and returns ``Incoming`` items in
order. A message that cannot be decoded becomes an item carrying the error, so one bad
message never hides the ones after it.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections import deque
from typing import Any

from ._errors import ProtocolError, SerializationError
from ._handles import RAW_FD, close_fds

DEFAULT_MAX_FRAME = 256 * 1024 * 1024
PICKLE_PROTOCOL = 5

MAGIC = 0xF5
HEADER = struct.Struct(">BBBBI")
KIND_MESSAGE = 0
KIND_MESSAGE_WITH_HANDLE = 1
KIND_CONTROL = 2
_MAX_PAYLOAD = 2**32 - 1
_NO_FDS: list[int] = []  # shared, never mutated: most frames carry no fds


# One decoded item: (message, fds, handle_kind, internal, error). A plain tuple, not a
# NamedTuple: building one is on the hot path of every message and a tuple costs a fifth.
Incoming = tuple[Any, list[int], "str | None", bool, "BaseException | None"]


def _unserialisable(exc: BaseException, obj: Any) -> SerializationError:
    err = SerializationError(f"cannot serialise {type(obj).__name__} message: {exc}")
    err.__cause__ = exc
    return err


class PickleCodec:
    """Length-prefixed pickle (protocol 5) frames."""

    name = "pickle"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME, dumps: Any = None) -> None:
        self.max_frame_size = max_frame_size
        self._dumps = dumps or (lambda obj: pickle.dumps(obj, PICKLE_PROTOCOL))

    def encode(self, message: Any, handle_kind: str | None = None, *, control: bool = False) -> bytes:
        """One frame for ``message``; with ``handle_kind`` the frame announces one fd."""
        try:
            if handle_kind is None:
                payload = self._dumps(message)
            else:
                payload = self._dumps((message, handle_kind))
        except Exception as exc:
            raise _unserialisable(exc, message) from exc
        if len(payload) > _MAX_PAYLOAD:
            raise SerializationError(f"message of {len(payload)} bytes exceeds the 4 GiB frame limit")
        kind = KIND_CONTROL if control else (KIND_MESSAGE if handle_kind is None else KIND_MESSAGE_WITH_HANDLE)
        return HEADER.pack(MAGIC, kind, 0 if handle_kind is None else 1, 0, len(payload)) + payload

    def decoder(self) -> PickleDecoder:
        return PickleDecoder(self.max_frame_size)


class PickleDecoder:
    """Incremental decoder of pickle frames."""

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes | memoryview, fds: list[int] = ()) -> list[Incoming]:  # type: ignore[assignment]
        """Add bytes (and the fds that came with them); return every frame now complete."""
        if fds:
            self._fds.extend(fds)
        buf = self._buffer
        if buf:
            buf += data
            view: bytes | bytearray | memoryview = buf
        else:
            view = data
        out: list[Incoming] = []
        pos = 0
        end = len(view)
        unpack = HEADER.unpack_from
        loads = pickle.loads
        while end - pos >= 8:
            magic, kind, nfds, nbuffers, length = unpack(view, pos)
            if magic != MAGIC or kind > KIND_CONTROL or nbuffers:
                self._fail()
                raise ProtocolError(f"garbage on the channel: bad frame header {bytes(view[pos:pos + 8])!r}")
            if length > self._max:
                self._fail()
                raise ProtocolError(f"frame of {length} bytes exceeds max_frame_size={self._max}")
            stop = pos + 8 + length
            if stop > end:
                break
            frame_fds = [self._fds.popleft() for _ in range(min(nfds, len(self._fds)))] if nfds else _NO_FDS
            try:
                obj = loads(view[pos + 8:stop])
            except Exception as exc:
                close_fds(frame_fds)
                err = SerializationError(f"cannot deserialise a message: {exc!r}")
                err.__cause__ = exc
                out.append((None, _NO_FDS, None, False, err))
            else:
                if kind == KIND_MESSAGE:
                    out.append((obj, frame_fds, RAW_FD if nfds else None, False, None))
                elif kind == KIND_MESSAGE_WITH_HANDLE:
                    obj, handle_kind = obj
                    out.append((obj, frame_fds, handle_kind, False, None))
                else:
                    out.append((obj, frame_fds, None, True, None))
            pos = stop
        if buf:
            del buf[:pos]
        elif pos < end:
            self._buffer = bytearray(view[pos:])
        return out

    def _fail(self) -> None:
        self._buffer = bytearray()
        close_fds(list(self._fds))
        self._fds.clear()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


class JsonCodec:
    """Node's IPC format: one ``JSON.stringify(message)`` line per message."""

    name = "json"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_size = max_frame_size
        self._dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode

    def encode(self, message: Any, handle_kind: str | None = None, *, control: bool = False) -> bytes:
        """One line; with a handle it is wrapped in Node's ``NODE_HANDLE`` envelope."""
        if handle_kind is not None:
            message = {"cmd": "NODE_HANDLE", "type": handle_kind, "msg": message}
        try:
            text = self._dumps(message)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _unserialisable(exc, message) from exc
        return text.encode("utf-8", "surrogatepass") + b"\n"

    def decoder(self) -> JsonDecoder:
        return JsonDecoder(self.max_frame_size)


def is_internal(message: Any) -> bool:
    """Node's rule: an object whose ``cmd`` starts with ``NODE_`` is internal."""
    return isinstance(message, dict) and isinstance(message.get("cmd"), str) and message["cmd"].startswith("NODE_")


class JsonDecoder:
    """Incremental decoder of newline-delimited JSON."""

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._loads = json.JSONDecoder().decode

    def feed(self, data: bytes | memoryview, fds: list[int] = ()) -> list[Incoming]:  # type: ignore[assignment]
        """Add bytes (and fds); return every complete line decoded."""
        if fds:
            self._fds.extend(fds)
        buf = self._buffer
        buf += data
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) > self._max:
                self._buffer = bytearray()
                raise ProtocolError(f"message line longer than max_frame_size={self._max}")
            return []
        lines = bytes(buf[:last]).split(b"\n")
        del buf[: last + 1]
        out: list[Incoming] = []
        for line in lines:
            if not line.strip():
                continue  # Node never sends blank lines; tolerate them rather than fail
            if len(line) > self._max:
                too_long = ProtocolError(f"message line longer than max_frame_size={self._max}")
                out.append((None, _NO_FDS, None, False, too_long))
                continue
            try:
                obj = self._loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                err = ProtocolError(f"peer sent a line that is not JSON: {bytes(line[:80])!r}")
                err.__cause__ = exc
                out.append((None, _NO_FDS, None, False, err))
                continue
            if is_internal(obj):
                fds_for = [self._fds.popleft()] if obj["cmd"] == "NODE_HANDLE" and self._fds else []
                out.append((obj, fds_for, obj.get("type") if fds_for else None, True, None))
            else:
                out.append((obj, _NO_FDS, None, False, None))
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)


Codec = PickleCodec | JsonCodec


def make_codec(serialization: str, *, max_frame_size: int = DEFAULT_MAX_FRAME) -> Codec:
    """The codec for a ``serialization`` name (``"pickle"`` or ``"json"``)."""
    if serialization == "pickle":
        return PickleCodec(max_frame_size=max_frame_size)
    if serialization == "json":
        return JsonCodec(max_frame_size=max_frame_size)
    if serialization == "advanced":
        raise ValueError("Node's 'advanced' (V8) serialization is not supported; use serialization='json'")
    raise ValueError(f"serialization must be 'pickle' or 'json', not {serialization!r}")
