"""HellaSwag scoring speed of a randomly initialised GPT-2 small (124M) on this machine.

    python tools/bench_hellaswag.py --examples=64                   # synthetic, HellaSwag-sized
    python tools/bench_hellaswag.py --hellaswag_file=hellaswag_val.jsonl --examples=500

Synthetic examples have HellaSwag's shape (a context and 4 endings of words drawn at random,
lengths in the validation set's range), so no download is needed; the accuracy of a random model
means nothing, only the time. The first call compiles (one program per padded window); the second
is timed and extrapolated to the 10,042 examples of the validation set.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nanojaxgpt import hellaswag, tokenizer
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.model import GPT, num_params

WORDS = ("the man woman dog ball kitchen field then starts is are runs holds puts takes bowl "
         "water camera rope slowly quickly shows talks around them while another person").split()


def synthetic(n: int, seed: int = 0) -> list[hellaswag.Example]:
    rng = np.random.default_rng(seed)
    text = lambda lo, hi: " ".join(rng.choice(WORDS, rng.integers(lo, hi)))  # noqa: E731
    return [hellaswag.Example(text(10, 60) + ".", tuple(text(5, 35) + "." for _ in range(4)),
                              int(rng.integers(4))) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--hellaswag_file", default=None, help="score the real file's first examples")
    p.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens_per_device", type=int, default=4096)
    args = p.parse_args()
    model = jax.jit(lambda k: GPT(ModelConfig(compute_dtype=args.compute_dtype), key=k))(jax.random.key(0))
    examples = (hellaswag.read_examples(args.hellaswag_file, args.examples) if args.hellaswag_file
                else synthetic(args.examples))
    tok = tokenizer.get("gpt2")
    tokens = sum(len(t) for e in examples for t, _ in hellaswag.render(e, tok, 1024))
    print(f"GPT-2 small, {num_params(model) / 1e6:.1f}M parameters, random init, {args.compute_dtype}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; {len(examples)} examples, "
          f"{tokens} tokens in their {4 * len(examples)} rows")
    for label in ("first (compiles)", "second"):
        start = time.perf_counter()
        summary = hellaswag.summarize(hellaswag.score(model, examples, tok,
                                                      tokens_per_device=args.tokens_per_device))
        took = time.perf_counter() - start
        print(f"{label}: {took:.2f} s, {len(examples) / took:.1f} examples/s, {tokens / took:,.0f} "
              f"tokens/s; the 10,042 validation examples at this rate: "
              f"{hellaswag.VAL_EXAMPLES / len(examples) * took / 60:.1f} min ({summary.line()})")


if __name__ == "__main__":
    main()
