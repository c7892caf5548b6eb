"""forkio child for bench/ipc.py: ``first`` | ``echo`` | ``count`` | ``aecho``.

Every mode sends one message first ("ready"), so the parent can time fork -> first message
and knows the child is up before it starts timing anything else.
"""

import sys

mode = sys.argv[1]

if mode == "aecho":  # asyncio on the child side too
    import asyncio

    from forkio import aparent

    async def main() -> None:
        await aparent.send("ready")
        async for msg in aparent:
            await aparent.send(msg)

    asyncio.run(main())
    raise SystemExit(0)

from forkio import parent  # noqa: E402

parent.send("ready")
if mode == "first":
    for _ in parent:  # wait for the parent to close the channel
        pass
elif mode == "echo":
    send = parent.send
    for msg in parent:
        send(msg)
elif mode == "count":  # count messages until a None, answer with the count
    count = 0
    for msg in parent:
        if msg is None:
            parent.send(count)
            count = 0
        else:
            count += 1
else:
    raise SystemExit(f"unknown mode {mode!r}")
