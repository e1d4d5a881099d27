"""Resumable, parallel GPT-2 tokenization of many documents, as prepare.prepare_documents writes it.

    result = prepare_parts(corpora.local_parts(["fineweb/"], "text"), "gs://BUCKET/fineweb", workers=16)

Each part (nanojaxgpt/corpora.py) is tokenized by one of `workers` processes into its own files
in WORK/tokenized-parts/ (raw little-endian uint16 per split, then a small JSON that marks it
done). A rerun of the same inputs and split settings skips every finished part, so an interrupted
preparation loses at most the parts in progress. When all are done they are packed, in order,
into the ArrayRecord shards and meta.json of nanojaxgpt/data.py (byte for byte what
prepare_documents writes for the same documents), published (uploaded for gs://, resumably), and
the part files removed. WORK is --work_dir, else the --out folder when local, else a folder in
~/.cache/nanojaxgpt/prepare/ named after the bucket path; parts and shards need twice the
tokens' bytes there (40 GB for 10B tokens).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
import queue
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanojaxgpt import prepare, storage
from nanojaxgpt.corpora import Part
from nanojaxgpt.data import Meta
from nanojaxgpt.tokenizer import GPT2Tokenizer

FORMAT = "nanojaxgpt-parts-v1"
PARTS = "tokenized-parts"
SPLITS = ("train", "val")
TOKEN = np.dtype("<u2")  # GPT-2's 50,257 ids fit 16 bits


def staging_for(out: str, work_dir: str | None) -> Path:
    """Where the shards are written before publishing: --out itself when local, else --work_dir,
    else a folder of ~/.cache/nanojaxgpt/prepare/ named after the bucket path (kept for a rerun)."""
    if not storage.is_gcs(out):
        return Path(out)
    if work_dir:
        return Path(work_dir)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "nanojaxgpt" / "prepare" / out.removeprefix("gs://").strip("/")


def _names(index: int) -> dict[str, str]:
    return {**{s: f"{index:05d}.{s}.tokens" for s in SPLITS}, "done": f"{index:05d}.json"}


def tokenize_part(index: int, part: Part, is_val: np.ndarray, parts_dir: str, threads: int,
                  progress: Callable[[int, int], None], chunk: int = 1024) -> dict:
    """Writes one part's train and val tokens (each document followed by <|endoftext|>) and, last,
    its done-marker; calls progress(documents, tokens) after every chunk. Returns the marker."""
    tok = GPT2Tokenizer()
    names, d = _names(index), Path(parts_dir)
    files = {s: open(d / f"{names[s]}.partial", "wb") for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0} for s in SPLITS}
    seen, docs = 0, iter(part.documents())
    with files["train"], files["val"]:
        while texts := list(itertools.islice(docs, chunk)):
            if seen + len(texts) > part.count:
                raise prepare.PrepareError(f"part {part.key} has more than its {part.count} documents: "
                                           "the input changed while it was read")
            encoded = tok.encode_documents(texts, num_threads=threads)
            for split in SPLITS:
                picked = [ids for i, ids in enumerate(encoded) if is_val[seen + i] == (split == "val")]
                ids = np.fromiter(itertools.chain.from_iterable(x + [tok.eot] for x in picked), dtype=TOKEN)
                files[split].write(ids.tobytes())
                counts[split]["documents"] += len(picked)
                counts[split]["tokens"] += ids.size
            seen += len(texts)
            progress(len(texts), sum(len(x) + 1 for x in encoded))
    if seen != part.count:
        raise prepare.PrepareError(f"part {part.key} has {seen} documents, expected {part.count}: "
                                   "the input changed while it was read")
    for s in SPLITS:
        (d / f"{names[s]}.partial").replace(d / names[s])
    marker = {"key": part.key, **{s: counts[s] for s in SPLITS}}
    (d / f"{names['done']}.partial").write_text(json.dumps(marker))
    (d / f"{names['done']}.partial").replace(d / names["done"])
    return marker


_progress_queue = None  # a worker process's channel back to the progress bar


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q


def _tokenize_in_worker(*args) -> dict:
    return tokenize_part(*args, progress=lambda docs, tokens: _progress_queue.put((docs, tokens)))


def _finished(parts_dir: Path, parts: Sequence[Part], manifest: dict) -> dict[int, dict]:
    """The done-markers of this preparation's finished parts; other preparations' files are removed."""
    path = parts_dir / "manifest.json"
    if path.exists() and json.loads(path.read_text()) != manifest:
        print(f"{parts_dir} holds parts of other inputs or split settings: tokenizing again")
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    done = {}
    for i, part in enumerate(parts):
        marker = parts_dir / _names(i)["done"]
        if marker.exists() and json.loads(marker.read_text())["key"] == part.key:
            done[i] = json.loads(marker.read_text())
    return done


def _run(jobs: list[tuple], workers: int, progress: Callable[[int, int], None]) -> None:
    """Tokenizes the jobs, in this process when workers == 1, else in a pool of spawned processes."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            tokenize_part(*job, progress=progress)
        return
    ctx = multiprocessing.get_context("spawn")  # no forked copies of a parent's threads or locks
    q = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                progress(*q.get_nowait())
            except queue.Empty:
                return

    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(q,)) as pool:
        pending = {pool.submit(_tokenize_in_worker, *job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for f in finished:
                    f.result()  # a worker's error is raised here
        except BaseException:  # let the parts in progress finish (they are kept), start no others
            for f in pending:
                f.cancel()
            while not all(f.done() for f in pending):
                wait(pending, timeout=0.2)
                drain()
            raise
        finally:
            drain()


def prepare_parts(parts: Sequence[Part], out: str, *, val_fraction: float = 0.0005, seed: int = 2357,
                  work_dir: str | None = None, record_size: int = prepare.RECORD_SIZE,
                  shard_tokens: int = prepare.SHARD_TOKENS, workers: int = 1,
                  threads: int = 1) -> prepare.Prepared:
    """The parts' documents, in order, as GPT-2 tokens with a seeded val split by document."""
    if workers < 1 or threads < 1:
        raise ValueError(f"workers={workers} and threads={threads} must be positive")
    counts = [p.count for p in parts]
    is_val = prepare.val_documents(sum(counts), val_fraction, seed)
    starts = np.concatenate([[0], np.cumsum(counts)])
    local = staging_for(out, work_dir)
    parts_dir = Path(work_dir or local) / PARTS
    manifest = {"format": FORMAT, "val_fraction": val_fraction, "seed": seed,
                "parts": [[p.key, p.count] for p in parts]}
    done = _finished(parts_dir, parts, manifest)
    if done:
        print(f"resuming: {len(done)} of {len(parts)} parts already tokenized in {parts_dir}")
    jobs = [(i, p, is_val[starts[i]:starts[i + 1]], str(parts_dir), threads)
            for i, p in enumerate(parts) if i not in done]
    tokens = sum(m[s]["tokens"] for m in done.values() for s in SPLITS)
    with tqdm(total=int(starts[-1]), initial=sum(counts[i] for i in done), desc="tokenize",
              unit="doc", smoothing=0.05) as bar:
        def progress(docs: int, new_tokens: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            bar.set_postfix_str(f"{tqdm.format_sizeof(tokens)} tokens", refresh=False)
            bar.update(docs)

        _run(jobs, workers, progress)
    markers = [json.loads((parts_dir / _names(i)["done"]).read_text()) for i in range(len(parts))]
    tok = GPT2Tokenizer()
    splits = {}
    for split in SPLITS:
        writer = prepare.SplitWriter(local, split, vocab_size=tok.vocab_size, record_size=record_size,
                                     shard_tokens=shard_tokens)
        for i in tqdm(range(len(parts)), desc=f"pack {split}", unit="part"):
            writer.add(np.fromfile(parts_dir / _names(i)[split], dtype=TOKEN))
        splits[split] = writer.close(documents=sum(m[split]["documents"] for m in markers))
    meta = Meta(vocab_size=tok.vocab_size, tokenizer="gpt2", eot=tok.eot,
                dtype=prepare.token_dtype(tok.vocab_size), record_size=record_size, splits=splits)
    result = prepare.publish(meta, local, out, str(local))
    shutil.rmtree(parts_dir)
    if storage.is_gcs(out) and not work_dir:  # the default staging folder: everything is uploaded
        shutil.rmtree(local)
        result = dataclasses.replace(result, local_dir=None)
    return result
