"""The asyncio face: afork, await send/recv, async for; never blocks the loop; cancellation loses nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import forkio
from forkio import ChannelClosed, SerializationError, WaitTimeout


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_afork_round_trip_and_async_for(children: Path) -> None:
    async def main() -> list[object]:
        async with await forkio.afork(children / "aecho.py") as child:
            assert await child.recv(timeout=10) == "ready"
            for i in range(5):
                await child.send({"i": i})
            child_msgs = [await child.recv(timeout=5) for _ in range(5)]
            child.disconnect()
            assert await child.wait(timeout=10) == 0
            return child_msgs

    assert run(main()) == [{"i": i} for i in range(5)]


def test_async_iteration_ends_at_disconnect(children: Path) -> None:
    async def main() -> list[int]:
        child = await forkio.afork(children / "say_then_exit.py", ["30"])
        got = [m["i"] async for m in child]
        assert await child.wait(timeout=10) == 7
        return got

    assert run(main()) == list(range(30))


def test_cancelled_recv_loses_no_message(children: Path) -> None:
    """A recv cancelled by a timeout leaves the next message for the next recv."""

    async def main() -> list[object]:
        async with await forkio.afork(children / "aecho.py") as child:
            await child.recv(timeout=10)
            received = []
            for i in range(50):
                pending = asyncio.ensure_future(child.recv())
                await asyncio.sleep(0)
                pending.cancel()
                await child.send(i)
                received.append(await child.recv(timeout=5))
            return received

    assert run(main()) == list(range(50))


def test_loop_stays_responsive_while_waiting(children: Path) -> None:
    """While a recv waits, other tasks keep running (the loop is not blocked)."""

    async def main() -> int:
        async with await forkio.afork(children / "sleeper.py") as child:
            await child.recv(timeout=10)
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.005)

            task = asyncio.ensure_future(ticker())
            with pytest.raises(WaitTimeout):
                await child.recv(timeout=0.3)
            task.cancel()
            child.kill()
            return ticks

    assert run(main()) > 10


def test_async_errors(children: Path) -> None:
    async def main() -> None:
        child = await forkio.afork(children / "aecho.py")
        await child.recv(timeout=10)
        with pytest.raises(SerializationError):
            await child.send(lambda: 0)
        await child.send("ok")
        assert await child.recv(timeout=5) == "ok"
        child.disconnect()
        with pytest.raises(ChannelClosed):
            await child.send("closed")
        await child.wait(timeout=10)

    run(main())


def test_async_wait_and_kill(children: Path) -> None:
    async def main() -> None:
        child = await forkio.afork(children / "sleeper.py")
        await child.recv(timeout=10)
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            await child.wait(timeout=0.1)
        child.kill()
        assert await child.wait(timeout=10) < 0
        assert child.signal_code == "SIGTERM"
        assert time.monotonic() - started < 5
        await child.close()

    run(main())


def test_backpressure_does_not_block_the_loop(children: Path) -> None:
    """Sending far more than the socket holds awaits drain instead of blocking the loop or failing."""

    async def main() -> int:
        async with await forkio.afork(children / "aecho.py") as child:
            await child.recv(timeout=10)
            payload = "x" * 64 * 1024
            count = 64  # 4 MB each way, far beyond socket buffers

            async def sender() -> None:
                for _ in range(count):
                    await child.send(payload)

            task = asyncio.ensure_future(sender())
            got = 0
            while got < count:
                assert await child.recv(timeout=10) == payload
                got += 1
            await task
            return got

    assert run(main()) == 64


def test_cancelled_send_never_cuts_a_frame(children: Path) -> None:
    """Cancel sends while frames are half written: the child still gets whole, valid messages."""

    async def main() -> list[object]:
        async with await forkio.afork(children / "aecho.py") as child:
            await child.recv(timeout=10)
            big = "y" * (1 << 20)  # far more than the socket holds: every send waits midway
            sends = [asyncio.ensure_future(child.send(big)) for _ in range(4)]
            await asyncio.sleep(0)
            sends[0].cancel()  # midway through its frame
            sends[2].cancel()  # not started yet
            await asyncio.gather(*sends, return_exceptions=True)
            await child.send("end")
            got = []
            while (message := await child.recv(timeout=20)) != "end":
                got.append(message)
            return got

    got = run(main())
    assert got == ["y" * (1 << 20)] * 3  # the started frame finished, the unstarted one was dropped


@pytest.mark.timeout(60)
def test_afork_under_uvloop(children: Path) -> None:
    """The asyncio face only uses what every loop offers (readers, writers, futures): uvloop too."""
    uvloop = pytest.importorskip("uvloop")
    big = bytes(range(256)) * 8192  # 2 MiB: goes through shared memory, and fills the socket when echoed inline

    async def main() -> tuple[list[object], int]:
        async with await forkio.afork(children / "aecho.py") as child:
            assert await child.recv(timeout=10) == "ready"
            for i in range(500):
                await child.send({"i": i})
            got = [await child.recv(timeout=10) for _ in range(500)]
            await child.send(big)
            echoed = await child.recv(timeout=30)
            assert echoed == big
            child.disconnect()
            return got, await child.wait(timeout=10)

    loop = uvloop.new_event_loop()
    try:
        got, code = loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == [{"i": i} for i in range(500)]
    assert code == 0


@pytest.mark.timeout(60)
def test_aparent_under_uvloop(children: Path) -> None:
    """The child's aparent on uvloop too: round trips, then a burst sent before any answer is read."""
    pytest.importorskip("uvloop")

    async def main() -> tuple[list[object], list[object], int]:
        async with await forkio.afork(children / "aecho.py", ["uvloop"]) as child:
            assert await child.recv(timeout=10) == "ready"
            pings = []
            for i in range(200):
                await child.send(i)
                pings.append(await child.recv(timeout=10))
            for i in range(300):
                await child.send({"burst": i})
            burst = [await child.recv(timeout=10) for _ in range(300)]
            child.disconnect()
            return pings, burst, await child.wait(timeout=10)

    pings, burst, code = run(main())  # type: ignore[misc]
    assert pings == list(range(200))
    assert burst == [{"burst": i} for i in range(300)]
    assert code == 0


def test_afork_takes_fork_options() -> None:
    """afork() has exactly fork()'s options: both hand their arguments to one check (_ForkPlan)."""
    import inspect

    sync, other = inspect.signature(forkio.fork), inspect.signature(forkio.afork)
    assert list(other.parameters.values()) == list(sync.parameters.values())


def test_afork_checks_options_before_starting() -> None:
    """A bad option is the same error from afork() as from fork(), and nothing starts."""
    for bad in ({"timeout": -1}, {"kill_signal": "SIGNOPE"}, {"start": "teleport"}):
        with pytest.raises(ValueError) as sync_error:
            forkio.fork("x.py", **bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError) as async_error:
            run(forkio.afork("x.py", **bad))  # type: ignore[arg-type]
        assert str(async_error.value) == str(sync_error.value)
