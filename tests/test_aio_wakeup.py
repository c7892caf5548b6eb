"""The asyncio face's per-message path on both kinds of loop: a reader callback resumes the waiting task
at once, and still no message is lost, reordered or cut (cancellation, concurrent senders, a full socket).

Two endpoints over a socketpair in this process: no child, so every test runs on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from forkio import ChannelClosed, WaitTimeout
from forkio._aio import AsyncEndpoint, _Wakeup
from helpers import channel_pair

LOOPS = ["asyncio", "uvloop"]


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    return asyncio.new_event_loop()


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine to its end on a fresh loop of each kind."""
    _new_loop(request.param).close()  # uvloop opens two fds once per process: not a leak of the test's

    def run_on(coro: Awaitable[Any]) -> Any:
        loop = _new_loop(request.param)
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    return run_on


@pytest.fixture
def ends() -> Iterator[tuple[AsyncEndpoint, AsyncEndpoint]]:
    """Two asyncio endpoints joined by a socketpair (no fd of theirs may outlive the test)."""
    with channel_pair() as (left, right):
        a, b = AsyncEndpoint(left), AsyncEndpoint(right)
        yield a, b
        a.disconnect()
        b.disconnect()


def test_round_trips_on_each_loop(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """Ping-pong through an echoing task: every answer comes back, in order."""
    a, b = ends

    async def echo() -> int:
        count = 0
        async for message in b:
            await b.send(message)
            count += 1
        return count

    async def main() -> tuple[list[int], int]:
        task = asyncio.ensure_future(echo())
        got = []
        for i in range(300):
            await a.send(i)
            got.append(await a.recv(timeout=10))
        a.disconnect()
        return got, await asyncio.wait_for(task, 10)

    assert run(main()) == (list(range(300)), 300)


def test_cancelled_waits_lose_nothing(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """A waiting recv cancelled just as its message arrives (before, after and while the reader
    wakes it) leaves that message for the next recv: every message is received once, in order."""
    a, b = ends

    async def main() -> list[int]:
        got: list[int] = []
        for i in range(200):
            pending = asyncio.ensure_future(b.recv())
            await asyncio.sleep(0)  # now waiting
            mode = i % 3
            if mode == 0:  # cancelled before the reader has seen the message
                await a.send(i)
                pending.cancel()
            elif mode == 1:  # the message in the socket, the cancel queued behind the reader's turn
                await a.send(i)
                asyncio.get_running_loop().call_soon(pending.cancel)
            else:  # a timeout that fires at about the same moment
                pending.cancel()
                await a.send(i)
            try:
                got.append(await pending)
            except asyncio.CancelledError:
                got.append(await b.recv(timeout=10))
        return got

    assert run(main()) == list(range(200))


def test_timeouts_racing_messages_lose_nothing(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """recv(timeout=...) that keeps timing out while messages trickle in: each message arrives once."""
    a, b = ends
    count = 300

    async def sender() -> None:
        for i in range(count):
            await a.send(i)
            if i % 7 == 0:
                await asyncio.sleep(0.0005)

    async def main() -> list[int]:
        task = asyncio.ensure_future(sender())
        got: list[int] = []
        timeouts = 0
        while len(got) < count and timeouts < 20_000:
            try:
                got.append(await b.recv(timeout=0.0002))
            except WaitTimeout:
                timeouts += 1
        await task
        return got

    assert run(main()) == list(range(count))


def test_several_receivers_share_the_messages(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """Several tasks waiting on one endpoint: each message goes to exactly one of them."""
    a, b = ends
    count = 400

    async def receiver(into: list[int]) -> None:
        while True:
            message = await b.recv()
            if message is None:
                return
            into.append(message)

    async def main() -> list[list[int]]:
        lists: list[list[int]] = [[], [], []]
        tasks = [asyncio.ensure_future(receiver(into)) for into in lists]
        await asyncio.sleep(0)
        for i in range(count):
            await a.send(i)
            if i % 50 == 0:
                await asyncio.sleep(0)
        for _ in tasks:
            await a.send(None)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return lists

    lists = run(main())
    assert sorted(i for part in lists for i in part) == list(range(count))
    assert all(part == sorted(part) for part in lists)


def test_concurrent_senders_keep_each_ones_order(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """Tasks sending at once, with frames big enough to fill the socket midway: every frame arrives
    whole, each sender's in the order it sent them."""
    a, b = ends
    senders, each = 4, 40
    pad = "p" * 50_000  # a few frames fill the socket: most sends wait in the queue

    async def sender(who: int) -> None:
        for i in range(each):
            await a.send((who, i, pad if i % 3 == 0 else ""))

    async def main() -> dict[int, list[int]]:
        tasks = [asyncio.ensure_future(sender(who)) for who in range(senders)]
        seen: dict[int, list[int]] = {who: [] for who in range(senders)}
        for _ in range(senders * each):
            who, i, text = await b.recv(timeout=10)
            assert text in ("", pad)
            seen[who].append(i)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return seen

    assert run(main()) == {who: list(range(each)) for who in range(senders)}


def test_full_socket_awaits_without_blocking_the_loop(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """With nobody reading, sends wait for room (the loop keeps running other tasks); once the peer
    reads, everything arrives in order."""
    a, b = ends
    count = 64
    payload = "z" * 65_536  # 4 MiB in all, far beyond the socket's buffers

    async def main() -> tuple[int, bool, list[int]]:
        ticks = 0
        stalled = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks >= 5:
                    stalled.set()
                await asyncio.sleep(0.001)

        async def sender() -> None:
            for i in range(count):
                await a.send((i, payload))

        tick_task = asyncio.ensure_future(ticker())
        send_task = asyncio.ensure_future(sender())
        await asyncio.wait_for(stalled.wait(), 10)  # the loop turns while the sender waits
        was_waiting = not send_task.done()
        got = []
        for _ in range(count):
            i, text = await b.recv(timeout=10)
            assert text == payload
            got.append(i)
        await asyncio.wait_for(send_task, 10)
        tick_task.cancel()
        return ticks, was_waiting, got

    ticks, was_waiting, got = run(main())
    assert was_waiting and ticks >= 5
    assert got == list(range(count))


def test_woken_task_runs_in_its_own_context(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """A task resumed straight from the reader callback sees its own context variables."""
    a, b = ends
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="loop")

    async def waiter(name: str) -> tuple[object, str]:
        var.set(name)
        message = await b.recv(timeout=10)
        return message, var.get()

    async def main() -> tuple[object, str]:
        task = asyncio.ensure_future(waiter("task"))
        await asyncio.sleep(0)
        await a.send("hello")
        return await task

    assert run(main()) == ("hello", "task")


def test_end_of_channel_wakes_waiters(run: Any, ends: tuple[AsyncEndpoint, AsyncEndpoint]) -> None:
    """The peer closing wakes a waiting recv (ChannelClosed) and ends an async for."""
    a, b = ends

    async def main() -> tuple[bool, list[object]]:
        pending = asyncio.ensure_future(b.recv())
        await a.send("last")
        assert await pending == "last"
        pending = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0)
        a.disconnect()
        try:
            await asyncio.wait_for(pending, 10)
            closed = False
        except ChannelClosed:
            closed = True
        return closed, [message async for message in b]

    assert run(main()) == (True, [])


def test_one_endpoint_across_loops() -> None:
    """An endpoint used under one asyncio.run and then another (as a script's aparent may be)."""
    with channel_pair() as (left, right):
        a, b = AsyncEndpoint(left), AsyncEndpoint(right)

        async def exchange(value: int) -> object:
            await a.send(value)
            return await b.recv(timeout=10)

        assert asyncio.run(exchange(1)) == 1
        assert asyncio.run(exchange(2)) == 2
        a.disconnect()
        b.disconnect()


def test_no_channel_iterates_nothing_or_says_why(run: Any) -> None:
    """Without a channel, async for ends at once; with an unusable one it raises, saying why."""

    async def collect(endpoint: AsyncEndpoint) -> list[object]:
        return [message async for message in endpoint]

    assert run(collect(AsyncEndpoint(None, "not forked"))) == []
    with pytest.raises(ChannelClosed, match="bad fd"):
        run(collect(AsyncEndpoint(None, "bad fd", unusable=True)))


def test_recv_is_a_coroutine_function_where_python_can_say() -> None:
    """recv hands out a coroutine; on Python 3.12+ inspect also calls it a coroutine function."""
    endpoint = AsyncEndpoint(None)
    coro = endpoint.recv()
    assert inspect.iscoroutine(coro)
    coro.close()
    if hasattr(inspect, "markcoroutinefunction"):
        assert inspect.iscoroutinefunction(AsyncEndpoint.recv)


def test_wakeup_keeps_the_future_protocol() -> None:
    """_Wakeup as a task sees it: cancel once, woken once, result() raising once cancelled."""
    loop = asyncio.new_event_loop()
    try:
        woken = _Wakeup(loop)
        assert asyncio.isfuture(woken) and not woken.done()
        with pytest.raises(asyncio.InvalidStateError):
            woken.result()
        woken.wake_soon()
        assert woken.done() and not woken.cancelled() and woken.result() is None
        assert not woken.cancel()
        cancelled = _Wakeup(loop)
        assert cancelled.cancel("why")
        assert cancelled.cancelled() and not cancelled.cancel()
        with pytest.raises(asyncio.CancelledError, match="why"):
            cancelled.result()
        calls: list[object] = []
        cancelled.add_done_callback(calls.append)  # already done: scheduled, as a Future does
        assert cancelled.remove_done_callback(calls.append) == 0  # too late: on its way
        pending = _Wakeup(loop)
        pending.add_done_callback(calls.append)
        assert pending.remove_done_callback(calls.append) == 1
        pending.wake_now()  # nobody waits any more: nothing runs
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert calls == [cancelled]
        assert "cancelled" in repr(cancelled)
    finally:
        loop.close()


def test_channel_closed_under_a_waiting_recv(run: Any) -> None:
    """disconnect() from another task wakes a waiting recv, which says the channel is closed."""
    with channel_pair() as (_left, right):
        b = AsyncEndpoint(right)

        async def main() -> str:
            pending = asyncio.ensure_future(b.recv())
            await asyncio.sleep(0)
            b.disconnect()
            try:
                await asyncio.wait_for(pending, 10)
            except ChannelClosed as exc:
                return str(exc)
            return "no error"

        assert "closed" in run(main())



def test_wakeup_awaited_when_already_done(run: Any) -> None:
    """Awaiting a _Wakeup already woken returns at once; one already cancelled raises CancelledError."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        woken = _Wakeup(loop)
        woken.wake_soon()
        await woken
        cancelled = _Wakeup(loop)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    run(main())


def test_cancelled_send_not_started_is_dropped_even_if_the_writer_gets_there_first(run: Any) -> None:
    """A send cancelled before its frame starts is dropped, also when the writer task, running
    before the cancelled send's own handler, finds room for that frame (the peer read meanwhile)."""
    import socket

    with channel_pair() as (left, right):
        left.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        a = AsyncEndpoint(left)

        def drain() -> None:
            while right.read_available():  # what the peer has been sent so far, decoded into its inbox
                pass

        async def main() -> list[int]:
            sends = [asyncio.ensure_future(a.send((i, "x" * (200_000 if i == 0 else 10)))) for i in range(4)]
            await asyncio.sleep(0)  # the first frame went out in part; the others wait in the queue
            assert a._outgoing[0].started and not a._outgoing[2].started
            sends[2].cancel()
            drain()  # room for the rest: the writer task, next in line, will write on
            results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 10)
            assert isinstance(results[2], asyncio.CancelledError)
            await a.send((9, "end"))
            got = []
            while True:
                drain()
                while right._inbox:
                    got.append(right.pop(False)[0])
                if got and got[-1] == 9:
                    return got
                await asyncio.sleep(0.001)

        assert run(main()) == [0, 1, 3, 9]
        a.disconnect()
