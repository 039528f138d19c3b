"""Incremental detokenization with stop strings (the engine knows only token ids).

Text is released as tokens arrive, except (1) bytes of a character not yet complete (byte-level
tokenizers split UTF-8 characters over tokens) and (2) a tail that could still turn into a
stop string. On a stop string the text ends just before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class TextUpdate:
    text: str  # new text to send
    is_stopped: bool = False  # a stop string was found; the text ends here


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder | None, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._skip_special = skip_special_tokens
        self._hold = max((len(s) for s in self._stop), default=1) - 1  # chars that may start a stop string
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken
        self._read_offset = 0
        self._text = ""  # everything decoded so far
        self._sent = 0  # chars of _text already released
        self._is_stopped = False

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def push(self, token_ids: Sequence[int]) -> TextUpdate:
        if self._is_stopped:
            return TextUpdate("", True)
        self._ids.extend(token_ids)
        if self._tokenizer is None:
            return TextUpdate("")
        start = max(0, self._sent - self._hold)  # a stop string may straddle released text
        self._text += self._decode_new()
        for stop in self._stop:
            at = self._text.find(stop, start)
            if at != -1:
                return self._stop_at(at)
        releasable = len(self._text) - self._hold
        return self._release(releasable)

    def finish(self) -> TextUpdate:
        """Everything still held back (the stream has ended)."""
        if self._is_stopped or self._tokenizer is None:
            return TextUpdate("", self._is_stopped)
        tail = self._tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        already = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset],
                                         skip_special_tokens=self._skip_special)
        self._text += tail[len(already):]
        self._read_offset = len(self._ids)
        for stop in self._stop:
            at = self._text.find(stop, max(0, self._sent - self._hold))
            if at != -1:
                return self._stop_at(at)
        return self._release(len(self._text))

    def _decode_new(self) -> str:
        """Text of ids not yet decoded, or "" while the last character is incomplete."""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip_special)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _stop_at(self, at: int) -> TextUpdate:
        self._is_stopped = True
        self._text = self._text[:at]
        return self._release(at, is_stopped=True)

    def _release(self, upto: int, is_stopped: bool = False) -> TextUpdate:
        if upto <= self._sent:
            return TextUpdate("", is_stopped)
        delta = self._text[self._sent:upto]
        self._sent = upto
        return TextUpdate(delta, is_stopped)
