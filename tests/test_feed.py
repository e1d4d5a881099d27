"""feed.py: batches read ahead in order, a failed read raised at its step, a stalled one timed out."""

import threading
import time

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


def test_a_stalled_read_is_an_error_within_the_timeout():
    release = threading.Event()

    def make(step):
        if step == 1:
            release.wait(30)  # storage that does not answer
        return jnp.int32(step)

    feed = Feed(make, start=0, stop=3, depth=2, timeout_s=0.5, source="gs://bucket/data")
    try:
        assert int(feed.get(0)) == 0
        t0 = time.monotonic()
        with pytest.raises(DataError, match=r"batch of step 1 from gs://bucket/data took more "
                                            r"than 0.5 s \(data.read_timeout_s\)"):
            feed.get(1)
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        feed.close()


def test_a_read_that_raises_timeout_error_itself_is_not_called_stalled():
    def make(step):
        raise TimeoutError("the library's own timeout")

    feed = Feed(make, start=0, stop=1, timeout_s=10.0)
    try:
        time.sleep(0.1)
        with pytest.raises(TimeoutError, match="the library's own timeout"):
            feed.get(0)
    finally:
        feed.close()
