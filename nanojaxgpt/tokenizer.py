"""Tokenizers behind one small interface: character-level (shakespeare_char) and GPT-2 BPE (tiktoken).

    tok = tokenizer.get("gpt2")              # or tokenizer.get("char", itos=[...])
    tok.encode("Hello world") == [15496, 995]
    tok.decode([15496, 995]) == "Hello world"
    tok.vocab_size, tok.eot                  # eot is None for the char tokenizer

A prepared data directory records which one it used (meta.json); `data.tokenizer(data_dir)` rebuilds it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import numpy as np
from jaxtyping import Int, Integer

# What decode() takes: a list of ints, or an integer NumPy / JAX array (flattened).
TokenIds = Sequence[int] | Integer[np.ndarray, "..."] | Integer[jax.Array, "..."]
GPT2_EOT = 50256  # "<|endoftext|>", the last of GPT-2's 50257 tokens


@runtime_checkable  # the tests type-check return values at run time (beartype)
class Tokenizer(Protocol):
    name: str  # "char" or "gpt2", as written in meta.json
    vocab_size: int
    eot: int | None  # token that ends each document, None when documents are not separated

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: TokenIds) -> str: ...


class CharTokenizer:
    """One token per character; ids are positions in `itos` (nanoGPT's sorted set of the text)."""

    name = "char"
    eot = None

    def __init__(self, itos: Sequence[str]):
        bad = [c for c in itos if len(c) != 1]
        if bad or len(set(itos)) != len(itos):
            raise ValueError(f"char vocabulary must be distinct single characters; got {bad or list(itos)!r}")
        self.itos = tuple(itos)
        self.vocab_size = len(self.itos)
        # Sorted code points -> ids, so encode_array() is one np.searchsorted over the whole text.
        points = np.array([ord(c) for c in self.itos], dtype=np.uint32)
        self._order = np.argsort(points)
        self._sorted_points = points[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> Int[np.ndarray, " n"]:
        """The ids of every character of `text`, vectorised (the whole of tiny shakespeare in ms)."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_points, points)
        pos = np.minimum(pos, len(self._sorted_points) - 1)
        unknown = self._sorted_points[pos] != points
        if unknown.any():
            missing = sorted({chr(p) for p in points[unknown]})
            raise ValueError(f"characters {missing!r} are not in this {self.vocab_size}-character vocabulary")
        return self._order[pos].astype(np.int64)

    def decode(self, ids: TokenIds) -> str:
        ids = _as_list(ids)
        try:
            return "".join(self.itos[i] for i in ids)
        except IndexError:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got {max(ids)}") from None


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-pair encoding from tiktoken; documents are separated by <|endoftext|>."""

    name = "gpt2"
    eot = GPT2_EOT

    def __init__(self):
        self._enc = _tiktoken_gpt2()
        self.vocab_size = self._enc.n_vocab  # 50257

    def encode(self, text: str) -> list[int]:
        # A prompt may name the separator itself, as in nanoGPT's sample.py.
        return self._enc.encode(text, allowed_special={"<|endoftext|>"})

    def encode_documents(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Each text as ordinary text (a literal "<|endoftext|>" in a document is not the separator)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: TokenIds) -> str:
        return self._enc.decode(_as_list(ids))


def _as_list(ids: TokenIds) -> list[int]:
    """Python ints from a list, a NumPy or a JAX array (any shape is flattened)."""
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


@functools.cache
def _tiktoken_gpt2():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors when it cannot download
        raise RuntimeError(
            "could not load tiktoken's 'gpt2' files: tiktoken downloads them on first use (needs "
            "internet once), or set TIKTOKEN_CACHE_DIR to a folder that already holds them. "
            f"Cause: {type(e).__name__}: {e}") from e


def get(name: str, itos: Sequence[str] | None = None) -> Tokenizer:
    """The tokenizer called `name` in meta.json ("char" needs its `itos`)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if not itos:
            raise ValueError("the char tokenizer needs its vocabulary (itos)")
        return CharTokenizer(itos)
    raise ValueError(f"unknown tokenizer {name!r}; known: 'char', 'gpt2'")
