"""A subscriber whose handler never finishes: prints READY once subscribed, GOT <payload> when
a message arrives, then hangs until killed. argv = broker_url fleet client_id topic."""

from __future__ import annotations

import asyncio
import sys

from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.settings import load_settings


async def main(url: str, fleet: str, client_id: str, topic: str) -> None:
    settings = load_settings(broker_url=url, fleet=fleet)

    async def hang(msg: Message) -> None:
        print("GOT", msg.payload.decode(), flush=True)
        await asyncio.Event().wait()

    async with MqttClient.from_settings(settings, client_id=client_id) as client:
        await client.subscribe(topic, hang)
        print("READY", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
