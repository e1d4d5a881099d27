"""Training batches from prepared token data (ArrayRecord shards + meta.json), local or gs://.

Format (written by nanojaxgpt/prepare.py): each split's documents are tokenized and concatenated
into one token stream (GPT-2 data: every document followed by <|endoftext|>). The stream is cut
into records of `record_size` tokens (little-endian uint16 when vocab_size <= 65536, else uint32);
only the last record of a split is shorter, never padded. Records are stored in order in
DIR/{split}-{i:05d}-of-{n:05d}.array_record; meta.json lists the shards and their sizes.

Here: the format, meta.json, and `Tokens`, random access to any window of a split's stream
(grain's ArrayRecordDataSource), so block_size can change without preparing again. Which windows
a run reads, and in what order, is nanojaxgpt/batches.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grain
import numpy as np
from jaxtyping import Int

from nanojaxgpt import storage
from nanojaxgpt import tokenizer as tokenizers

META = "meta.json"
FORMAT = "nanojaxgpt-tokens-v1"


class DataError(ValueError):
    """Prepared data that is missing or damaged; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str  # file name inside the data directory
    records: int
    tokens: int
    bytes: int  # file size, checked before reading


@dataclasses.dataclass(frozen=True)
class SplitMeta:
    tokens: int  # length of the split's token stream
    documents: int
    shards: tuple[Shard, ...]


@dataclasses.dataclass(frozen=True)
class Meta:
    vocab_size: int
    tokenizer: str  # "char" or "gpt2"
    eot: int | None  # appended after every document (gpt2); None: one document, no separator (char)
    dtype: str  # "uint16" or "uint32", little-endian
    record_size: int  # tokens per record (the last record of a split may be shorter)
    splits: Mapping[str, SplitMeta]
    itos: tuple[str, ...] | None = None  # the char vocabulary, id -> character

    @property
    def tokens(self) -> dict[str, int]:
        return {name: s.tokens for name, s in self.splits.items()}

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({"format": FORMAT, **d}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Meta:
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise KeyError("format")
        splits = {name: SplitMeta(s["tokens"], s["documents"], tuple(Shard(**h) for h in s["shards"]))
                  for name, s in d.pop("splits").items()}
        itos = d.pop("itos", None)
        return cls(**d, splits=splits, itos=tuple(itos) if itos is not None else None)


def prepare_command(data_dir: str, tokenizer: str | None = None) -> str:
    """The command that (re)creates `data_dir`: by the tokenizer its meta.json names, else by its
    folder name (char-level data comes from prepare_shakespeare_char.py, whatever the text)."""
    name = str(data_dir).rstrip("/").rsplit("/", 1)[-1]
    if tokenizer == "char" or (tokenizer is None and ("char" in name or "shakespeare" in name)):
        source = "" if name == "shakespeare_char" else " --input YOUR_TEXT.txt"
        return f"python tools/prepare_shakespeare_char.py{source} --out {data_dir}"
    if "openwebtext" in name:
        return f"python tools/prepare_openwebtext.py --out {data_dir}"
    if "fineweb" in name:
        corpus = "fineweb-edu-10bt" if "edu" in name else "fineweb-10bt"
        return f"python tools/prepare_hf_dataset.py --dataset {corpus} --out {data_dir}"
    return f"python tools/prepare_text.py --input YOUR_FILES.txt --out {data_dir}"


def read_meta(data_dir: str | Path) -> Meta:
    path = storage.join(str(data_dir), META)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise DataError(f"no prepared data in {data_dir}: {path} does not exist. "
                        f"Create it with: {prepare_command(str(data_dir))}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not text (byte {e.start} is not UTF-8): it is damaged or not a "
                        f"nanojaxgpt meta file; prepare the data again: "
                        f"{prepare_command(str(data_dir))}") from None
    try:
        return Meta.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is damaged or not a nanojaxgpt meta file ({type(e).__name__}: {e}); "
                        f"prepare the data again: {prepare_command(str(data_dir))}") from None


def tokenizer(data_dir: str | Path) -> tokenizers.Tokenizer:
    meta = read_meta(data_dir)
    return tokenizers.get(meta.tokenizer, meta.itos)


