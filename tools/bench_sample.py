"""Sampling speed of a randomly initialised GPT-2 small (124M), with and without the KV cache.

    python tools/bench_sample.py                       # batch 1 and 8, 128 new tokens
    python tools/bench_sample.py --batch_sizes=1 --max_new_tokens=256 --no_cache_max_new_tokens=64

Each generated position is timed on its own (sample.stream syncs on every token), so the table
shows the cost per token against how many tokens came before: flat with the cache (one fixed-shape
step over a block_size cache), growing without it (the whole window is recomputed; the window is
padded to a power of two, so the cost grows in steps). Medians per range drop the compilation
spikes (the first token of a run, and of each new window size without the cache).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nanojaxgpt import sample
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.model import GPT, num_params


def time_tokens(model: GPT, batch: int, n_new: int, args: argparse.Namespace, use_cache: bool) -> np.ndarray:
    """Seconds spent on each new position (all `batch` rows at once)."""
    prompt = list(range(1, args.prompt_tokens + 1))
    times, start = [], time.perf_counter()
    for _ in sample.stream(model, prompt, max_new_tokens=n_new, num_samples=batch,
                           temperature=args.temperature, top_k=args.top_k, seed=0, use_cache=use_cache):
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return np.asarray(times)


def ranges(n: int, width: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + width - 1, n)) for lo in range(1, n + 1, width)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--no_cache_max_new_tokens", type=int, default=None, help="default: max_new_tokens")
    p.add_argument("--range_width", type=int, default=32, help="tokens per row of the table")
    p.add_argument("--prompt_tokens", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    cfg = ModelConfig(compute_dtype=args.compute_dtype)  # GPT-2 small: 12 x 768, block 1024
    model = jax.jit(lambda k: GPT(cfg, key=k))(jax.random.key(0))
    print(f"GPT-2 small, {num_params(model) / 1e6:.1f}M parameters, random init, {args.compute_dtype}, "
          f"{jax.devices()[0].device_kind}, prompt {args.prompt_tokens} token(s), top_k {args.top_k}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for use_cache in (True, False):
            n = args.max_new_tokens if use_cache else (args.no_cache_max_new_tokens or args.max_new_tokens)
            t = time_tokens(model, batch, n, args, use_cache)
            per = {r: 1e3 * float(np.median(t[r[0] - 1:r[1]])) for r in ranges(n, args.range_width)}
            steady = 1e3 * float(np.median(t[1:]))
            name = "KV cache" if use_cache else "no cache"
            print(f"\nbatch {batch}, {name}: first token {t[0]:.2f} s (prefill + compile); "
                  f"median {steady:.1f} ms/step = {batch * 1e3 / steady:.0f} tokens/s")
            for (lo, hi), ms in per.items():
                print(f"  tokens {lo:4d}-{hi:<4d} {ms:8.1f} ms/step  {batch * 1e3 / ms:8.1f} tokens/s")


if __name__ == "__main__":
    main()
