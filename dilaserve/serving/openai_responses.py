"""OpenAI-compatible response bodies and server-sent-event chunks.

Besides the OpenAI fields each body carries a ``dilaserve`` object (replica, threshold, deadline,
SLO outcome, steps, token ids); OpenAI clients keep unknown fields, so it is safe to add.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class ResponseContext:
    """What every body or chunk of one response shares."""

    request_id: str
    model: str
    is_chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish_reason: str | None, usage: Usage, extra: dict[str, Any]) -> dict[str, Any]:
        if self.is_chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}])
        body["usage"] = usage.body()
        body["dilaserve"] = extra
        return body

    def chunk(self, text: str, finish_reason: str | None = None, *, is_first: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.is_chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if is_first else (
                {"content": text} if text or finish_reason is None else {})
            body = self._envelope("chat.completion.chunk",
                                  [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        else:
            body = self._envelope("text_completion",
                                  [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])
        if extra:
            body["dilaserve"] = extra
        return body

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.is_chat else "text_completion", [])
        body["usage"] = usage.body()
        return body


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
