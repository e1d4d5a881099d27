"""Throughput of the real train step (program.build) on whatever backend is here.

    python tools/bench_train.py configs/gpt2_124m.toml [--key=value ...] \
        [--sweep=attention=xla,cudnn;remat=none,dots;per_device_batch=8,16] [--steps=10] [--json FILE]

Every point of the sweep (the product of its lists) builds the step on all local devices, creates
the state, compiles, runs 2 warm-up steps and then times --steps steps on random tokens. Reports
tokens/s, MFU (6N + 12LET per token over the devices' dense bf16 peak), ms/step and the peak
device memory. per_device_batch sets batch_size = it x (data x fsdp); a point that fails (out of
memory, a kernel this backend lacks) is reported and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nanojaxgpt import config, program, sharding  # noqa: E402
from nanojaxgpt import model as gpt  # noqa: E402
from nanojaxgpt.cli import run_command  # noqa: E402
from nanojaxgpt.progress import mfu, peak_flops_per_device  # noqa: E402

OWN_FLAGS = ("sweep", "steps", "warmup", "json")


def parse_sweep(text: str | None) -> list[dict[str, str]]:
    """'a=1,2;b=x' -> [{a: 1, b: x}, {a: 2, b: x}] (values stay strings, typed by the config)."""
    if not text:
        return [{}]
    axes = []
    for part in text.split(";"):
        key, eq, values = part.partition("=")
        if not eq or not values:
            raise config.ConfigError(f"--sweep part {part!r}: write key=v1,v2 (parts joined by ';')")
        axes.append([(key.strip(), v.strip()) for v in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)]


def _peak_memory_gib(devices: list) -> float | None:
    stats = [d.memory_stats() for d in devices]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) / 2**30 if peaks and None not in peaks else None


def bench(cfg: config.Config, steps: int, warmup: int) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    prog = program.build(cfg, mesh)
    state = prog.setup.init(cfg)
    rng = np.random.default_rng(0)
    vocab = cfg.model.vocab_size
    tokens = jax.make_array_from_callback(
        prog.batch.shape, prog.batch_sharding,
        lambda idx: rng.integers(0, vocab, size=prog.batch.shape, dtype=np.int32)[idx])
    t0 = time.perf_counter()
    train = prog.steps.train.lower(prog.abstract, prog.batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, out = train(state, tokens)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = train(state, tokens)
    loss = float(out["loss"])  # waits for the last step
    seconds = (time.perf_counter() - t0) / steps
    t, m = cfg.train, cfg.model
    tok = t.batch_size * t.gradient_accumulation_steps * m.block_size
    devices = list(mesh.devices.flat)
    util = mfu(gpt.flops_per_token(m), tok / seconds, len(devices), peak_flops_per_device(devices[0]))
    return {"tokens_per_s": tok / seconds, "ms_per_step": 1e3 * seconds, "mfu": util,
            "peak_memory_gib": _peak_memory_gib(devices), "compile_s": compile_s, "loss": loss,
            "seq_per_device": t.batch_size / program.batch_shards(mesh)}


def _line(point: dict, r: dict) -> str:
    what = " ".join(f"{k}={v}" for k, v in point.items()) or "as configured"
    if "error" in r:
        return f"{what}: FAILED {r['error']}"
    util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
    return (f"{what}: {r['tokens_per_s']:,.0f} tokens/s, {r['ms_per_step']:.1f} ms/step, MFU {util}, "
            f"peak memory {mem} ({r['seq_per_device']:g} seq/device, compiled in {r['compile_s']:.0f} s)")


def main(argv: list[str]) -> int:
    own = {k: None for k in OWN_FLAGS}
    rest = []
    for a in argv:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key in own and "=" in a:
            own[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not rest or rest[0].startswith("--"):
        raise config.ConfigError("usage: tools/bench_train.py CONFIG [--key=value ...] [--sweep=...]")
    base = config.load(rest[0], rest[1:])
    try:
        steps, warmup = int(own["steps"] or 10), int(own["warmup"] or 2)
    except ValueError:
        raise config.ConfigError(f"--steps={own['steps']} / --warmup={own['warmup']} must be integers") from None
    print(f"backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}",
          flush=True)
    results = []
    shards = program.batch_shards(sharding.make_mesh(base.mesh))
    for point in parse_sweep(own["sweep"]):
        changes = dict(point)
        if "per_device_batch" in changes:
            changes["train.batch_size"] = str(int(changes.pop("per_device_batch")) * shards)
        cfg = config.replace(base, changes, source="--sweep")
        try:
            r = bench(cfg, steps, warmup)
        except Exception as e:  # noqa: BLE001 - one point's failure (OOM, missing kernel) is a result
            r = {"error": " ".join(str(e).split())[:300]}
        print(_line(point, r), flush=True)
        results.append({"point": point, **r})
    if own["json"]:
        Path(own["json"]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    run_command(main, None, errors=(config.ConfigError,))
