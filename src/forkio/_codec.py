"""Wire codecs: I/O-free encoders and incremental decoders for the two channel formats.

``"pickle"`` frames (between Python processes)::

    magic 0xF5 | kind u8 | n_fds u8 | n_buffers u8 | payload length u32 (big-endian) | payload

``kind`` says how to read the payload (a message, a message with a handle, a control
message). ``n_fds`` fds arrive with the frame as SCM_RIGHTS data. A frame whose ``n_buffers``
is not zero carries pickle protocol 5 out-of-band buffers; its payload is then::

    pickle length u32 | buffer count u32 | flags u8 | count x (offset u64, length u64) | pickle | inline bytes

A buffer whose offset has the top bit set lives in a shared-memory segment, the frame's last fd
(flag ``SEGMENT``); the others follow the pickle inside the frame (small buffers). Large
``bytes``/``bytearray``/``memoryview`` objects travel out of band too, as persistent ids (flag
``PERSISTENT``). The codec only lays the buffers out: writing and mapping the segment is the
channel's job, through a ``Mapper`` given to the decoder, so the codec stays free of I/O.

``"json"`` is Node's own format: ``JSON.stringify(message) + "\\n"``, UTF-8. Objects whose
``cmd`` starts with ``NODE_`` are Node's internal messages (handle passing, cluster).

A decoder is fed bytes and the fds that came with them, and returns ``Incoming`` items in
order. A message that cannot be decoded becomes an item carrying the error, so one bad
message never hides the ones after it.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._errors import ProtocolError, SerializationError
from ._handles import RAW_FD, close_fds

DEFAULT_MAX_FRAME = 256 * 1024 * 1024
LARGE_FRAME = 1 << 20  # frames this big are received into a buffer of their own size
PICKLE_PROTOCOL = 5

MAGIC = 0xF5
HEADER = struct.Struct(">BBBBI")
KIND_MESSAGE = 0
KIND_MESSAGE_WITH_HANDLE = 1
KIND_CONTROL = 2
_MAX_PAYLOAD = 2**32 - 1
_MAX_FDS = 255
_NO_FDS: list[int] = []  # shared, never mutated: most frames carry no fds
_NO_BUFFERS: list[memoryview] = []  # likewise

BUFFER_META = struct.Struct(">IIB")  # pickle length, buffer count, flags
BUFFER_ENTRY = struct.Struct(">QQ")  # offset (top bit: in the segment), length
FLAG_PERSISTENT = 1  # the pickle refers to bytes-likes by persistent id
FLAG_SEGMENT = 2  # the frame's last fd is a shared-memory segment
FLAG_REUSABLE = 4  # the sender will reuse the segment: worth keeping mapped
IN_SEGMENT = 1 << 63
SEGMENT_ALIGN = 64

# Persistent ids of out-of-band bytes-likes: (tag, PickleBuffer[, format, shape]).
_PID_BYTES = "forkio.bytes"
_PID_BYTEARRAY = "forkio.bytearray"
_PID_MEMORYVIEW = "forkio.memoryview"
_BYTES_LIKE = (bytes, bytearray, memoryview)

# A segment fd -> one writable view over the whole segment; the view keeps the segment mapped
# (and, for a reusable one, tells the sender when the receiver is done with it).
Mapper = Callable[[int, bool], memoryview]


# One decoded item: (message, fds, handle_kind, internal, error). A plain tuple, not a
# NamedTuple: building one is on the hot path of every message and a tuple costs a fifth.
Incoming = tuple[Any, list[int], "str | None", bool, "BaseException | None"]


def _unserialisable(exc: BaseException, obj: Any) -> SerializationError:
    err = SerializationError(f"cannot serialise {type(obj).__name__} message: {exc}")
    err.__cause__ = exc
    return err


def segment_layout(buffers: Sequence[memoryview]) -> tuple[list[int], int]:
    """Offsets of ``buffers`` packed into one segment (each aligned), and the segment's size."""
    offsets = []
    pos = 0
    for buf in buffers:
        offsets.append(pos)
        pos += (buf.nbytes + SEGMENT_ALIGN - 1) // SEGMENT_ALIGN * SEGMENT_ALIGN
    return offsets, max(pos, 1)


