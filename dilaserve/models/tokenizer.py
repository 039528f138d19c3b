"""Tokenizers: loading a checkpoint's tokenizer, and building the project's own.

The project's small models use a byte-level tokenizer (every UTF-8 byte is a token, plus
LLaDA-style special tokens), optionally with BPE merges learned on the task corpus. It is
saved as ``tokenizer.json`` + ``tokenizer_config.json`` (with a chat template), the same files
a published LLaDA checkpoint carries, so one loader serves both.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# LLaDA's special tokens; the mask token is what the diffusion process predicts.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, "<|start_header_id|>", "<|end_header_id|>", EOT_TOKEN]

# The chat format of LLaDA-8B-Instruct: header-delimited turns, each closed by <|eot_id|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_byte_tokenizer(merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """Byte-level BPE: 256 byte tokens (+ learned merges), special tokens appended after."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for a, b in merges or []:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges or [])))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> dict[str, int]:
    """Writes tokenizer.json and tokenizer_config.json; returns the special token ids."""
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def load_tokenizer(directory: str | Path):
    """A transformers fast tokenizer for ``directory``, or None if it ships none.

    Reads ``tokenizer.json`` directly (no remote code); the chat template and special tokens
    come from ``tokenizer_config.json`` when present.
    """
    directory = Path(directory)
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special = {
        key: _token_text(config[key])
        for key in ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")
        if config.get(key)
    }
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **special)
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer


def _token_text(value) -> str:
    # Published configs store special tokens either as text or as AddedToken dicts.
    return value["content"] if isinstance(value, dict) else value
