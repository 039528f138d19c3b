"""Turning task text into token ids: BPE merges learned on the task corpus, and LLaDA's chat format.

Merges are learned only inside runs of letters (with their leading space), so digits stay
one token each (the model does arithmetic digit by digit) and no merge can cross a word,
digit or punctuation boundary. That makes the merges give the same tokens whether the text
is split into words or not, which is what the project's byte-level tokenizer (no
pre-split) needs. On this task they shorten prompts about three times.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

from tokenizers import Tokenizer

from dilaserve.models.tokenizer import (
    BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, MASK_TOKEN, build_byte_tokenizer,
)

_WORD_RE = re.compile(r" ?[A-Za-z]+")
# GPT-2's byte-to-unicode map sends ASCII letters to themselves and the space to "Ġ".
_SPACE = "Ġ"


def learn_merges(texts: Iterable[str], num_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """Greedy BPE over the letter-words of ``texts``; ties go to the smaller pair (deterministic)."""
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word in _WORD_RE.findall(text):
            words[tuple(word.replace(" ", _SPACE))] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_count:
            break
        merges.append(best)
        words = Counter({_merge_word(w, best): c for w, c in words.items()})
    return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_task_tokenizer(corpus: Iterable[str], num_merges: int) -> Tokenizer:
    """The project's byte-level tokenizer with merges learned on ``corpus``."""
    chat_words = ["user", "assistant"]
    return build_byte_tokenizer(learn_merges(list(corpus) + chat_words, num_merges))


class ChatEncoder:
    """LLaDA's chat format over a raw ``tokenizers.Tokenizer``, without transformers.

    ``prompt_ids`` gives exactly what ``apply_chat_template(add_generation_prompt=True)``
    followed by ``encode(add_special_tokens=False)`` gives for one user turn (tested), but
    encodes a whole batch in one call.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.mask_id = tok.token_to_id(MASK_TOKEN)
        self.eos_id = tok.token_to_id(EOS_TOKEN)
        self.vocab_size = tok.get_vocab_size()

    @staticmethod
    def chat_text(user_text: str) -> str:
        return (
            f"{BOS_TOKEN}<|start_header_id|>user<|end_header_id|>\n\n{user_text.strip()}{EOT_TOKEN}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )

    def prompt_ids(self, user_texts: Sequence[str]) -> list[list[int]]:
        encodings = self.tok.encode_batch([self.chat_text(t) for t in user_texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a completion: up to the first end-of-sequence, special tokens dropped."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)