class _ExtractingPickler(pickle.Pickler):
    """Sends large bytes/bytearray (and any memoryview) out of band, as persistent ids.

    The C pickler never offers exact ``bytes`` to ``reducer_override``; ``persistent_id`` sees
    every object, which is why this pickler is kept off the hot path.
    """

    def __init__(self, file: io.BytesIO, threshold: int, buffer_callback: Callable[[pickle.PickleBuffer], Any]
                 ) -> None:
        super().__init__(file, PICKLE_PROTOCOL, buffer_callback=buffer_callback)
        self._threshold = threshold

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes or kind is bytearray:
            if len(obj) >= self._threshold:
                return (_PID_BYTES if kind is bytes else _PID_BYTEARRAY, pickle.PickleBuffer(obj))
        elif kind is memoryview:
            view = obj if obj.contiguous else memoryview(obj.tobytes()).cast(obj.format, obj.shape)
            return (_PID_MEMORYVIEW, pickle.PickleBuffer(view), obj.format, obj.shape, obj.readonly)
        return None


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        tag, buf = pid[0], pid[1]
        if tag == _PID_BYTES:
            return bytes(buf)
        if tag == _PID_BYTEARRAY:
            return bytearray(buf)
        if tag == _PID_MEMORYVIEW:
            _, _, fmt, shape, readonly = pid
            view = memoryview(buf)
            if view.format != fmt or view.shape != tuple(shape):
                view = view.cast("B").cast(fmt, shape)
            return view.toreadonly() if readonly else view
        raise pickle.UnpicklingError(f"unknown persistent id {tag!r}")


def _big_bytes_inside(message: Any, threshold: int) -> bool:
    """A large bytes-like directly inside a dict/list/tuple message (deeper ones travel inline)."""
    kind = type(message)
    if kind is dict:
        items = message.values()
    elif kind is list or kind is tuple:
        items = message
    else:
        return False
    return any(type(item) in (bytes, bytearray) and len(item) >= threshold for item in items)


