"""asyncio child: echo with aparent (on uvloop's loop with the argument ``uvloop``)."""
import asyncio
import sys

from forkio import aparent


async def main() -> None:
    await aparent.send("ready")
    async for message in aparent:
        await aparent.send(message)


if sys.argv[1:] == ["uvloop"]:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
