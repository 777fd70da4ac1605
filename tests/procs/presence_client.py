"""A process that announces itself online (retained) with an offline last will, prints READY
and then waits to be killed. Used by the last-will test: argv = broker_url fleet agent_id."""

from __future__ import annotations

import asyncio
import sys

from edgefed.common.mqtt import MqttClient, Will
from edgefed.common.schemas import AgentState, AgentStatus
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics


async def main(url: str, fleet: str, agent_id: str) -> None:
    settings = load_settings(broker_url=url, fleet=fleet)
    topic = Topics(fleet).agent_status(agent_id)
    will = Will(
        topic,
        AgentStatus(
            agent_id=agent_id, state=AgentState.OFFLINE, reason="connection lost"
        ).to_json(),
        content_type="application/json",
    )
    async with MqttClient.from_settings(settings, client_id=agent_id, will=will) as client:
        online = AgentStatus(agent_id=agent_id, state=AgentState.ONLINE)
        await client.publish(topic, online.to_json(), retain=True, content_type="application/json")
        print("READY", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