class PickleCodec:
    """Length-prefixed pickle (protocol 5) frames, with out-of-band buffers."""

    name = "pickle"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME, dumps: Any = None) -> None:
        self.max_frame_size = max_frame_size
        self._custom_dumps = dumps

    def encode(self, message: Any, handle_kind: str | None = None, *, control: bool = False,
               raw_fds: int = 0) -> bytes:
        """One self-contained frame for ``message`` (every buffer inside it).

        With ``handle_kind`` the frame announces one fd, the handle; with ``raw_fds`` it
        announces that many plain fds.
        """
        return self.encode_shared(message, handle_kind, control=control, raw_fds=raw_fds)[0]

    def encode_shared(self, message: Any, handle_kind: str | None = None, *, control: bool = False,
                      raw_fds: int = 0, threshold: int | None = None,
                      reusable: bool = False) -> tuple[bytes, list[memoryview]]:
        """A frame, and the buffers to place in a shared segment (at ``segment_layout`` offsets).

        Buffers of ``threshold`` bytes or more go to the segment; when there are any, the frame
        announces one more fd, which the sender must append after the others.
        """
        obj = message if handle_kind is None else (message, handle_kind)
        n_fds = raw_fds if handle_kind is None else 1
        kind = KIND_CONTROL if control else (KIND_MESSAGE if handle_kind is None else KIND_MESSAGE_WITH_HANDLE)
        oob: list[pickle.PickleBuffer] = []
        flags = 0
        try:
            if self._custom_dumps is not None:
                payload = self._custom_dumps(obj)
            elif threshold is not None and type(message) in _BYTES_LIKE and len(message) >= threshold:
                payload = self._dumps_extracting(obj, threshold, oob)
                flags = FLAG_PERSISTENT
            else:
                try:
                    payload = pickle.dumps(obj, PICKLE_PROTOCOL, buffer_callback=oob.append)
                except TypeError:
                    if threshold is None:
                        raise
                    oob.clear()  # a memoryview somewhere: only the extracting pickler takes those
                    payload = self._dumps_extracting(obj, threshold, oob)
                    flags = FLAG_PERSISTENT
                else:
                    if threshold is not None and len(payload) >= threshold and _big_bytes_inside(message, threshold):
                        oob.clear()
                        payload = self._dumps_extracting(obj, threshold, oob)
                        flags = FLAG_PERSISTENT
        except Exception as exc:
            raise _unserialisable(exc, message) from exc
        return self._frame(kind, n_fds, flags, payload, oob, threshold, reusable)

    def encode_message(self, message: Any, threshold: int | None, reusable: bool) -> tuple[bytes, list[memoryview]]:
        """``encode_shared`` for a message without fds, built for speed: a small message costs
        one ``pickle.dumps`` and a header, as it would without out-of-band buffers."""
        kind = type(message)
        if self._custom_dumps is None and (kind is dict or kind is tuple or kind not in _BYTES_LIKE):
            oob: list[pickle.PickleBuffer] = []
            try:
                payload = pickle.dumps(message, PICKLE_PROTOCOL, buffer_callback=oob.append)
            except Exception:
                pass  # the general path says why (or takes a memoryview out of band)
            else:
                if not oob and (threshold is None or len(payload) < threshold):
                    return HEADER.pack(MAGIC, KIND_MESSAGE, 0, 0, len(payload)) + payload, _NO_BUFFERS
                if threshold is None or len(payload) < threshold or not _big_bytes_inside(message, threshold):
                    return self._frame(KIND_MESSAGE, 0, 0, payload, oob, threshold, reusable)
        return self.encode_shared(message, threshold=threshold, reusable=reusable)

    def _frame(self, kind: int, n_fds: int, flags: int, payload: bytes, oob: list[pickle.PickleBuffer],
               threshold: int | None, reusable: bool) -> tuple[bytes, list[memoryview]]:
        if not oob:
            if len(payload) > _MAX_PAYLOAD:
                raise SerializationError(f"message of {len(payload)} bytes exceeds the 4 GiB frame limit")
            return HEADER.pack(MAGIC, kind, n_fds, 0, len(payload)) + payload, _NO_BUFFERS
        return self._with_buffers(kind, n_fds, flags, payload, oob, threshold, reusable)

    @staticmethod
    def _dumps_extracting(obj: Any, threshold: int, oob: list[pickle.PickleBuffer]) -> bytes:
        out = io.BytesIO()
        _ExtractingPickler(out, threshold, oob.append).dump(obj)
        return out.getvalue()

    @staticmethod
    def _with_buffers(kind: int, n_fds: int, flags: int, payload: bytes, oob: list[pickle.PickleBuffer],
                      threshold: int | None, reusable: bool) -> tuple[bytes, list[memoryview]]:
        try:
            raws = [pb.raw() for pb in oob]
        except BufferError as exc:  # a non-contiguous exporter: not something pickle produces
            raise SerializationError(f"cannot send a non-contiguous buffer: {exc}") from exc
        shared = [raw for raw in raws if threshold is not None and raw.nbytes >= threshold]
        offsets, _size = segment_layout(shared)
        shared_at = iter(offsets)
        entries = []
        inline = []
        inline_pos = 0
        for raw in raws:
            if threshold is not None and raw.nbytes >= threshold:
                entries.append(BUFFER_ENTRY.pack(next(shared_at) | IN_SEGMENT, raw.nbytes))
            else:
                entries.append(BUFFER_ENTRY.pack(inline_pos, raw.nbytes))
                inline.append(raw)
                inline_pos += raw.nbytes
        if shared:
            flags |= FLAG_SEGMENT | (FLAG_REUSABLE if reusable else 0)
            n_fds += 1
        if n_fds > _MAX_FDS:
            raise SerializationError(f"a message can carry at most {_MAX_FDS} fds")
        meta = BUFFER_META.pack(len(payload), len(raws), flags)
        length = len(meta) + BUFFER_ENTRY.size * len(raws) + len(payload) + inline_pos
        if length > _MAX_PAYLOAD:
            raise SerializationError(f"message of {length} bytes exceeds the 4 GiB frame limit")
        header = HEADER.pack(MAGIC, kind, n_fds, min(len(raws), 255), length)
        return b"".join([header, meta, *entries, payload, *inline]), shared

    def decoder(self, mapper: Mapper | None = None) -> PickleDecoder:
        return PickleDecoder(self.max_frame_size, mapper)


