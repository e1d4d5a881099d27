"""The samplers: an epoch reads every window once, a resumed run goes on with the next unread
window whatever its batch size, hosts read only their rows, and evaluation sets are fixed."""

import numpy as np
import pytest

from nanojaxgpt import batches, prepare

BLOCK = 16


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A char-level split of 6,000 train tokens: 374 windows of 17 tokens, a few shards."""
    d = tmp_path_factory.mktemp("small")
    text = "".join(chr(97 + (i * 7919) % 26) for i in range(6_000 * 10 // 9 + 1))
    prepare.prepare_char(text, str(d), record_size=64, shard_tokens=1024)
    b = batches.Batches(d, "train", block_size=BLOCK, rows=1, seed=0)
    return d, b.tokens.windows(np.array([0]), b.tokens.n_tokens)[0]


def _windows(b, steps, rows=None):
    return np.concatenate([b.offsets(s, range(b.rows) if rows is None else rows) for s in steps])


def test_an_epoch_reads_every_window_once_in_an_order_new_each_epoch(small):
    d, stream = small
    b = batches.Batches(d, "train", block_size=BLOCK, rows=10, seed=3, sampling="epoch")
    n = b.n_windows
    assert n == (len(stream) - 1) // BLOCK
    offsets = _windows(b, range(2 * n // 10 + 1))  # a little over two epochs, batches straddling them
    first, second = offsets[:n], offsets[n:2 * n]
    assert sorted(first) == sorted(second) == [k * BLOCK for k in range(n)]  # each window once
    assert not np.array_equal(first, second)  # in a new order
    # Consecutive windows overlap by one token: the last target of window k is window k+1's first input.
    tokens = b.tokens.windows(np.sort(first), BLOCK + 1)
    assert np.array_equal(tokens[:-1, -1], tokens[1:, 0])
    assert np.array_equal(np.concatenate([tokens[0], *[w[1:] for w in tokens[1:]]]),
                          stream[:n * BLOCK + 1])
    assert not np.array_equal(batches.Batches(d, "train", block_size=BLOCK, rows=10, seed=4,
                                              sampling="epoch").offsets(0, range(10)), offsets[:10])


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_a_resumed_run_with_another_batch_reads_the_next_unread_windows(small, sampling):
    """12 rows a step for 7 steps, then (resumed from the checkpoint of step 7) 20 rows a step:
    the run reads sample 84 next, so together the two segments read exactly the windows of one
    uninterrupted stream of samples, nothing twice, nothing skipped."""
    d, _ = small
    before = batches.Batches(d, "train", block_size=BLOCK, rows=12, seed=5, sampling=sampling)
    origin = batches.Origin(7, before.consumed(7))
    assert origin == (7, 84)
    after = batches.Batches(d, "train", block_size=BLOCK, rows=20, seed=5, sampling=sampling,
                            origin=origin)
    read = np.concatenate([_windows(before, range(7)), _windows(after, range(7, 40))])
    one_stream = batches.Batches(d, "train", block_size=BLOCK, rows=1, seed=5, sampling=sampling)
    assert np.array_equal(read, one_stream.sample_offsets(np.arange(len(read))))
    assert after.samples(7, [0]).item() == 84 and after.consumed(40) == 84 + 33 * 20
    if sampling == "epoch":  # the first epoch, across the change, reads each window once
        n = after.n_windows
        assert sorted(read[:n]) == [k * BLOCK for k in range(n)]
    with pytest.raises(IndexError, match="step=6 is before this run segment's first step 7"):
        after.offsets(6, [0])


def test_hosts_read_only_their_rows_of_an_epoch_batch(small):
    d, _ = small
    b = batches.Batches(d, "train", block_size=BLOCK, rows=8, seed=0, sampling="epoch")
    whole = b.read(41, range(8))  # step 41 straddles the first epoch's end (374 windows)
    assert np.array_equal(np.concatenate([b.read(41, [0, 1, 2, 3]), b.read(41, [4, 5, 6, 7])]), whole)
    assert np.array_equal(b.read(41, [6, 2]), whole[[6, 2]])


def test_evaluation_sets(small):
    d, _ = small
    nanogpt = batches.eval_set(d, "val", block_size=BLOCK, batch_size=4, eval_iters=3, seed=1,
                               sampling="random")
    drawn = batches.Batches(d, "val", block_size=BLOCK, rows=12, seed=2)  # seed + 1, as nanoGPT's runs
    assert np.array_equal(nanogpt.offsets(0, range(12)), drawn.offsets(0, range(12)))
    llmc = batches.eval_set(d, "val", block_size=BLOCK, batch_size=4, eval_iters=3, seed=1,
                            sampling="epoch")
    assert llmc.offsets(0, range(12)).tolist() == [k * BLOCK for k in range(12)]  # the first windows


def test_an_unknown_sampling_or_a_split_shorter_than_a_window(small):
    d, _ = small
    with pytest.raises(ValueError, match="sampling='shuffle' is not one of random, epoch, in_order"):
        batches.Batches(d, "train", block_size=BLOCK, rows=1, seed=0, sampling="shuffle")
    with pytest.raises(batches.DataError, match="too few for one window"):
        batches.Batches(d, "val", block_size=10_000, rows=1, seed=0, sampling="epoch")
