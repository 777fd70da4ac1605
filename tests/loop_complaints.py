"""What an event loop complains about (un-retrieved future exceptions, tasks destroyed while
pending): the cancellation tests of the MQTT adapter and the agent assert there is nothing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def loop_complaints() -> Iterator[list[dict[str, Any]]]:
    """What the running loop reports to its exception handler meanwhile (un-retrieved future
    exceptions, tasks destroyed while pending), after a garbage collection at the end."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
