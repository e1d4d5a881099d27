"""Loader throughput per host: training tokens/s of data.Batches from local files and from gs://.

    python tools/bench_data.py                                  # synthetic data, local + GCS emulator
    python tools/bench_data.py --data_dir data/openwebtext --gcs gs://BUCKET/openwebtext

Tokens/s counts training tokens (rows * block_size) of one host reading all rows of every step:
`read` is one synchronous read() per step, `iterate` is the grain-prefetched iterator. Shapes: seq
1024 batch 16 (GPT-2 124M per-device batch) and seq 64 batch 12 (shakespeare_char on CPU).
--gcs emulator starts a loopback fake-gcs-server (tests/gcs_server.py); --gcs none skips gs://.
"""

import argparse
import atexit
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from nanojaxgpt import data, prepare, storage

SHAPES = ((1024, 16), (64, 12))  # (block_size, batch_size)


def synthetic(directory: Path, n_tokens: int) -> None:
    """GPT-2-sized random tokens in the prepared format (random ids barely compress: worst case)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_tokens), ("val", n_tokens // 100)):
        writer = prepare.SplitWriter(directory, split, vocab_size=50257, shard_tokens=1 << 22)
        for chunk in np.array_split(rng.integers(0, 50257, n), 16):
            writer.add(chunk)
        splits[split] = writer.close(documents=1)
    meta = data.Meta(vocab_size=50257, tokenizer="gpt2", eot=50256, dtype="uint16",
                     record_size=prepare.RECORD_SIZE, splits=splits)
    (directory / data.META).write_text(meta.to_json())


def emulator():
    """A fake-gcs-server on loopback from the test helpers, with every client pointed at it."""
    path = Path(__file__).resolve().parents[1] / "tests" / "gcs_server.py"
    spec = importlib.util.spec_from_file_location("gcs_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = module.GCSServer()
    # Stopped at exit, after Python has joined the prefetch threads still finishing their reads.
    atexit.register(server.stop)
    os.environ.update(server.env())
    return server, server.create_bucket("bench-data")


def measure(data_dir: str, block_size: int, batch_size: int, seconds: float, threads: int, buffer: int,
            io_threads: int | None):
    b = data.Batches(data_dir, "train", block_size=block_size, rows=batch_size, seed=0, io_threads=io_threads)
    rows = np.arange(batch_size)
    result = {}
    b.read(0, rows)  # opens the shards' readers
    step, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < seconds or step < 5:
        b.read(step, rows)
        step += 1
    result["read"] = (step - 1) * batch_size * block_size / (time.perf_counter() - t0)
    it = b.iterate(10_000, rows, threads=threads, buffer=buffer)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 5:
        next(it)
        n += 1
    result["iterate"] = n * batch_size * block_size / (time.perf_counter() - t0)
    it.close()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="prepared data (local); default: synthetic")
    parser.add_argument("--tokens", type=int, default=16_000_000, help="size of the synthetic train split")
    parser.add_argument("--gcs", default="emulator", help="emulator, none, or gs://bucket/path to copy to")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=4, help="iterate(): grain prefetch threads")
    parser.add_argument("--buffer", type=int, default=8, help="iterate(): steps read ahead")
    parser.add_argument("--io_threads", type=int, default=None,
                        help="record-read threads per Batches (default: 16 for gs://, 0 for local)")
    args = parser.parse_args(argv)

    work = tempfile.TemporaryDirectory(prefix="bench-data-")
    local = args.data_dir
    if local is None:
        local = work.name
        synthetic(Path(local), args.tokens)
    sources = {"local": local}
    if args.gcs != "none":
        if args.gcs == "emulator":
            _, bucket = emulator()
            remote = f"{bucket}/bench"
        else:
            remote = args.gcs
        meta = data.read_meta(local)
        names = [s.name for split in meta.splits.values() for s in split.shards] + [data.META]
        storage.upload(Path(local), remote, names)
        sources[f"gs:// ({args.gcs})"] = remote

    tokens = data.read_meta(local).tokens["train"]
    print(f"train split: {tokens:,} tokens; iterate(threads={args.threads}, buffer={args.buffer})")
    print(f"{'source':<22} {'seq':>5} {'batch':>5} {'read() tok/s':>14} {'iterate() tok/s':>16}")
    try:
        for name, directory in sources.items():
            for block_size, batch_size in SHAPES:
                r = measure(directory, block_size, batch_size, args.seconds, args.threads, args.buffer,
                            args.io_threads)
                print(f"{name:<22} {block_size:>5} {batch_size:>5} {r['read'] / 1e6:>12.2f} M "
                      f"{r['iterate'] / 1e6:>14.2f} M", flush=True)
    finally:
        work.cleanup()


if __name__ == "__main__":
    main()
