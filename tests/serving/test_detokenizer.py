"""Incremental detokenization and stop strings, with the project's byte-level tokenizer."""

from __future__ import annotations

import pytest

from dilaserve.models.tokenizer import build_byte_tokenizer
from dilaserve.serving.detokenizer import IncrementalDetokenizer


class _Tok:
    def __init__(self):
        self.tok = build_byte_tokenizer()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok():
    return _Tok()


def stream(tok, ids, stop=(), sizes=(1,)):
    detok = IncrementalDetokenizer(tok, stop)
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        update = detok.push(ids[i:i + n])
        out.append(update.text)
        i, k = i + n, k + 1
        if update.is_stopped:
            return "".join(out), True
    tail = detok.finish()
    return "".join(out) + tail.text, tail.is_stopped


@pytest.mark.parametrize("sizes", [(1,), (2,), (3, 1), (100,)])
def test_text_is_the_same_however_tokens_are_chunked(tok, sizes):
    text = "héllo wörld — 数学 ✓ done"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    assert stream(tok, ids, sizes=sizes) == (text, False)


def test_never_emits_half_a_character(tok):
    detok = IncrementalDetokenizer(tok)
    for t in tok.encode("数"):
        assert "\ufffd" not in detok.push([t]).text


def test_invalid_bytes_are_chunking_invariant(tok):
    ids = [0xE6, 0x41, 0x80, 0x80, 0x42] + tok.encode("ok")
    expected = tok.decode(ids)
    for sizes in [(1,), (2,), (3,)]:
        assert stream(tok, ids, sizes=sizes)[0] == expected


@pytest.mark.parametrize("sizes", [(1,), (2,), (5,)])
def test_stop_string_ends_text_before_it(tok, sizes):
    ids = tok.encode("The answer is 42.\n\nQuestion: more")
    assert stream(tok, ids, stop=("\n\nQuestion",), sizes=sizes) == ("The answer is 42.", True)


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end(tok):
    ids = tok.encode("abc\n\nQ")
    assert stream(tok, ids, stop=("\n\nQuestion",)) == ("abc\n\nQ", False)


def test_special_tokens_are_skipped(tok):
    eos = tok.tok.token_to_id("<|endoftext|>")
    assert stream(tok, tok.encode("hi") + [eos, eos]) == ("hi", False)


def test_without_tokenizer_there_is_no_text():
    detok = IncrementalDetokenizer(None, ("x",))
    assert detok.push([1, 2]).text == "" and detok.finish().text == ""
