"""Reading batches: windows are real slices of the stream, the batch of a step is a pure function of
(seed, split, step) whatever the host split, prefetch equals read, gs:// equals local, clear errors."""

import json

import numpy as np
import pytest

from nanojaxgpt import batches, data, prepare
from nanojaxgpt.tokenizer import CharTokenizer

RECORD, SHARD = 256, 256 * 32  # small records and shards, so windows cross both boundaries


@pytest.fixture
def prepared(shakespeare_text, tmp_path):
    """tiny shakespeare, char level, in 123 shards of 8192 tokens; and its train token stream."""
    d = tmp_path / "shakespeare_char"
    prepare.prepare_char(shakespeare_text, str(d), record_size=RECORD, shard_tokens=SHARD)
    n = len(shakespeare_text)
    train = CharTokenizer.from_text(shakespeare_text).encode_array(shakespeare_text[:int(n * 0.9)])
    return d, train


def test_windows_are_slices_of_the_stream(prepared):
    d, train = prepared
    assert data.read_meta(d).tokens["train"] == len(train)
    for block_size in (64, 600):  # block_size changes without preparing again; 600 spans 3-4 records
        b = batches.Batches(d, "train", block_size=block_size, rows=64, seed=1337)
        crossings = 0
        for step in range(3):
            batch, offsets = b.read(step, range(64)), b.offsets(step, range(64))
            assert batch.shape == (64, block_size + 1) and batch.dtype == np.int32
            for row, o in zip(batch, offsets):
                assert np.array_equal(row, train[o:o + block_size + 1])  # so y = x shifted by one
            crossings += np.sum(offsets // SHARD != (offsets + block_size) // SHARD)
        assert crossings > 0  # some windows really did span two shard files
        assert b.offsets(0, [0]).item() <= len(train) - block_size - 1
    assert data.tokenizer(d).decode(b.read(0, [0])[0]) in data.tokenizer(d).decode(train)


def test_batch_is_a_pure_function_of_seed_split_step(prepared):
    d, _ = prepared
    a = batches.Batches(d, "train", block_size=32, rows=8, seed=7)
    b = batches.Batches(d, "train", block_size=32, rows=8, seed=7)
    whole = a.read(5, range(8))
    assert np.array_equal(whole, b.read(5, np.arange(8)))
    # Two "hosts" reading their own rows get exactly the rows of the whole batch, in any order.
    assert np.array_equal(np.concatenate([a.read(5, [0, 1, 2, 3]), b.read(5, [4, 5, 6, 7])]), whole)
    assert np.array_equal(a.read(5, [6, 1]), whole[[6, 1]])
    assert not np.array_equal(a.read(6, range(8)), whole)
    assert not np.array_equal(batches.Batches(d, "train", block_size=32, rows=8, seed=8).read(5, range(8)), whole)
    # Row r of step s is window s*rows + r: another rows count is another sequence of batches.
    assert not np.array_equal(batches.Batches(d, "train", block_size=32, rows=4, seed=7).read(5, range(4)),
                              whole[:4])
    val = batches.Batches(d, "val", block_size=32, rows=8, seed=7)
    # The split is part of the offsets' key: the same seed draws other windows in train and val.
    assert not np.array_equal(val.offsets(0, range(8)), a.offsets(0, range(8)))
    assert val.offsets(0, range(8)).max() <= 111_540 - 33


def test_offsets_cover_the_stream_uniformly(prepared):
    d, train = prepared
    b = batches.Batches(d, "train", block_size=64, rows=1000, seed=0)
    offsets = np.concatenate([b.offsets(s, range(1000)) for s in range(20)])
    n = len(train) - 64
    assert offsets.min() >= 0 and offsets.max() < n
    counts = np.histogram(offsets, bins=10, range=(0, n))[0]
    assert counts.min() > 0.9 * 2000 and counts.max() < 1.1 * 2000  # 20,000 draws, 10 bins
    assert len(np.unique(offsets)) > 19_500  # nearly no repeats among 20,000 of 900,000 offsets


def test_iterate_equals_read_from_any_start(prepared):
    d, _ = prepared
    b = batches.Batches(d, "train", block_size=128, rows=6, seed=3)
    rows = [1, 4, 5]
    for start in (0, 17):  # 17: a resumed run
        it = b.iterate(start, rows, threads=2, buffer=3)
        for step in range(start, start + 6):
            assert np.array_equal(next(it), b.read(step, rows))
        it.close()


def test_bad_arguments(prepared):
    d, _ = prepared
    b = batches.Batches(d, "train", block_size=32, rows=8, seed=0)
    with pytest.raises(IndexError, match=r"rows must be in \[0, 8\).*\[8\]"):
        b.read(0, [7, 8])
    with pytest.raises(IndexError, match="step=-1"):
        b.iterate(-1, [0])
    with pytest.raises(data.DataError, match="has 111540 tokens, too few for one window"):
        batches.Batches(d, "val", block_size=111_540, rows=1, seed=0)
    with pytest.raises(data.DataError, match=r"no split 'test'; it has \['train', 'val'\]"):
        batches.Batches(d, "test", block_size=32, rows=1, seed=0)


def test_missing_or_damaged_data_errors(prepared, tmp_path):
    d, _ = prepared
    missing = tmp_path / "data" / "shakespeare_char"
    with pytest.raises(data.DataError, match=f"{missing}/meta.json does not exist.*"
                       f"python tools/prepare_shakespeare_char.py --out {missing}"):
        batches.Batches(missing, "train", block_size=8, rows=1, seed=0)
    with pytest.raises(data.DataError, match="prepare_text.py --input YOUR_FILES.txt --out"):
        data.read_meta(tmp_path / "mine")

    meta_path = d / "meta.json"
    good = meta_path.read_text()
    meta_path.write_text(good[:100])
    with pytest.raises(data.DataError, match=f"{meta_path} is damaged.*prepare_shakespeare_char"):
        data.read_meta(d)
    meta_path.write_text(json.dumps({**json.loads(good), "format": "other"}))
    with pytest.raises(data.DataError, match=f"{meta_path} is damaged"):
        data.read_meta(d)
    meta_path.write_text(good)

    shard = d / "train-00003-of-00123.array_record"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(data.DataError, match=f"shard {shard} has .* bytes but meta.json says"):
        batches.Batches(d, "train", block_size=8, rows=1, seed=0)
    shard.unlink()
    with pytest.raises(data.DataError, match=f"shard {shard} listed in {meta_path} is missing"):
        batches.Batches(d, "train", block_size=8, rows=1, seed=0)


def test_hints_name_the_tool_that_makes_the_data(tmp_path):
    assert data.prepare_command("data/shakespeare_char") == (
        "python tools/prepare_shakespeare_char.py --out data/shakespeare_char")
    for char_dir in ("data/poems_char", "data/shakespeare_words"):  # char-level, any text
        assert data.prepare_command(char_dir).startswith(
            "python tools/prepare_shakespeare_char.py --input YOUR_TEXT.txt")
    assert "prepare_shakespeare_char.py --input" in data.prepare_command("data/mine", "char")
    assert "prepare_openwebtext.py" in data.prepare_command("gs://b/openwebtext", "gpt2")
    assert data.prepare_command("gs://b/fineweb-edu-10bt", "gpt2") == (
        "python tools/prepare_hf_dataset.py --dataset fineweb-edu-10bt --out gs://b/fineweb-edu-10bt")
    assert "prepare_text.py" in data.prepare_command("data/mine", "gpt2")


def test_meta_that_is_not_text_is_a_data_error(prepared):
    d, _ = prepared
    (d / "meta.json").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(data.DataError, match=f"{d / 'meta.json'} is not text .*prepare"):
        data.read_meta(d)


def test_a_shard_whose_records_fail_their_hash_is_named(prepared):
    d, _ = prepared
    shard = d / "train-00005-of-00123.array_record"
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0x10  # inside the first chunk's data: same size, so only Riegeli's hash sees it
    shard.write_bytes(bytes(raw))
    b = batches.Batches(d, "train", block_size=64, rows=8, seed=0)
    record = 5 * (SHARD // RECORD)  # the first record of shard 5
    offsets = np.array([record * RECORD + 3])
    with pytest.raises(data.DataError, match=f"shard {shard} cannot be read .*hash mismatch.*damaged"):
        b.tokens.windows(offsets, 65)
    assert b.tokens.windows(offsets - 5 * RECORD, 65).shape == (1, 65)  # other shards still read


def test_gcs_reads_equal_local(gcs, shakespeare_text, tmp_path):
    out = f"{gcs}/sc"
    prepare.prepare_char(shakespeare_text[:200_000], out, work_dir=str(tmp_path), record_size=RECORD,
                         shard_tokens=SHARD)
    local = batches.Batches(tmp_path, "train", block_size=300, rows=8, seed=5)
    remote = batches.Batches(out, "train", block_size=300, rows=8, seed=5)
    assert np.array_equal(remote.read(2, range(8)), local.read(2, range(8)))
    it = remote.iterate(9, [3, 4], threads=2, buffer=2)
    assert np.array_equal(next(it), local.read(9, [3, 4]))
    it.close()
    assert data.tokenizer(out).vocab_size == data.read_meta(tmp_path).vocab_size
    with pytest.raises(data.DataError, match=f"{gcs}/nothing/meta.json does not exist"):
        data.read_meta(f"{gcs}/nothing")


def test_a_stalled_record_read_is_an_error_within_the_timeout(tmp_path):
    """Reads through the I/O threads (as on gs://) that do not answer: a DataError naming the
    shard after read_timeout_s, not a wait without end."""
    import threading
    import time

    prepare.prepare_char("hello world, " * 400, str(tmp_path))
    release = threading.Event()

    class Stalled:  # an array_record source whose storage never answers
        def __getitem__(self, key):
            release.wait(30)

    tokens = data.Tokens(str(tmp_path), "train", io_threads=2, read_timeout_s=0.3)
    tokens._source = Stalled()
    t0 = time.monotonic()
    try:
        with pytest.raises(data.DataError, match=r"reading shard .*train-00000-of-00001\.array_record "
                                                 r"took more than 0.3 s \(data.read_timeout_s\)"):
            tokens.windows(np.array([0, 5]), 8)
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