class _Decoder:
    """What both decoders keep: bytes of an incomplete message, and fds not yet claimed."""

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def close(self) -> None:
        """Close the fds that no message will claim (the channel is done)."""
        close_fds(list(self._fds))
        self._fds.clear()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buffer)


class PickleDecoder(_Decoder):
    """Incremental decoder of pickle frames."""

    def __init__(self, max_frame_size: int, mapper: Mapper | None = None) -> None:
        super().__init__(max_frame_size)
        self._mapper = mapper
        self._big: bytearray | None = None  # a large frame's own buffer, while it fills
        self._big_fill = 0

    def feed(self, data: bytes | memoryview, fds: list[int] = ()) -> list[Incoming]:  # type: ignore[assignment]
        """Add bytes (and the fds that came with them); return every frame now complete."""
        if fds:
            self._fds.extend(fds)
        big = self._big
        if big is None:
            return self._feed(data)
        # A large frame is being filled in place: no growing buffer, no copy to decode it.
        take = min(len(data), len(big) - self._big_fill)
        big[self._big_fill:self._big_fill + take] = data[:take]
        self._big_fill += take
        if self._big_fill < len(big):
            return []
        self._big = None
        out, _ = self._frames(memoryview(big), len(big))
        return out + self._feed(data[take:]) if take < len(data) else out

    def _feed(self, data: bytes | memoryview) -> list[Incoming]:
        buf = self._buffer
        if buf:
            buf += data
            view: bytes | bytearray | memoryview = buf
        else:
            view = data
        end = len(view)
        out, pos = self._frames(view, end)
        if pos < end and end - pos >= 8:
            size = 8 + HEADER.unpack_from(view, pos)[4]
            if size >= LARGE_FRAME:  # the rest of this frame goes straight into its own buffer
                self._big = bytearray(size)
                self._big[:end - pos] = view[pos:end]
                self._big_fill = end - pos
                self._buffer = bytearray()
                return out
        if buf:
            del buf[:pos]
        elif pos < end:
            self._buffer = bytearray(view[pos:])
        return out

    def _frames(self, view: bytes | bytearray | memoryview, end: int) -> tuple[list[Incoming], int]:
        """Decode the complete frames in ``view[:end]``; return them and where the rest starts."""
        out: list[Incoming] = []
        pos = 0
        unpack = HEADER.unpack_from
        loads = pickle.loads
        while end - pos >= 8:
            magic, kind, nfds, nbuffers, length = unpack(view, pos)
            if magic != MAGIC or kind > KIND_CONTROL:
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
                if nbuffers:
                    obj, frame_fds = self._load_with_buffers(view[pos + 8:stop], frame_fds)
                else:
                    obj = loads(view[pos + 8:stop])
            except Exception as exc:
                if not nbuffers:  # _load_with_buffers closes its own
                    close_fds(frame_fds)
                err = SerializationError(f"cannot deserialise a message: {exc!r}")
                err.__cause__ = exc
                out.append((None, _NO_FDS, None, False, err))
            else:
                if kind == KIND_MESSAGE:
                    out.append((obj, frame_fds, RAW_FD if frame_fds else None, False, None))
                elif kind == KIND_MESSAGE_WITH_HANDLE:
                    obj, handle_kind = obj
                    out.append((obj, frame_fds, handle_kind, False, None))
                else:
                    out.append((obj, frame_fds, None, True, None))
            pos = stop
        return out, pos

    def _load_with_buffers(self, payload: bytes | bytearray | memoryview, fds: list[int]) -> tuple[Any, list[int]]:
        """Unpickle a frame with out-of-band buffers; returns the object and the frame's other fds.

        Owns ``fds``: on any error they are closed before the error propagates.
        """
        fds = list(fds)
        try:
            pickle_len, count, flags = BUFFER_META.unpack_from(payload, 0)
            table_end = BUFFER_META.size + BUFFER_ENTRY.size * count
            inline_at = table_end + pickle_len
            if inline_at > len(payload):
                raise SerializationError("buffer table overruns the frame")
            segment: memoryview | None = None
            if flags & FLAG_SEGMENT:
                if not fds:
                    raise SerializationError("a frame with a shared segment arrived without its fd")
                seg_fd = fds.pop()
                if self._mapper is None:
                    close_fds([seg_fd])
                    raise SerializationError("this receiver cannot map shared-memory buffers")
                segment = self._mapper(seg_fd, bool(flags & FLAG_REUSABLE))  # owns seg_fd from here
            buffers: list[Any] = []
            for i in range(count):
                offset, length = BUFFER_ENTRY.unpack_from(payload, BUFFER_META.size + BUFFER_ENTRY.size * i)
                if offset & IN_SEGMENT:
                    offset &= ~IN_SEGMENT
                    if segment is None or offset + length > len(segment):
                        raise SerializationError("a buffer lies outside its shared segment")
                    buffers.append(segment[offset:offset + length])
                else:
                    start = inline_at + offset
                    if start + length > len(payload):
                        raise SerializationError("an inline buffer overruns the frame")
                    buffers.append(bytearray(payload[start:start + length]))
            data = payload[table_end:inline_at]
            if flags & FLAG_PERSISTENT:
                obj = _Unpickler(io.BytesIO(data), buffers=buffers).load()
            else:
                obj = pickle.loads(data, buffers=buffers)
        except BaseException:
            close_fds(fds)
            raise
        return obj, fds

    def _fail(self) -> None:
        self._buffer = bytearray()
        self._big = None
        self.close()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return self._big_fill if self._big is not None else len(self._buffer)


