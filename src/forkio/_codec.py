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
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any, cast

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
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_loads = pickle.loads
_dumps = pickle.dumps

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


def _compiled_hot_path() -> Any:
    """The compiled hot path (``_speedups.c``), or None: not built, or FORKIO_PURE_PYTHON=1 asks
    for the pure-Python path. Both behave the same; the Python code is the reference."""
    if os.environ.get("FORKIO_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _compiled_hot_path()
_encode_plain = speedups.encode_plain if speedups is not None else None


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
        if self._custom_dumps is None:
            if _encode_plain is not None:
                got = _encode_plain(message, threshold, self.max_frame_size)
                if type(got) is bytes:
                    return got, _NO_BUFFERS
                if type(got) is tuple:
                    return self.encode_pickled(message, got[0], threshold, reusable)
            elif (kind := type(message)) is dict or kind is tuple or kind not in _BYTES_LIKE:
                oob: list[pickle.PickleBuffer] = []
                try:
                    payload = _dumps(message, PICKLE_PROTOCOL, buffer_callback=oob.append)
                except Exception:
                    pass  # the general path says why (or takes a memoryview out of band)
                else:
                    size = len(payload)
                    if not oob and (threshold is None or size < threshold) and size <= self.max_frame_size:
                        return _pack_header(MAGIC, KIND_MESSAGE, 0, 0, size) + payload, _NO_BUFFERS
                    return self.encode_pickled(message, payload, threshold, reusable, oob)
        return self.encode_shared(message, threshold=threshold, reusable=reusable)

    def encode_pickled(self, message: Any, payload: bytes, threshold: int | None, reusable: bool,
                       oob: list[pickle.PickleBuffer] = _NO_BUFFERS,  # type: ignore[assignment]
                       ) -> tuple[bytes, list[memoryview]]:
        """``encode_message`` for a message already pickled (protocol 5, ``oob`` its buffers)."""
        size = len(payload)
        if not oob and (threshold is None or size < threshold) and size <= self.max_frame_size:
            return _pack_header(MAGIC, KIND_MESSAGE, 0, 0, size) + payload, _NO_BUFFERS
        if threshold is None or size < threshold or not _big_bytes_inside(message, threshold):
            return self._frame(KIND_MESSAGE, 0, 0, payload, oob, threshold, reusable)
        return self.encode_shared(message, threshold=threshold, reusable=reusable)

    def _frame(self, kind: int, n_fds: int, flags: int, payload: bytes, oob: list[pickle.PickleBuffer],
               threshold: int | None, reusable: bool) -> tuple[bytes, list[memoryview]]:
        if not oob:
            self._check_size(len(payload))
            return HEADER.pack(MAGIC, kind, n_fds, 0, len(payload)) + payload, _NO_BUFFERS
        return self._with_buffers(kind, n_fds, flags, payload, oob, threshold, reusable)

    def _check_size(self, length: int) -> None:
        """Refuse a frame the peer would refuse: it would break the channel at the other end."""
        if length > self.max_frame_size or length > _MAX_PAYLOAD:
            limit = min(self.max_frame_size, _MAX_PAYLOAD)
            raise SerializationError(
                f"message of {length} bytes exceeds max_frame_size={limit}: nothing was sent. Large bytes, "
                "bytearray and buffer objects (numpy arrays) travel in shared memory, outside the frame; "
                "otherwise raise max_frame_size (on both sides)")

    @staticmethod
    def _dumps_extracting(obj: Any, threshold: int, oob: list[pickle.PickleBuffer]) -> bytes:
        out = io.BytesIO()
        _ExtractingPickler(out, threshold, oob.append).dump(obj)
        return out.getvalue()

    def _with_buffers(self, kind: int, n_fds: int, flags: int, payload: bytes, oob: list[pickle.PickleBuffer],
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
        self._check_size(length)
        header = HEADER.pack(MAGIC, kind, n_fds, min(len(raws), 255), length)
        return b"".join([header, meta, *entries, payload, *inline]), shared

    def decoder(self, mapper: Mapper | None = None) -> PickleDecoder:
        return PickleDecoder(self.max_frame_size, mapper)


class _Decoder:
    """What both decoders keep: bytes of an incomplete message, and fds not yet claimed.

    fds belong to the message that carried them. The kernel hands over the fds of one
    ``sendmsg`` with the read that returns that write's first byte, and a sender writes a
    message's fds with the message's first byte; so a message takes its fds only from the read
    that brought its first byte. fds that no message can claim any more (the peer sent them
    with a message that declared none) are closed at once, never queued for a later message.
    """

    #: Nothing held back (no part of a message, no fds): then a read that is exactly one whole
    #: message may be decoded on its own, here or by the compiled ``Wire``, without feeding it.
    #: Skipping whole messages leaves the stream offsets consistent.
    idle = True

    def __init__(self, max_frame_size: int) -> None:
        self._max = max_frame_size
        self._buffer = bytearray()
        self._head = 0  # stream offset of the first byte of ``_buffer``
        self._fed = 0  # stream offset of the next byte fed
        self._batches: list[tuple[int, int, list[int]]] = []  # (start, end, fds) of reads with fds

    def _arrived(self, size: int, fds: Sequence[int]) -> int:
        """Account for a read of ``size`` bytes (and its fds); returns its stream offset."""
        start = self._fed
        self._fed = start + size
        if fds:
            self._batches.append((start, start + size, list(fds)))
        return start

    def _claim(self, at: int, count: int) -> list[int]:
        """Up to ``count`` fds for the message whose first byte is at stream offset ``at``.

        Messages claim in stream order: reads that ended before ``at`` are past claiming.
        """
        batches = self._batches
        while batches and batches[0][1] <= at:
            close_fds(batches.pop(0)[2])
        if not batches or batches[0][0] > at:
            return []
        fds = batches[0][2]
        taken = fds[:count]
        del fds[:count]
        return taken

    def _settle(self, head: int | None) -> None:
        """Close every fd no message can claim: all but the ones that came with the read holding
        ``head``, the first byte of the incomplete message (None: there is none)."""
        keep = []
        for batch in self._batches:
            if head is not None and batch[0] <= head < batch[1] and batch[2]:
                keep.append(batch)
            else:
                close_fds(batch[2])
        self._batches = keep

    def close(self) -> None:
        """Close the fds that no message will claim (the channel is done)."""
        self._settle(None)

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

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> list[Incoming]:
        """Add bytes (and the fds that came with them); return every frame now complete."""
        size = len(data)
        if not fds and size >= 8 and self.idle:
            # The common read: exactly one small plain message. Checked by the same rules as
            # ``_frames``; anything else (or a pickle that fails) goes the long way.
            magic, kind, nfds, nbuffers, length = _unpack_header(data, 0)
            if (size == 8 + length and magic == MAGIC and kind == KIND_MESSAGE and not nfds and not nbuffers
                    and length <= self._max):
                try:
                    obj = _loads(data[8:])
                except Exception:
                    pass
                else:
                    return [(obj, _NO_FDS, None, False, None)]
        try:
            return self._feed_read(data, fds)
        finally:
            self.idle = not self._buffer and self._big is None and not self._batches

    def _feed_read(self, data: bytes | memoryview, fds: Sequence[int]) -> list[Incoming]:
        size = len(data)
        at = self._arrived(size, fds)
        big = self._big
        if big is None:
            return self._feed(data, at)
        # A large frame is being filled in place: no growing buffer, no copy to decode it.
        take = min(len(data), len(big) - self._big_fill)
        big[self._big_fill:self._big_fill + take] = data[:take]
        self._big_fill += take
        if self._big_fill < len(big):
            if self._batches:
                self._settle(self._head)
            return []
        self._big = None
        out, _ = self._frames(memoryview(big), len(big), self._head)
        if take < len(data):
            return out + self._feed(data[take:], at + take)
        if self._batches:
            self._settle(None)
        return out

    def _feed(self, data: bytes | memoryview, at: int) -> list[Incoming]:
        buf = self._buffer
        if buf:
            buf += data
            view: bytes | bytearray | memoryview = buf
            at = self._head
        else:
            view = data
        end = len(view)
        out, pos = self._frames(view, end, at)
        self._head = at + pos
        if self._batches:
            self._settle(self._head if pos < end else None)
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

    def _frames(self, view: bytes | bytearray | memoryview, end: int, at: int) -> tuple[list[Incoming], int]:
        """Decode the complete frames in ``view[:end]`` (``view`` starts at stream offset ``at``);
        return them and where the rest starts."""
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
            frame_fds = _NO_FDS
            if nfds:
                frame_fds = self._claim(at + pos, nfds)
                if len(frame_fds) != nfds:
                    close_fds(frame_fds)
                    out.append((None, _NO_FDS, None, False, SerializationError(
                        f"a message announced {nfds} fds but {len(frame_fds)} came with it")))
                    pos = stop
                    continue
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
                    if type(obj) is tuple and len(obj) == 2 and isinstance(obj[1], str):
                        out.append((obj[0], frame_fds, obj[1], False, None))
                    else:  # not what a forkio sender writes: fail this message only
                        close_fds(frame_fds)
                        out.append((None, _NO_FDS, None, False,
                                    SerializationError("a handle message without its (message, kind) pair")))
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

    def wire_options(self) -> dict[str, Any]:
        """How the compiled ``Wire`` encodes and decodes the common case, exactly as this codec does."""
        return {"json_dumps": self._dumps, "json_scan": cast(Any, json.JSONDecoder()).scan_once}

    def encode(self, message: Any, handle_kind: str | None = None, *, control: bool = False,
               handle_fields: dict[str, str] | None = None) -> bytes:
        """One line; with a handle it is wrapped in Node's ``NODE_HANDLE`` envelope (plus ``handle_fields``)."""
        if handle_kind is not None:
            message = {"cmd": "NODE_HANDLE", "type": handle_kind, "msg": message, **(handle_fields or {})}
        try:
            text = self._dumps(message)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _unserialisable(exc, message) from exc
        try:
            line = text.encode("utf-8") + b"\n"
        except UnicodeEncodeError:  # a lone surrogate: escaped, as JSON.stringify does (never invalid UTF-8)
            line = _json_dumps_ascii(message).encode("ascii") + b"\n"
        if len(line) > self.max_frame_size:  # a forkio peer would refuse the line
            raise SerializationError(f"message line of {len(line)} bytes exceeds max_frame_size={self.max_frame_size}:"
                                     " nothing was sent")
        return line

    def decoder(self) -> JsonDecoder:
        return JsonDecoder(self.max_frame_size)


_json_dumps_ascii = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


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
    """Incremental decoder of newline-delimited JSON.

    Linear in the bytes fed: only new bytes are searched for a newline. A line is never held
    beyond ``max_frame_size``: once it passes the limit it becomes an error item and the rest of
    it is dropped as it arrives, up to the newline that ends it; the lines after it decode.
    """

    def __init__(self, max_frame_size: int) -> None:
        super().__init__(max_frame_size)
        self._loads = json.JSONDecoder().decode
        self._skipping = False  # dropping the rest of a line that passed max_frame_size

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> list[Incoming]:
        """Add bytes (and fds); return every complete line decoded."""
        chunk = data if isinstance(data, bytes) else bytes(data)
        size = len(chunk)
        if not fds and self.idle and chunk.find(b"\n") == size - 1 and 1 < size <= self._max:
            # The common read: exactly one whole line, nothing held back (same rules as below).
            try:
                obj = self._loads(chunk.decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                pass  # the long way says why
            else:
                if not is_internal(obj):
                    return [(obj, _NO_FDS, None, False, None)]
        try:
            return self._feed_read(chunk, fds)
        finally:
            self.idle = not self._buffer and not self._skipping and not self._batches

    def _feed_read(self, chunk: bytes, fds: Sequence[int]) -> list[Incoming]:
        size = len(chunk)
        at = self._arrived(size, fds)
        out: list[Incoming] = []
        if self._skipping:
            skip = chunk.find(b"\n") + 1
            if not skip:
                self._settle(None)
                return out
            self._skipping = False
            chunk = chunk[skip:]
            at += skip
        buf = self._buffer
        last = chunk.rfind(b"\n")
        if last < 0:
            if not buf:
                self._head = at
            if len(buf) + len(chunk) > self._max:
                self._too_long(out)
            else:
                buf += chunk
            if self._batches:
                self._settle(self._head if buf else None)
            return out
        if buf:
            line_at = self._head
            buf += chunk[:last]
            lines = bytes(buf)
            self._buffer = bytearray()
        else:
            line_at = at
            lines = chunk[:last]
        loads = self._loads
        for line in lines.split(b"\n"):
            at_line, line_at = line_at, line_at + len(line) + 1
            if len(line) > self._max or not line.strip():
                if line.strip():
                    self._refuse_long_line(out)
                continue  # Node never sends blank lines; tolerate them rather than fail
            try:
                obj = loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                # RecursionError: nested deeper than the interpreter recurses (a hostile line).
                err = ProtocolError(f"peer sent a line that is not JSON ({type(exc).__name__}): {line[:80]!r}")
                err.__cause__ = exc
                out.append((None, _NO_FDS, None, False, err))
                continue
            if is_internal(obj):
                fds_for = self._claim(at_line, 1) if obj["cmd"] == "NODE_HANDLE" else []
                out.append((obj, fds_for, obj.get("type") if fds_for else None, True, None))
            else:
                out.append((obj, _NO_FDS, None, False, None))
        if last + 1 < len(chunk):
            self._head = at + last + 1
            if len(chunk) - last - 1 > self._max:
                self._too_long(out)
            else:
                self._buffer = bytearray(chunk[last + 1:])
        if self._batches:
            self._settle(self._head if self._buffer else None)
        return out

    def _too_long(self, out: list[Incoming]) -> None:
        """The line being received passed the limit: say so now, drop the rest as it comes."""
        self._buffer = bytearray()
        self._skipping = True
        self._refuse_long_line(out)

    def _refuse_long_line(self, out: list[Incoming]) -> None:
        out.append((None, _NO_FDS, None, False, ProtocolError(f"message line longer than max_frame_size={self._max}")))


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
