"""Which windows of a split a run reads, and in what order: the samplers, as pure functions.

A sample is one window of block_size+1 tokens (x = window[:-1], y = window[1:]). The samples of
a run are numbered 0, 1, 2, ... in the order it reads them; row r of step s is sample

    i = origin.sample + (s - origin.step) * rows + r

where origin is the (step, sample) the run segment started from: (0, 0) for a fresh run, the
checkpoint's for a resumed one. So a run resumed with another batch_size or
gradient_accumulation_steps goes on with sample origin.sample, the first one not read yet. A
sample's window is a pure function of (seed, split, i), with no iterator state:

  "random"   nanoGPT's: a window at offset hash(seed, split, i) % (n_tokens - block_size), drawn
             with replacement (a pass of n windows reads ~63% of them, some twice).
  "epoch"    llm.c's: the split cut into n = (n_tokens - 1) // block_size consecutive windows,
             window k at offset k * block_size (each overlapping the next by one token). Epoch
             e = i // n reads every window once, in an order shuffled by (seed, split, e).
  "in_order" window i % n of the same cut, unshuffled: the evaluation set of an "epoch" run
             (llm.c evaluates the first windows of the val split).

llm.c shuffles its shards and the windows within each shard; "epoch" shuffles across the whole
split, so a window never waits for its shard's turn.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import grain
import numpy as np
from jaxtyping import Int

from nanojaxgpt.data import DataError, Meta, Tokens

SAMPLINGS = ("random", "epoch", "in_order")


class Origin(NamedTuple):
    """The step a run segment starts at, and the number of samples read before it."""
    step: int = 0
    sample: int = 0


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection on uint64 whose outputs look independent of the inputs."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _stream_key(seed: int, split: str) -> np.uint64:
    """64-bit key of (seed, split): train and val never share offsets for the same seed."""
    split_bits = int.from_bytes(hashlib.blake2b(split.encode(), digest_size=8).digest(), "little")
    return _mix64(np.array([(seed & (2**64 - 1)) ^ split_bits], dtype=np.uint64))[0]


class Batches:
    """Step-indexed global batches of `rows` windows of block_size+1 tokens from one split.

    `read(step, rows)` returns the given rows of that step's global batch, each host asking only
    for its own rows. A fixed evaluation set is step 0 of a batch of eval_iters x batch_size rows.
    """

    def __init__(self, data_dir: str | Path, split: str, *, block_size: int, rows: int, seed: int,
                 sampling: str = "random", origin: Origin = Origin(), meta: Meta | None = None,
                 io_threads: int | None = None, read_timeout_s: float | None = None):
        if block_size < 1 or rows < 1:
            raise ValueError(f"block_size={block_size} and rows={rows} must be positive")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if origin.step < 0 or origin.sample < 0:
            raise ValueError(f"origin={origin} must not be negative")
        self.tokens = Tokens(data_dir, split, meta, io_threads, read_timeout_s)
        self.split, self.block_size, self.rows, self.seed = split, block_size, rows, seed
        self.sampling, self.origin = sampling, origin
        self.window = block_size + 1
        n_tokens = self.tokens.n_tokens
        # random: offsets 0 .. n_tokens - block_size - 1, as nanoGPT's torch.randint(len(data) - block_size);
        # epoch: window k holds tokens [k * block_size, (k + 1) * block_size] (block_size + 1 of them).
        self.n_windows = n_tokens - block_size if sampling == "random" else (n_tokens - 1) // block_size
        if self.n_windows < 1:
            raise DataError(f"split {split!r} of {data_dir} has {n_tokens} tokens, too few "
                            f"for one window of block_size+1={self.window}; use a smaller block_size "
                            f"or more data")
        self._key = key = _stream_key(seed, split)
        if sampling == "epoch":
            if self.n_windows > 2**32:  # grain's index shuffle permutes 32-bit indices
                raise DataError(f"split {split!r} of {data_dir} has {self.n_windows:,} windows of "
                                f"{self.window} tokens, more than sampling='epoch' can shuffle "
                                f"(2**32); use a larger block_size or sampling='random'")
            # grain's stateless shuffle: element i of epoch e = i // n is a permutation of that
            # epoch's n windows under the seed (seed + e), so every epoch has its own order.
            self._order = grain.MapDataset.range(self.n_windows).shuffle(seed=int(key) % 2**32)

    def samples(self, step: int | np.integer, rows: Sequence[int] | np.ndarray) -> Int[np.ndarray, " n"]:
        """The sample numbers of the given rows of step `step`."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        first = self.consumed(step)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows must be in [0, {self.rows}) (rows= of this Batches); got "
                             f"{rows[(rows < 0) | (rows >= self.rows)][:4].tolist()}")
        return first + rows

    def sample_offsets(self, samples: Int[np.ndarray, " n"]) -> Int[np.ndarray, " n"]:
        """Start offsets in the token stream of the windows of these sample numbers."""
        samples = np.asarray(samples, dtype=np.int64)
        if self.sampling == "random":
            h = _mix64(_mix64(samples.astype(np.uint64)) ^ self._key)
            # Modulo bias is below n_windows / 2**64: nil for any real corpus.
            return (h % np.uint64(self.n_windows)).astype(np.int64)
        if self.sampling == "epoch":
            windows = np.array([self._order[int(i)] for i in samples.tolist()], dtype=np.int64)
        else:
            windows = samples % self.n_windows
        return windows * self.block_size

    def offsets(self, step: int | np.integer, rows: Sequence[int] | np.ndarray) -> Int[np.ndarray, " n"]:
        """Start offsets in the token stream of the given rows of step `step` (pure function)."""
        return self.sample_offsets(self.samples(step, rows))

    def consumed(self, step: int | np.integer) -> int:
        """How many samples the run has read before `step`: the data position a checkpoint of
        `step` keeps (Origin(step, consumed(step)) goes on where this run stops)."""
        if step < self.origin.step:
            raise IndexError(f"step={step} is before this run segment's first step {self.origin.step}")
        return self.origin.sample + (int(step) - self.origin.step) * self.rows

    def read(self, step: int | np.integer, rows: Sequence[int] | np.ndarray) -> Int[np.ndarray, "n window"]:
        """int32 [len(rows), block_size+1]: rows `rows` of the global batch of step `step`."""
        return self.tokens.windows(self.offsets(step, rows), self.window)

    def iterate(self, start_step: int | np.integer, rows: Sequence[int] | np.ndarray, *, threads: int = 4,
                buffer: int = 8) -> Iterator[np.ndarray]:
        """read(start_step, rows), read(start_step + 1, rows), ... endlessly, read ahead by grain.

        Up to `buffer` steps are read ahead on `threads` threads (raise both for gs://, where
        each record read waits on the network). Call `.close()` on the iterator to stop early.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.offsets(start_step, rows)  # validate now, not in a background thread
        steps = grain.MapDataset.range(start_step, sys.maxsize)
        ds = steps.map(lambda step: self.read(step, rows))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                         prefetch_buffer_size=buffer)))


def eval_set(data_dir: str | Path, split: str, *, block_size: int, batch_size: int,
             eval_iters: int, seed: int, sampling: str, meta: Meta | None = None,
             read_timeout_s: float | None = None) -> Batches:
    """A run's fixed evaluation windows of a split: step 0 of eval_iters x batch_size rows (the
    window of row r is sample r). A "random" run draws them as nanoGPT does, with seed + 1; an
    "epoch" run reads the split's first windows in order, as llm.c does."""
    return Batches(data_dir, split, block_size=block_size, rows=eval_iters * batch_size,
                   seed=seed + 1, sampling="random" if sampling == "random" else "in_order",
                   meta=meta, read_timeout_s=read_timeout_s)