class JsonCodec:
    """Node's IPC format: one ``JSON.stringify(message)`` line per message."""

    name = "json"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_size = max_frame_size
        self._dumps = _json_dumps()

    def encode(self, message: Any, handle_kind: str | None = None, *, control: bool = False,
               handle_fields: dict[str, str] | None = None) -> bytes:
        """One line; with a handle it is wrapped in Node's ``NODE_HANDLE`` envelope (plus ``handle_fields``)."""
        if handle_kind is not None:
            message = {"cmd": "NODE_HANDLE", "type": handle_kind, "msg": message, **(handle_fields or {})}
        try:
            text = self._dumps(message)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _unserialisable(exc, message) from exc
        return text.encode("utf-8", "surrogatepass") + b"\n"

    def decoder(self) -> JsonDecoder:
        return JsonDecoder(self.max_frame_size)


def _json_dumps() -> Callable[[Any], str]:
    """``JSON.stringify``'s output from Python: compact, raw UTF-8, no NaN/Infinity.

    ``JSONEncoder.encode`` builds a new C encoder for every call; building it once halves the
    cost of a small message. Without the C accelerator, the plain encoder does the same job.
    Cycles then surface as ``RecursionError`` (no marker dict is kept), reported like the rest.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    from json import encoder as json_encoder

    make = getattr(json_encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    chunks = make(None, encoder.default, json_encoder.encode_basestring, None, ":", ",", False, False, False)

    def dumps(message: Any) -> str:
        if isinstance(message, str):
            return json_encoder.encode_basestring(message)
        return "".join(chunks(message, 0))

    return dumps


def is_internal(message: Any) -> bool:
    """Node's rule: an object whose ``cmd`` is ``NODE_`` followed by at least one character is internal."""
    if not isinstance(message, dict):
        return False
    cmd = message.get("cmd")
    return isinstance(cmd, str) and len(cmd) > 5 and cmd.startswith("NODE_")


class JsonDecoder(_Decoder):
    """Incremental decoder of newline-delimited JSON."""

    def __init__(self, max_frame_size: int) -> None:
        super().__init__(max_frame_size)
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
