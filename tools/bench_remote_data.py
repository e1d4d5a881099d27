"""Step time of the real training loop with its data on gs:// (held --latency_ms per request) and local.

    python tools/bench_remote_data.py DATA_DIR [--latency_ms 50] [--steps 300] [-- --key=value ...]

DATA_DIR is a prepared data dir (e.g. from tools/prepare_shakespeare_char.py). A loopback
fake-gcs-server gets a copy; a proxy in front of it holds every request --latency_ms, as a real
bucket's round trip. Both runs train `configs/shakespeare_char.toml` (plus the given overrides)
for --steps steps and print the median ms/step of their log lines, so the host side's cost of
remote data shows as the difference: with enough reads in flight there is none.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanojaxgpt import data, storage  # noqa: E402
from tools.gcs_server import GCSServer  # noqa: E402
from tools.latency_proxy import LatencyProxy  # noqa: E402

STEP_TIME = re.compile(r"\| ([\d.]+) ms/step")


def train(data_dir: str, out_dir: str, steps: int, overrides: list[str], env: dict[str, str]) -> float:
    """Median ms/step of a run's log lines after the first two (compile, warm-up)."""
    cmd = [sys.executable, "-m", "nanojaxgpt.train", "configs/shakespeare_char.toml",
           f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--max_iters={steps}",
           f"--eval_interval={steps}", "--log_interval=10", "--checkpoint_interval=100000", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training on {data_dir} failed:\n{proc.stderr[-3000:]}")
    times = [float(t) for t in STEP_TIME.findall(proc.stderr)][2:]
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=storage.absolute)
    parser.add_argument("--latency_ms", type=float, default=50.0)
    parser.add_argument("--steps", type=int, default=300)
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" is the training command's own (argparse would take it as ours).
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.overrides = overrides

    server = GCSServer()
    proxy = LatencyProxy(server.port, args.latency_ms / 1000)
    try:
        remote = f"{server.create_bucket('bench-remote')}/data"
        os.environ.update(server.env())
        meta = data.read_meta(args.data_dir)
        storage.upload(Path(args.data_dir), remote,
                       [s.name for split in meta.splits.values() for s in split.shards] + [data.META])
        env = {**os.environ, **{k: v.replace(server.url, proxy.url) for k, v in server.env().items()}}
        env.pop("XLA_FLAGS", None)
        with tempfile.TemporaryDirectory() as out:
            results = {}
            for name, directory in (("local", args.data_dir), (f"gs:// +{args.latency_ms:g} ms", remote),
                                    ("local (again)", args.data_dir)):
                results[name] = train(directory, f"{out}/{len(results)}", args.steps, args.overrides, env)
                print(f"{name:<18} {results[name]:8.1f} ms/step", flush=True)
    finally:
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    main()