class Tokens:
    """Random access to windows of one split's token stream, read from its ArrayRecord shards.

    Records are read one by one through grain's ArrayRecordDataSource (its batched __getitems__
    starts a thread pool per call: most of a step's time on local files). Local records are read
    in the calling thread; on gs:// every record is an HTTP round trip, so they are requested from
    `io_threads` long-lived threads at once, and a call still waiting for them after
    `read_timeout_s` is a DataError (array_record's GCS client has no timeout of its own).
    """

    def __init__(self, data_dir: str | Path, split: str, meta: Meta | None = None,
                 io_threads: int | None = None, read_timeout_s: float | None = None):
        self.data_dir = str(data_dir)
        self.meta = meta or read_meta(data_dir)
        if split not in self.meta.splits:
            raise DataError(f"{storage.join(self.data_dir, META)} has no split {split!r}; "
                            f"it has {sorted(self.meta.splits)}")
        self.split = split
        info = self.meta.splits[split]
        self.n_tokens = info.tokens
        self.record_size = self.meta.record_size
        self.dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        self.n_records = sum(s.records for s in info.shards)
        if not self.n_tokens:
            raise DataError(f"split {split!r} of {self.data_dir} is empty; prepare it with more data")
        _check_shards(self.data_dir, info.shards, self.meta.tokenizer)
        # "path[0:N]" tells array_record the record count, so no shard is opened (a GCS round trip
        # each) until it is read.
        self._source = grain.sources.ArrayRecordDataSource(
            [f"{storage.join(self.data_dir, s.name)}[0:{s.records}]" for s in info.shards])
        if io_threads is None:
            io_threads = 64 if storage.is_gcs(self.data_dir) else 0  # each waits a round trip
        self._pool = ThreadPoolExecutor(io_threads, "nanojaxgpt-read") if io_threads > 0 else None
        self._timeout_s = read_timeout_s

    def windows(self, offsets: Int[np.ndarray, " n"], length: int) -> Int[np.ndarray, "n length"]:
        """int32 [len(offsets), length]: the tokens stream[o : o + length] for each offset o."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.size and (offsets.min() < 0 or offsets.max() + length > self.n_tokens):
            raise IndexError(f"windows of {length} tokens at offsets in [{offsets.min()}, {offsets.max()}] "
                             f"run outside the {self.n_tokens}-token {self.split} split")
        R = self.record_size
        first = offsets // R
        span = (length - 1 + R - 1) // R + 1  # most records one window can touch
        needed = np.minimum(first[:, None] + np.arange(span), self.n_records - 1)
        keys, slot = np.unique(needed, return_inverse=True)  # each record read once per call
        slot = slot.reshape(needed.shape)
        records = self._read_records(keys)
        # Token j of window w sits at position local+j of the records first..: row slot[w, p // R],
        # column p % R of the record array. One fancy-index gather, no per-window Python.
        pos = (offsets - first * R)[:, None] + np.arange(length)
        rows = np.take_along_axis(slot, pos // R, axis=1)
        return records[rows, pos % R].astype(np.int32)

    def _shard_of(self, keys: np.ndarray) -> str:
        """The shard(s) holding these records (the one that failed is among them)."""
        shards = self.meta.splits[self.split].shards
        ends = np.cumsum([s.records for s in shards])
        names = sorted({shards[i].name for i in np.searchsorted(ends, keys, side="right")})
        return " or ".join(f"shard {storage.join(self.data_dir, n)}" for n in names[:3])

    def _read_records(self, keys: np.ndarray) -> np.ndarray:
        """[len(keys), record_size] tokens; the split's short last record is zero-filled at its end."""
        try:
            if self._pool is None:
                raw = [self._source[k] for k in keys.tolist()]
            else:
                raw = list(self._pool.map(self._source.__getitem__, keys.tolist(),
                                          timeout=self._timeout_s))
        except TimeoutError:  # the reads stay behind in the pool's threads; the run stops
            raise DataError(f"reading {self._shard_of(keys)} took more than {self._timeout_s:g} s "
                            "(data.read_timeout_s): the storage is unreachable or stalled from "
                            "this host; check that it can read there, or raise the timeout") from None
        except RuntimeError as e:  # Riegeli: "Corrupted Riegeli/records file: ... hash mismatch"
            raise DataError(f"{self._shard_of(keys)} cannot be read ({str(e).splitlines()[0][:200]}): "
                            "the file is damaged; copy it again or prepare the data again: "
                            f"{prepare_command(self.data_dir, self.meta.tokenizer)}") from e
        R, size = self.record_size, self.dtype.itemsize
        joined = b"".join(raw)
        if len(joined) == len(keys) * R * size:  # every record full: one copy-free reshape
            return np.frombuffer(joined, dtype=self.dtype).reshape(len(keys), R)
        out = np.zeros((len(keys), R), dtype=self.dtype)
        for i, (key, record) in enumerate(zip(keys.tolist(), raw)):
            expected = min(R, self.n_tokens - key * R)
            if len(record) != expected * size:
                raise DataError(f"record {key} of split {self.split!r} in {self.data_dir} has "
                                f"{len(record)} bytes, expected {expected * size}: the shards do "
                                f"not match meta.json; prepare the data again")
            out[i, :expected] = np.frombuffer(record, dtype=self.dtype)
        return out


def _check_shards(data_dir: str, shards: Sequence[Shard], tokenizer: str) -> None:
    sizes = storage.file_sizes(data_dir)
    for s in shards:
        path = storage.join(data_dir, s.name)
        if s.name not in sizes:
            raise DataError(f"shard {path} listed in {storage.join(data_dir, META)} is missing; "
                            f"copy it again or prepare the data again: {prepare_command(data_dir, tokenizer)}")
        if sizes[s.name] != s.bytes:
            raise DataError(f"shard {path} has {sizes[s.name]} bytes but meta.json says {s.bytes} "
                            f"(an interrupted copy?); copy it again or prepare the data again")
