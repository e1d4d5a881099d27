"""Generate text from a GPT: with a KV cache (default) or by recomputing the window each token.

    python -m nanojaxgpt.sample --init_from=gpt2 --start="Hello, I'm a language model," \
        --num_samples=5 --max_new_tokens=100 --temperature=0.8 --top_k=200 --seed=1337

--init_from: a GPT-2 name (gpt2 ... gpt2-xl), a Hugging Face directory, a run directory (local or
gs://), or "resume" (the run in --out_dir, as in nanoGPT). --start=FILE:prompt.txt reads the prompt
from a file. --temperature=0 is greedy decoding. All samples of one call run as one batch.

Cached path: the prompt is prefilled once (padded to a power of two, so a handful of compilations
cover every prompt length), then each token is one jitted decode step at a traced position. When
prompt + generated text outgrows block_size, each further token re-prefills the cache from the last
block_size tokens: exactly nanoGPT's crop (positions restart at 0 in the window), at the cost of a
full forward per token. The no-cache path recomputes the (power-of-two padded) window every token.
Both draw token i of a run with the key fold_in(key(seed), i), so they produce the same text.
"""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from nanojaxgpt import kvcache, storage
from nanojaxgpt.cli import one_line, split_debug
from nanojaxgpt.model import GPT, with_runtime

_MIN_WINDOW = 16  # smallest padded window: tiny prompts share one compilation


class PromptError(ValueError):
    """A prompt the model cannot take: empty, longer than its context, or outside its vocabulary."""


