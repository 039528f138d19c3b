"""A tiny fake OpenAI-compatible streaming server for the replay client's tests.

``fake_server`` (in conftest.py) runs one for a test.

It runs its own event loop in a thread on 127.0.0.1 (random port) and speaks just enough
HTTP/1.1: ``GET /v1/models`` and streaming ``POST /v1/completions`` /
``/v1/chat/completions`` answered with server-sent events over a connection it closes at the
end. A ``behaviour(index, body)`` callable decides per request what to do.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable



@dataclass
class Reply:
    kind: str = "stream"  # stream | refuse | error | broken | hang
    ttft_s: float = 0.0  # delay before the first token
    gap_s: float = 0.0  # delay between tokens
    pieces: tuple[str, ...] | None = None  # text deltas (default: one "t " per max_tokens)
    usage_tokens: int | None = None  # completion_tokens in a final usage chunk
    retry_after: str | None = "2"
    extension: dict | None = None  # the "dilaserve" object put in each chunk


@dataclass
class Received:
    at: float  # time.perf_counter() when the body was read
    method: str
    path: str
    body: dict


@dataclass
class FakeServer:
    behaviour: Callable[[int, dict], Reply] = lambda i, body: Reply()
    model: str = "fake-model"
    received: list[Received] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def posts(self) -> list[Received]:
        return [r for r in self.received if r.method == "POST"]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            if not request_line:
                return
            method, path, _ = request_line.split()
            headers = {}
            while True:
                line = (await reader.readline()).decode()
                if line in ("\r\n", "\n", ""):
                    break
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
            raw = await reader.readexactly(int(headers.get("content-length", 0)))
            body = json.loads(raw) if raw else {}
            index = len(self.posts)
            self.received.append(Received(time.perf_counter(), method, path, body))
            if method == "GET" and path == "/v1/models":
                await self._json(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
                return
            reply = self.behaviour(index, body)
            if reply.kind == "refuse":
                extra = f"Retry-After: {reply.retry_after}\r\n" if reply.retry_after else ""
                await self._json(writer, 429, {"error": {"message": "over capacity"}}, extra)
                return
            if reply.kind == "error":
                await self._json(writer, 500, {"error": {"message": "boom"}})
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         b"Connection: close\r\n\r\n")
            await writer.drain()
            if reply.kind == "hang":
                await asyncio.sleep(30)
                return
            await asyncio.sleep(reply.ttft_s)
            pieces = reply.pieces if reply.pieces is not None else ("t ",) * int(body.get("max_tokens", 1))
            is_chat = path.endswith("/chat/completions")
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(reply.gap_s)
                choice = {"index": 0, "delta": {"content": piece}} if is_chat else {"index": 0, "text": piece}
                chunk = {"id": "x", "object": "text_completion", "choices": [dict(choice, finish_reason=None)]}
                if reply.extension:
                    chunk["dilaserve"] = reply.extension
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
            if reply.kind == "broken":
                return
            if reply.usage_tokens is not None:
                usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": reply.usage_tokens}}
                writer.write(f"data: {json.dumps(usage)}\n\n".encode())
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _json(self, writer, status: int, payload: dict, extra_headers: str = "") -> None:
        data = json.dumps(payload).encode()
        reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n{extra_headers}\r\n".encode() + data)
        await writer.drain()
