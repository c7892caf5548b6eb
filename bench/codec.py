"""Codec micro-benchmark: CPU time per small message to encode, and to decode from 64 KiB reads.

    PYTHONPATH=<checkout>/src taskset -c 1 .venv/bin/python bench/codec.py

Prints one JSON line (ns per message, best of 5 passes over 100,000 messages, CPU time of this
process, so that other load on a shared machine inflates it less than wall time). To compare two
checkouts, run them alternately several times and compare medians.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from forkio._codec import JsonCodec, PickleCodec

MSG = {"seq": 0, "op": "ping", "args": [1, 2, 3], "ok": True}
N = 100_000
PASSES = 5


def _encoder(codec: PickleCodec | JsonCodec) -> Callable[[Any], bytes]:
    if isinstance(codec, PickleCodec):
        return lambda message: codec.encode_message(message, 256 * 1024, True)[0]
    return codec.encode


def decode_ns(codec: PickleCodec | JsonCodec, chunk: int = 65536) -> float:
    encode = _encoder(codec)
    stream = b"".join(encode(MSG) for _ in range(N))
    chunks = [memoryview(stream)[i:i + chunk] for i in range(0, len(stream), chunk)]
    best = float("inf")
    for _ in range(PASSES):
        decoder = codec.decoder()
        start = time.process_time()
        got = sum(len(decoder.feed(c)) for c in chunks)
        best = min(best, time.process_time() - start)
        assert got == N
    return best / N * 1e9


def encode_ns(codec: PickleCodec | JsonCodec) -> float:
    encode = _encoder(codec)
    best = float("inf")
    for _ in range(PASSES):
        start = time.process_time()
        for _ in range(N):
            encode(MSG)
        best = min(best, time.process_time() - start)
    return best / N * 1e9


def main() -> None:
    print(json.dumps({
        "pickle decode ns/msg": round(decode_ns(PickleCodec())),
        "json decode ns/msg": round(decode_ns(JsonCodec())),
        "pickle encode ns/msg": round(encode_ns(PickleCodec())),
        "json encode ns/msg": round(encode_ns(JsonCodec())),
    }))


if __name__ == "__main__":
    main()