def kth_largest(logits: Float[Array, "B V"], k: int | Int[Array, ""]) -> Float[Array, "B"]:
    """Each row's k-th largest value, exactly, by bisection on the bits of float32.

    lax.top_k sorts the row on XLA:CPU (a quarter of a GPT-2 decode step); 32 halvings of the
    uint32 range, each one counting pass over the row, cost a twentieth of that (README:
    'Measurements behind the code').
    """
    bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
    # An order-preserving map float32 -> uint32: negatives flip every bit, positives the sign bit.
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))

    def halve(_, bounds):  # invariant: the answer is in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # upper middle, without overflowing uint32
        enough = jnp.sum(key >= mid[:, None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo = jnp.zeros(logits.shape[:1], jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, jnp.full_like(lo, 0xFFFFFFFF)))
    return jax.lax.bitcast_convert_type(jnp.where(lo >> 31 == 1, lo & 0x7FFFFFFF, ~lo), jnp.float32)


def choose(logits: Float[Array, "B V"], key: PRNGKeyArray, temperature: float | Float[Array, ""],
           top_k: int | Int[Array, ""] | None, *, greedy: bool = False) -> Int[Array, "B"]:
    """The next token of each row: the argmax when greedy, else a draw from softmax(logits / T)
    restricted to the logits >= the top_k-th largest (nanoGPT's rule; ties all stay).
    Padding logits (float32's minimum) are never drawn."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = jnp.where(logits < kth_largest(logits, top_k)[:, None], -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


# Only greedy-or-not is static: temperature and top_k are traced, so one compilation serves all
# values (top_k=None, no filtering, is a different pytree and compiles once more).
_STATIC = ("greedy",)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_choose(dec: kvcache.Decoder, window: Array, last: Array, key: Array, i: Array, *,
                    temperature: Array, top_k: Array | None, greedy: bool) -> tuple[Array, kvcache.KVCache]:
    step = kvcache.prefill(dec, window, last)
    return choose(step.logits, jax.random.fold_in(key, i), temperature, top_k, greedy=greedy), step.cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def _decode_choose(dec: kvcache.Decoder, cache: kvcache.KVCache, tokens: Array, pos: Array,
                   key: Array, i: Array, *, temperature: Array, top_k: Array | None,
                   greedy: bool) -> tuple[Array, kvcache.KVCache]:
    step = kvcache.decode(dec, tokens, pos, cache)
    return choose(step.logits, jax.random.fold_in(key, i), temperature, top_k, greedy=greedy), step.cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def _window_choose(model: GPT, window: Array, last: Array, key: Array, i: Array, *,
                   temperature: Array, top_k: Array | None, greedy: bool) -> Array:
    x = jax.vmap(lambda idx: model.hidden(idx, inference=True))(window)
    logits = jax.vmap(model.head)(x[:, last][:, None])[:, 0]
    return choose(logits, jax.random.fold_in(key, i), temperature, top_k, greedy=greedy)


def padded_window(n: int, block_size: int) -> int:
    """Window length for n tokens: the next power of two (at least 16), at most block_size."""
    return min(block_size, max(_MIN_WINDOW, 1 << (n - 1).bit_length()))


def stream(model: GPT, prompt: Sequence[int], *, max_new_tokens: int, num_samples: int = 1,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
           use_cache: bool = True) -> Iterator[np.ndarray]:
    """The new tokens one position at a time: max_new_tokens arrays of [num_samples] int32.

    Bad arguments raise here, at the call, not at the first next().
    """
    cfg = model.config
    if len(prompt) == 0:
        raise PromptError("the prompt is empty; give at least one token (e.g. --start='\\n')")
    if len(prompt) > cfg.block_size:
        raise PromptError(f"the prompt is {len(prompt)} tokens, longer than the model's context "
                                 f"(block_size={cfg.block_size}); shorten it")
    if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
        raise PromptError(f"prompt token ids must be in [0, {cfg.vocab_size}) for this model; "
                          f"got {min(prompt)}..{max(prompt)} (a tokenizer of another model?)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    # 0, None, or at least the vocabulary: no filter (as nanoGPT's min(top_k, vocab)).
    filtered = top_k is not None and 0 < top_k < cfg.vocab_size
    opts = dict(temperature=jnp.float32(temperature), greedy=temperature == 0,
                top_k=jnp.int32(top_k) if filtered else None)
    return _stream(model, list(prompt), max_new_tokens, num_samples, jax.random.key(seed), use_cache, opts)


def _stream(model: GPT, prompt: list[int], max_new_tokens: int, num_samples: int, key: Array,
            use_cache: bool, opts: dict) -> Iterator[np.ndarray]:
    # The portable kernel for any window length and dtype: splash wants 128-token tiles, cuDNN
    # bf16/fp16 on a GPU, and a run directory keeps the kernel it was trained with.
    if model.config.attention != "xla":
        model = with_runtime(model, attention="xla")
    block_size = model.config.block_size
    dec = kvcache.decoder(model) if use_cache else None
    tokens = np.zeros((num_samples, len(prompt) + max_new_tokens), np.int32)
    tokens[:, :len(prompt)] = prompt
    cache = tok = None
    for i in range(max_new_tokens):
        n = len(prompt) + i  # tokens known; the next one is predicted from position n - 1
        if use_cache and 0 < i and n <= block_size:
            tok, cache = _decode_choose(dec, cache, tok, jnp.int32(n - 1), key, jnp.int32(i), **opts)
        else:
            start = max(0, n - block_size)  # nanoGPT's crop to the last block_size tokens
            window = np.zeros((num_samples, padded_window(n - start, block_size)), np.int32)
            window[:, :n - start] = tokens[:, start:n]
            args = (jnp.asarray(window), jnp.int32(n - start - 1), key, jnp.int32(i))
            if use_cache:
                tok, cache = _prefill_choose(dec, *args, **opts)
            else:
                tok = _window_choose(model, *args, **opts)
        tokens[:, n] = np.asarray(tok)
        yield tokens[:, n]


def generate(model: GPT, prompt: Sequence[int], *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
             use_cache: bool = True) -> np.ndarray:
    """[num_samples, len(prompt) + max_new_tokens] int32 tokens: the prompt, then the samples."""
    new = list(stream(model, prompt, max_new_tokens=max_new_tokens, num_samples=num_samples,
                      temperature=temperature, top_k=top_k, seed=seed, use_cache=use_cache))
    head = np.broadcast_to(np.asarray(prompt, np.int32), (num_samples, len(prompt)))
    return np.concatenate([head] + [t[:, None] for t in new], axis=1)


class Loaded(NamedTuple):
    model: GPT
    tokenizer: Any  # .encode(str) -> list[int], .decode(list[int]) -> str
    run_config: Any = None  # a run directory's resolved config.Config; None for GPT-2 weights


def model_and_tokenizer(init_from: str, out_dir: str = "out") -> Loaded:
    """A model and its tokenizer from a GPT-2 name, a Hugging Face directory, or a run directory."""
    from nanojaxgpt import hf, tokenizer

    if init_from == "resume":
        init_from = out_dir
    if not storage.is_gcs(init_from) and Path(init_from).exists():
        init_from = storage.absolute(init_from)  # Orbax reads absolute paths only
    if init_from in hf.GPT2_NAMES or hf.is_hf_dir(init_from) or not (
            storage.is_gcs(init_from) or Path(init_from).is_dir()):
        model = hf.load(init_from)
        return Loaded(model, tokenizer.get("gpt2"))
    from nanojaxgpt import data, saved  # a run directory written by train.py

    model, run_config = saved.load_model(init_from)
    return Loaded(model, data.tokenizer(run_config.data.data_dir), run_config)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanojaxgpt.sample", description=__doc__.split("\n")[0])
    p.add_argument("--init_from", default="gpt2", help="GPT-2 name, Hugging Face dir, run dir, or resume")
    p.add_argument("--out_dir", default="out", help="the run directory for --init_from=resume")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="0 = no top-k")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (weights stay float32)")
    p.add_argument("--use_cache", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for name, minimum in (("num_samples", 1), ("max_new_tokens", 1), ("top_k", 0)):
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= {minimum}")
    if not args.temperature >= 0:  # also NaN
        raise ValueError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    try:
        _check_args(args)
        start = args.start
        if start.startswith("FILE:"):
            try:
                start = Path(start[5:]).read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"--start={args.start}: cannot read the prompt file ({e.strerror})") from e
        loaded = model_and_tokenizer(args.init_from, args.out_dir)
        model = with_runtime(loaded.model, compute_dtype=args.dtype)
        vocab = getattr(loaded.tokenizer, "vocab_size", None)
        if vocab is not None and vocab > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} tokens but the model only "
                             f"{model.config.vocab_size}: they do not belong together")
        out = generate(model, loaded.tokenizer.encode(start), max_new_tokens=args.max_new_tokens,
                       num_samples=args.num_samples, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed, use_cache=args.use_cache)
        for row in out:  # nanoGPT's format: each sample in full, then a line of dashes
            print(loaded.tokenizer.decode(row.tolist()))
            print("---------------")
    except (ValueError, OSError, RuntimeError) as e:  # bad input: a message, not a traceback
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
