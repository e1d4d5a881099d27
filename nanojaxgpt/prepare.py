"""Writing prepared token data: ArrayRecord shards per split + meta.json, locally or to gs://.

Shared by tools/prepare_*.py. The format is described in nanojaxgpt/data.py, which reads it.
- `prepare_char(text, out)`: nanoGPT's shakespeare_char: char vocabulary, first 90% / last 10%.
- `prepare_documents(docs, n, out)`: GPT-2 BPE, each document followed by <|endoftext|> (as
  nanoGPT's openwebtext/prepare.py), a seeded `val_fraction` of the documents held out as val.
- `TextFiles(paths)`: documents from local .txt / .jsonl files.
For --out gs://bucket/path the shards are written to a local staging folder (array_record cannot
write to GCS) and uploaded; a rerun skips every file already there with the same size and CRC32C.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from nanojaxgpt import storage
from nanojaxgpt.data import META, Meta, Shard, SplitMeta
from nanojaxgpt.tokenizer import CharTokenizer, GPT2Tokenizer

RECORD_SIZE = 4096  # tokens per record: 8 KiB at uint16; a 1025-token window touches 1.25 records on average
SHARD_TOKENS = 1 << 27  # 134M tokens = 256 MiB per shard at uint16: OpenWebText's 9B tokens -> ~68 shards
WRITER_OPTIONS = "group_size:1"  # one record per chunk: grain's random access reads exactly one (zstd)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class SplitWriter:
    """Appends one split's token stream to shards of whole records; `close()` names and lists them."""

    def __init__(self, directory: Path, split: str, *, vocab_size: int, record_size: int = RECORD_SIZE,
                 shard_tokens: int = SHARD_TOKENS):
        if record_size < 1 or shard_tokens < record_size:
            raise ValueError(f"record_size={record_size} must be >= 1 and shard_tokens={shard_tokens} "
                             f"at least one record")
        self.directory, self.split, self.vocab_size = Path(directory), split, vocab_size
        self.dtype = np.dtype(token_dtype(vocab_size)).newbyteorder("<")
        self.record_size = record_size
        self.records_per_shard = shard_tokens // record_size
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"{split}-*.array_record*"):  # from an earlier run
            stale.unlink()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._writer = None
        self._shard_records: list[int] = []  # records in each shard written so far
        self.tokens = 0

    def _path(self, i: int) -> Path:
        return self.directory / f"{self.split}-{i:05d}.array_record.partial"

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        ids = np.asarray(tokens)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id {ids.max() if ids.max() >= self.vocab_size else ids.min()} "
                             f"outside the vocabulary [0, {self.vocab_size}) of split {self.split!r}")
        self._pending.append(ids.astype(self.dtype))
        self._pending_tokens += ids.size
        self.tokens += ids.size
        if self._pending_tokens >= self.record_size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self._pending) if self._pending else np.zeros(0, self.dtype)
        R = self.record_size
        n = -(-len(stream) // R) if final else len(stream) // R  # the last record may be short
        for k in range(n):
            self._write_record(stream[k * R:(k + 1) * R])
        self._pending = [stream[n * R:]]
        self._pending_tokens = len(stream) - n * R

    def _write_record(self, record: np.ndarray) -> None:
        if self._writer is None or self._shard_records[-1] == self.records_per_shard:
            if self._writer is not None:
                self._writer.close()
            self._shard_records.append(0)
            self._writer = array_record_module.ArrayRecordWriter(
                str(self._path(len(self._shard_records) - 1)), WRITER_OPTIONS)
        self._writer.write(record.tobytes())
        self._shard_records[-1] += 1

    def close(self, documents: int) -> SplitMeta:
        self._flush(final=True)
        if self._writer is not None:
            self._writer.close()
        n, shards = len(self._shard_records), []
        for i, records in enumerate(self._shard_records):
            final = self.directory / f"{self.split}-{i:05d}-of-{n:05d}.array_record"
            self._path(i).rename(final)
            start = i * self.records_per_shard * self.record_size  # first token of this shard
            tokens = min(records * self.record_size, self.tokens - start)
            shards.append(Shard(final.name, records, tokens, final.stat().st_size))
        return SplitMeta(self.tokens, documents, tuple(shards))


@dataclasses.dataclass(frozen=True)
class Prepared:
    meta: Meta
    out: str  # where the data now is (local dir or gs:// URL): pass it as data_dir
    local_dir: Path | None  # the local copy, None when it was a temporary staging folder
    upload: storage.UploadReport | None  # what went to gs://, None for a local --out


def _staging(out: str, work_dir: str | None) -> Path:
    if not storage.is_gcs(out):
        return Path(out)
    if work_dir:
        return Path(work_dir)
    return Path(tempfile.mkdtemp(prefix="nanojaxgpt-prepare-"))


def publish(meta: Meta, local: Path, out: str, work_dir: str | None) -> Prepared:
    (local / META).write_text(meta.to_json())
    if not storage.is_gcs(out):
        return Prepared(meta, out, local, None)
    # meta.json last: a reader never sees it before the shards it lists.
    names = [s.name for split in meta.splits.values() for s in split.shards] + [META]
    with tqdm(total=len(names), desc=f"upload to {out}", unit="file") as bar:
        report = storage.upload(local, out, names, done=lambda name: bar.update(1))
    if not work_dir:
        shutil.rmtree(local)
    return Prepared(meta, out, Path(work_dir) if work_dir else None, report)


TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")


class PrepareError(ValueError):
    """Input the prepare tools cannot use; the message says what to pass instead."""


def download_text(url: str = TINYSHAKESPEARE_URL) -> str:
    """A text file from the internet (tiny-shakespeare by default, as nanoGPT downloads it)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read().decode("utf-8")
    except OSError as e:  # offline, DNS, proxy, timeout: urllib's errors are all OSErrors
        reason = getattr(e, "reason", e)
        raise PrepareError(f"cannot download {url} ({reason}); this machine may be offline: "
                           "download the file elsewhere and pass it with --input FILE") from None


def read_input(path: str) -> str:
    """The text of a local --input file, or a PrepareError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PrepareError(f"--input {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PrepareError(f"--input {path}: {e.strerror}") from None


def prepare_char(text: str, out: str, *, work_dir: str | None = None, record_size: int = RECORD_SIZE,
                 shard_tokens: int = SHARD_TOKENS) -> Prepared:
    """nanoGPT's shakespeare_char: vocabulary = sorted set of characters; train = text[:int(n*0.9)]."""
    tok = CharTokenizer.from_text(text)
    n = len(text)
    local = _staging(out, work_dir)
    splits = {}
    for split, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        writer = SplitWriter(local, split, vocab_size=tok.vocab_size, record_size=record_size,
                             shard_tokens=shard_tokens)
        writer.add(tok.encode_array(part))
        splits[split] = writer.close(documents=1)
    meta = Meta(vocab_size=tok.vocab_size, tokenizer="char", eot=None, dtype=token_dtype(tok.vocab_size),
                record_size=record_size, splits=splits, itos=tok.itos)
    return publish(meta, local, out, work_dir)


def val_documents(n_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the held-out documents: round(n * fraction) of them (at least 1), seeded."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    if n_documents < 2:
        raise ValueError(f"{n_documents} document(s): a train and a val split need at least 2 "
                         f"(for .txt files try --txt_documents=paragraph or line)")
    n_val = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    mask = np.zeros(n_documents, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_documents, n_val, replace=False)] = True
    return mask


def prepare_documents(documents: Iterable[str], n_documents: int, out: str, *, val_fraction: float = 0.0005,
                      seed: int = 2357, work_dir: str | None = None, record_size: int = RECORD_SIZE,
                      shard_tokens: int = SHARD_TOKENS, threads: int = 8, chunk: int = 1024) -> Prepared:
    """GPT-2 tokens of each document followed by <|endoftext|>, split into train/val by document."""
    tok = GPT2Tokenizer()
    is_val = val_documents(n_documents, val_fraction, seed)
    local = _staging(out, work_dir)
    writers = {s: SplitWriter(local, s, vocab_size=tok.vocab_size, record_size=record_size,
                              shard_tokens=shard_tokens) for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    seen = 0
    docs = iter(documents)
    with tqdm(total=n_documents, desc="tokenize", unit="doc") as bar:
        while texts := list(itertools.islice(docs, chunk)):
            if seen + len(texts) > n_documents:
                raise ValueError(f"more than the announced {n_documents} documents")
            encoded = tok.encode_documents(texts, num_threads=threads)
            for split in ("train", "val"):
                picked = [ids for i, ids in enumerate(encoded) if is_val[seen + i] == (split == "val")]
                if picked:
                    writers[split].add(np.fromiter(
                        itertools.chain.from_iterable(ids + [tok.eot] for ids in picked), dtype=np.int64))
                    counts[split] += len(picked)
            seen += len(texts)
            bar.update(len(texts))
    if seen != n_documents:
        raise ValueError(f"got {seen} documents, expected {n_documents}")
    splits = {s: w.close(documents=counts[s]) for s, w in writers.items()}
    meta = Meta(vocab_size=tok.vocab_size, tokenizer="gpt2", eot=tok.eot, dtype=token_dtype(tok.vocab_size),
                record_size=record_size, splits=splits)
    return publish(meta, local, out, work_dir)


class TextFiles:
    """Documents from local files: a .jsonl line's `text_key` field is one document; a .txt file is
    one document (txt_documents="file"), or one per blank-line-separated paragraph, or per line.
    A directory stands for every .txt/.jsonl file under it, in sorted order."""

    def __init__(self, paths: Sequence[str | Path], *, text_key: str = "text", txt_documents: str = "file"):
        if txt_documents not in ("file", "paragraph", "line"):
            raise ValueError(f"txt_documents={txt_documents!r} must be 'file', 'paragraph' or 'line'")
        self.text_key, self.txt_documents = text_key, txt_documents
        self.files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                self.files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
            elif not p.is_file():
                raise FileNotFoundError(f"input {p} does not exist")
            elif p.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"input {p}: only .txt and .jsonl files are read (one JSON object "
                                 f"per line with a {text_key!r} field)")
            else:
                self.files.append(p)
        if not self.files:
            raise ValueError(f"no .txt or .jsonl files in {[str(p) for p in paths]}")
        self._count: int | None = None

    def __len__(self) -> int:
        if self._count is None:  # one fast pass, so the val split can be drawn before tokenizing
            self._count = sum(self._count_file(f) for f in self.files)
        return self._count

    def _count_file(self, f: Path) -> int:
        if f.suffix == ".jsonl":  # non-blank lines; a bad one fails later, while tokenizing
            with open(f) as lines:
                return sum(1 for line in lines if line.strip())
        return 1 if self.txt_documents == "file" else sum(1 for _ in self._txt(f))

    def _txt(self, f: Path) -> Iterator[str]:
        sep = "\n\n" if self.txt_documents == "paragraph" else "\n"
        return (part for part in f.read_text().split(sep) if part.strip())

    def __iter__(self) -> Iterator[str]:
        for f in self.files:
            if f.suffix == ".jsonl":
                yield from self._jsonl(f)
            elif self.txt_documents == "file":
                yield f.read_text()
            else:
                yield from self._txt(f)

    def _jsonl(self, f: Path) -> Iterator[str]:
        with open(f) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{number}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{f}:{number}: no string field {self.text_key!r} (has {keys}); "
                                     f"choose the field with --text_key")
                yield record[self.text_key]


def add_output_args(parser: argparse.ArgumentParser, default_out: str | None) -> None:
    """The options every tools/prepare_*.py shares."""
    parser.add_argument("--out", default=default_out, type=storage.absolute,
                        help=f"local folder or gs://bucket/path (default: {default_out or 'data/<input>'})")
    parser.add_argument("--work_dir", default=None, type=storage.absolute,
                        help="local staging folder for a gs:// --out (default: a temporary one)")
    parser.add_argument("--record_size", type=int, default=RECORD_SIZE, help="tokens per record")
    parser.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")


def summary(result: Prepared) -> str:
    m = result.meta
    lines = [f"wrote {result.out}: tokenizer {m.tokenizer}, vocab_size {m.vocab_size}, {m.dtype}"]
    lines += [f"  {name}: {s.tokens:,} tokens, {s.documents:,} documents, {len(s.shards)} shard(s)"
              for name, s in m.splits.items()]
    if result.upload is not None:
        lines.append(f"  uploaded {len(result.upload.uploaded)} file(s), "
                     f"skipped {len(result.upload.skipped)} already there")
    return "\n".join(lines)
