"""Time async checkpoints of a GPT-2-124M-sized train state: how long a save stalls the training
step, how long the write takes in all, and how long a restore takes, to local disk and to GCS.
`digest s` is the integrity check's share: one pass over the state on the devices
(nanojaxgpt/integrity.py), part of both a save's blocking time and a restore.

    python tools/bench_checkpoint.py                         # 124M params, local disk
    python tools/bench_checkpoint.py --gcs emulator          # also the loopback GCS emulator
    python tools/bench_checkpoint.py --params 30e6 --dir /tmp/bench --gcs gs://my-bucket/bench

The state is what training saves: params + AdamW mu + nu, float32 = 3 x 4 bytes x params
(124M -> 1.49 GB), as 12 stacked layer arrays + embeddings like GPT with scan_layers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanojaxgpt import checkpoint, integrity
from nanojaxgpt.config import CheckpointConfig, Config


@dataclass(frozen=True)
class Timing:
    target: str
    blocked_s: float  # save() returns: what the training step waits for
    total_s: float  # save() start to the checkpoint being complete on storage
    restore_s: float
    digest_s: float  # integrity.compute of the state: paid once per save and once per restore
    nbytes: int


def make_params(n_params: float, n_layer: int = 12) -> dict[str, jax.Array]:
    """GPT-2-shaped float32 arrays totalling about n_params (n_embd scaled to fit)."""
    # GPT-2: 12 L E^2 (blocks) + (50304 + 1024) E (embeddings) parameters; solve for E.
    a, b = 12 * n_layer, 50304 + 1024
    e = max(8, int((-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)))
    shapes = {"wte": (50304, e), "wpe": (1024, e), "h.c_attn": (n_layer, e, 3 * e),
              "h.c_proj": (n_layer, e, e), "h.c_fc": (n_layer, e, 4 * e),
              "h.mlp_proj": (n_layer, 4 * e, e)}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    # Random values: trained weights do not compress, zeros would flatter the numbers.
    return {k: jax.random.normal(key, s, jnp.float32) for key, (k, s) in zip(keys, shapes.items())}


def bench(target: str, out_dir: str, n_params: float, repeats: int) -> list[Timing]:
    params = make_params(n_params)
    state = {"model": params, "opt_state": {"mu": jax.tree.map(lambda x: x * 0.1, params),
                                            "nu": jax.tree.map(lambda x: x * x, params)},
             "step": jnp.int32(0)}
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    config = Config()
    integrity.compute(state)  # compile the digest pass once, as a run's first save does
    timings = []
    with checkpoint.Checkpointer(out_dir, CheckpointConfig()) as ckpt:
        first = (ckpt.latest_step() or 0) + 1  # a reused --dir: save after what it holds
    for step in range(first, first + repeats):
        with checkpoint.Checkpointer(out_dir, CheckpointConfig(keep_checkpoints=2)) as ckpt:
            t0 = time.perf_counter()
            ckpt.save(step, state, config)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
        with checkpoint.Checkpointer(out_dir, CheckpointConfig()) as ckpt:
            t3 = time.perf_counter()
            restored = ckpt.restore(abstract)
            jax.block_until_ready(restored.state)
            t4 = time.perf_counter()
        assert np.array_equal(np.asarray(restored.state["model"]["wpe"]),
                              np.asarray(params["wpe"]))
        del restored
        t5 = time.perf_counter()
        integrity.compute(state)
        digest_s = time.perf_counter() - t5
        timings.append(Timing(target, t1 - t0, t2 - t0, t4 - t3, digest_s, nbytes))
    return timings


def report(timings: list[Timing]) -> str:
    lines = [f"{'target':<10} {'state GB':>8} {'save blocks s':>13} {'save total s':>12} "
             f"{'write GB/s':>10} {'restore s':>9} {'read GB/s':>9} {'digest s':>8}"]
    for t in timings:
        gb = t.nbytes / 1e9
        lines.append(f"{t.target:<10} {gb:8.2f} {t.blocked_s:13.3f} {t.total_s:12.2f} "
                     f"{gb / t.total_s:10.2f} {t.restore_s:9.2f} {gb / t.restore_s:9.2f} "
                     f"{t.digest_s:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=124e6, help="model parameters (124e6)")
    parser.add_argument("--repeats", type=int, default=2, help="saves and restores per target")
    parser.add_argument("--dir", help="local run directory (default: a fresh temporary one)")
    parser.add_argument("--gcs", help="'emulator' (starts tools/gcs_server.py's fake-gcs-server "
                                      "on loopback) or a gs://bucket/path to time")
    parser.add_argument("--no-local", action="store_true", help="skip the local-disk target")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"{args.params / 1e6:.0f} M params x 3 (params, AdamW mu, nu) float32")
    timings = []
    if not args.no_local:
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
            timings += bench("local", args.dir or tmp, args.params, args.repeats)
    if args.gcs == "emulator":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tools.gcs_server
        from tools.gcs_server import GCSServer

        server = GCSServer()
        try:
            os.environ.update(server.env())
            bucket = server.create_bucket("bench-checkpoint")
            timings += bench("emulator", f"{bucket}/run", args.params, args.repeats)
        finally:
            server.stop()
    elif args.gcs:
        timings += bench("gcs", args.gcs, args.params, args.repeats)
    print(report(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
