"""Tokenizers: char-level round trip and vocabulary, GPT-2 ids as OpenAI's, rebuilt from meta.json."""

import jax.numpy as jnp
import numpy as np
import pytest

from nanojaxgpt import tokenizer


def test_char_tokenizer_matches_nanogpt(shakespeare_text):
    tok = tokenizer.CharTokenizer.from_text(shakespeare_text)
    chars = sorted(set(shakespeare_text))
    assert tok.vocab_size == 65 and tok.itos == tuple(chars) and tok.eot is None
    stoi = {c: i for i, c in enumerate(chars)}  # nanoGPT's encode
    head = shakespeare_text[:5000]
    assert tok.encode(head) == [stoi[c] for c in head]
    assert tok.decode(tok.encode(head)) == head
    ids = tok.encode_array(shakespeare_text)
    assert ids.shape == (len(shakespeare_text),) and ids.min() == 0 and ids.max() == 64


def test_char_tokenizer_any_order_and_errors():
    tok = tokenizer.CharTokenizer(["z", "a", "é"])  # vocabulary not in code point order
    assert tok.encode("aéz") == [1, 2, 0]
    assert tok.decode([0, 1, 2]) == "zaé"
    with pytest.raises(ValueError, match=r"\['q'\].*3-character"):
        tok.encode("aqa")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([3])
    with pytest.raises(ValueError, match="distinct single characters"):
        tokenizer.CharTokenizer(["a", "a"])


def test_gpt2_tokenizer():
    tok = tokenizer.get("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.vocab_size == 50257 and tok.eot == 50256
    # A prompt may contain the separator; a document's literal text never becomes it.
    assert tok.encode("a<|endoftext|>")[-1] == 50256
    assert 50256 not in tok.encode_documents(["a<|endoftext|>"])[0]
    assert tok.encode_documents(["Hello world", "Hello"]) == [[15496, 995], [15496]]
    # decode takes what a model returns: NumPy (any integer dtype) or JAX arrays.
    assert tok.decode(np.array([15496, 995], dtype=np.uint16)) == "Hello world"
    assert tok.decode(jnp.array([[15496, 995]], dtype=jnp.int32)) == "Hello world"


def test_get_by_name():
    assert tokenizer.get("char", itos=list("ab")).encode("ba") == [1, 0]
    with pytest.raises(ValueError, match="needs its vocabulary"):
        tokenizer.get("char")
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        tokenizer.get("bpe")
    assert np.array_equal(tokenizer.CharTokenizer(list("ab")).encode_array(""), [])
