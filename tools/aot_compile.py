"""Check a config on a TPU slice or GPU node before booking it: compile its real train step here.

    pip install -e ".[tpu]"          # the TPU compiler (libtpu); no TPU needed
    python tools/aot_compile.py configs/gpt2_124m.toml --topology=v5e-16 [--key=value ...] [--json FILE] [--hlo FILE]

Prints per chip: memory (arguments, temporaries, total vs HBM), sequences per chip, collective
bytes per step by kind, FLOPs per step, and a roofline step time with the MFU it implies.
--json writes the figures below as JSON; --hlo the compiled per-device HLO text.
Exit codes: 0 fits, 3 does not fit (the message says what to change), 2 a bad config or flag.
Topologies: v4-8 v4-32 v4-32x2 v5p-8 v5e-16 v5e-16x2 v5e-256 v6e-8 h100x8 (x2 = two slices).
A compile takes 1 to 4 minutes on 2 cores; only one process at a time can use libtpu.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanojaxgpt import aot, config, topology  # noqa: E402
from nanojaxgpt.cli import hard_exit, run_command  # noqa: E402


def _take(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of --flag=VALUE (or --flag VALUE) and argv without it."""
    value, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{flag}" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if a.startswith(f"--{flag}="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def main(argv: list[str]) -> int:
    name, argv = _take(argv, "topology")
    out, argv = _take(argv, "json")
    hlo_file, argv = _take(argv, "hlo")
    if name is None or name not in topology.TOPOLOGIES:
        raise config.ConfigError(f"--topology={name}: choose one of {', '.join(topology.TOPOLOGIES)}")
    topo = topology.TOPOLOGIES[name]
    if not argv or argv[0].startswith("--"):
        raise config.ConfigError("usage: tools/aot_compile.py CONFIG --topology=NAME [--key=value ...]")
    cfg = config.load(argv[0], argv[1:])
    try:
        r = aot.report(cfg, topo, hlo_file)
    except aot.OutOfMemory as e:
        if out:
            Path(out).write_text(json.dumps(e.to_json(name), indent=2))
        raise
    print(aot.format_report(r), flush=True)
    if out:
        Path(out).write_text(json.dumps(r.to_json(), indent=2))
    return 0 if r.fits else 3


if __name__ == "__main__":
    if "h100" in " ".join(sys.argv):  # the CUDA plugin's compile-only path, set before jax starts
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing runs here: only the compiler is used
    run_command(main, None, errors=(config.ConfigError, aot.OutOfMemory, topology.TopologyError),
                exit=hard_exit)
