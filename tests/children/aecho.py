"""asyncio child: echo with aparent."""
import asyncio

from forkio import aparent


async def main() -> None:
    await aparent.send("ready")
    async for message in aparent:
        await aparent.send(message)


asyncio.run(main())
