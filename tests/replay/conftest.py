"""Fixtures of the replay tests."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_openai_server import FakeServer


@pytest.fixture
def fake_server():
    """A running ``FakeServer``; set ``server.behaviour`` in the test."""
    server = FakeServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def start():
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = srv.sockets[0].getsockname()[1]
        return srv

    def run():
        asyncio.set_event_loop(loop)
        srv = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        # Handlers still sleeping (hang) die first, then the listener.
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
        srv.close()
        loop.run_until_complete(srv.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5), "fake server did not start"
    yield server
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
