"""feed.py: batches read ahead in order, each once, and a failed read raised at its own step."""

import threading

import jax.numpy as jnp
import pytest

from nanojaxgpt.data import DataError
from nanojaxgpt.feed import Feed


def test_reads_ahead_by_depth_and_in_order():
    asked = []
    lock = threading.Lock()

    def make(step):
        with lock:
            asked.append(step)
        return jnp.int32(step * 10)

    feed = Feed(make, start=3, stop=9, depth=2, threads=1)
    try:
        assert [int(feed.get(s)) for s in range(3, 9)] == [30, 40, 50, 60, 70, 80]
    finally:
        feed.close()
    assert sorted(asked) == list(range(3, 9))  # each step read once, none past stop
    with pytest.raises(ValueError, match="depth=0"):
        Feed(make, start=0, stop=1, depth=0)


def test_a_failed_read_raises_in_get_of_its_step():
    def make(step):
        if step == 2:
            raise DataError("shard damaged")
        return jnp.int32(step)

    feed = Feed(make, start=0, stop=4, depth=4)
    try:
        assert int(feed.get(0)) == 0 and int(feed.get(1)) == 1
        with pytest.raises(DataError, match="shard damaged"):
            feed.get(2)
    finally:
        feed.close()
