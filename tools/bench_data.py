"""Loader throughput per host: training tokens/s of batches.Batches from local files and from gs://.

    python tools/bench_data.py                                  # synthetic data, local + GCS emulator
    python tools/bench_data.py --data_dir data/openwebtext --gcs gs://BUCKET/openwebtext
    python tools/bench_data.py --latency_ms 50      # each emulator request held 50 ms, as a bucket

Tokens/s counts training tokens (rows * block_size) of one host reading all rows of every step:
`read` is one synchronous read() per step, `iterate` is the grain-prefetched iterator, `feed` is
what training uses (nanojaxgpt.feed.Feed: --feed_depth steps read ahead on --feed_threads threads). Shapes: seq
1024 batch 16 (GPT-2 124M per-device batch) and seq 64 batch 12 (shakespeare_char on CPU).
--gcs emulator starts a loopback fake-gcs-server (tools/gcs_server.py); --gcs none skips gs://.
"""

import argparse
import atexit
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nanojaxgpt import batches, data, prepare, storage
from nanojaxgpt.feed import Feed

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


def emulator(latency_ms: float):
    """A fake-gcs-server on loopback from the test helpers, with every client pointed at it
    (through a proxy that holds each request `latency_ms` when that is > 0)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.gcs_server import GCSServer
    from tools.latency_proxy import LatencyProxy

    server = GCSServer()
    # Stopped at exit, after Python has joined the prefetch threads still finishing their reads.
    atexit.register(server.stop)
    bucket = server.create_bucket("bench-data")
    env = server.env()
    if latency_ms > 0:
        proxy = LatencyProxy(server.port, latency_ms / 1000)
        atexit.register(proxy.stop)
        env = {k: v.replace(server.url, proxy.url) for k, v in env.items()}
    os.environ.update(env)
    return server, bucket


def measure(data_dir: str, block_size: int, batch_size: int, seconds: float, threads: int, buffer: int,
            io_threads: int | None, feed_depth: int, feed_threads: int):
    b = batches.Batches(data_dir, "train", block_size=block_size, rows=batch_size, seed=0, io_threads=io_threads)
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
    feed = Feed(lambda s: b.read(s, rows), start=0, stop=1 << 30, depth=feed_depth, threads=feed_threads)
    feed.get(0)
    n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 5:
        feed.get(n)
        n += 1
    result["feed"] = (n - 1) * batch_size * block_size / (time.perf_counter() - t0)
    feed.close()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="prepared data (local); default: synthetic")
    parser.add_argument("--tokens", type=int, default=16_000_000, help="size of the synthetic train split")
    parser.add_argument("--gcs", default="emulator", help="emulator, none, or gs://bucket/path to copy to")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=4, help="iterate(): grain prefetch threads")
    parser.add_argument("--buffer", type=int, default=8, help="iterate(): steps read ahead")
    parser.add_argument("--latency_ms", type=float, default=0.0,
                        help="with --gcs emulator: hold every request this long (a real bucket: ~50)")
    parser.add_argument("--feed_depth", type=int, default=4, help="feed: steps read ahead")
    parser.add_argument("--feed_threads", type=int, default=2, help="feed: steps read at once")
    parser.add_argument("--io_threads", type=int, default=None,
                        help="record-read threads per Batches (default: 64 for gs://, 0 for local)")
    args = parser.parse_args(argv)

    work = tempfile.TemporaryDirectory(prefix="bench-data-")
    local = args.data_dir
    if local is None:
        local = work.name
        synthetic(Path(local), args.tokens)
    sources = {"local": local}
    if args.gcs != "none":
        if args.gcs == "emulator":
            _, bucket = emulator(args.latency_ms)
            remote = f"{bucket}/bench"
        else:
            remote = args.gcs
        meta = data.read_meta(local)
        names = [s.name for split in meta.splits.values() for s in split.shards] + [data.META]
        storage.upload(Path(local), remote, names)
        sources[f"gs:// ({args.gcs})"] = remote

    tokens = data.read_meta(local).tokens["train"]
    print(f"train split: {tokens:,} tokens; iterate(threads={args.threads}, buffer={args.buffer}); "
          f"feed(depth={args.feed_depth}, threads={args.feed_threads}); latency {args.latency_ms} ms")
    print(f"{'source':<22} {'seq':>5} {'batch':>5} {'read() tok/s':>14} {'iterate() tok/s':>16} "
          f"{'feed tok/s':>12}")
    try:
        for name, directory in sources.items():
            for block_size, batch_size in SHAPES:
                r = measure(directory, block_size, batch_size, args.seconds, args.threads, args.buffer,
                            args.io_threads, args.feed_depth, args.feed_threads)
                print(f"{name:<22} {block_size:>5} {batch_size:>5} {r['read'] / 1e6:>12.2f} M "
                      f"{r['iterate'] / 1e6:>14.2f} M {r['feed'] / 1e6:>10.2f} M", flush=True)
    finally:
        work.cleanup()


if __name__ == "__main__":
    main()
