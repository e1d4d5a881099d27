"""The global batches of the coming steps, read and placed on the devices ahead, on background threads.

    feed = Feed(make_batch, start=s0, stop=max_iters, depth=4)
    for step in range(s0, max_iters):
        state, out = train(state, feed.get(step))   # step's batch was read while earlier steps ran

`make_batch(step)` must be a pure function of the step (batches.Batches.read is): reading ahead never
changes which batch a step gets, so a resumed run stays bitwise the same. A read that fails raises
in `get` of its step, in the training thread. Reads of gs:// data wait on the network; `depth`
steps of them are in flight at once, each with its own record reads in parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import jax


class Feed:
    def __init__(self, make_batch: Callable[[int], jax.Array], *, start: int, stop: int,
                 depth: int = 4, threads: int = 2) -> None:
        if depth < 1 or threads < 1:
            raise ValueError(f"depth={depth} and threads={threads} must be >= 1")
        self._make, self._stop, self._depth = make_batch, stop, depth
        self._next = start  # the next step to submit
        self._futures: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nanojaxgpt-feed")
        self._fill(start)

    def _fill(self, step: int) -> None:
        while self._next < min(step + self._depth, self._stop):
            self._futures[self._next] = self._pool.submit(self._make, self._next)
            self._next += 1

    def get(self, step: int) -> jax.Array:
        """The batch of `step`; steps are asked for in order, each once."""
        if step not in self._futures:
            raise KeyError(f"step {step} was not read ahead (next in order: {min(self._futures, default=self._next)})")
        self._fill(step + 1)
        return self._futures.pop(step).result()

    def close(self) -> None:
        """Drop what was read ahead (after the last step, or when the loop stops early)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
