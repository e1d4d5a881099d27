"""Running tools/aot_compile.py as a user does, and the checks every shipped target must pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "aot_compile.py"


def needs_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail('libtpu is not installed: pip install -e ".[tpu]" (the TPU compiler; the AOT '
                    "tests need no TPU)", pytrace=False)


def aot_env() -> dict:
    """The caller's environment without JAX/XLA settings (fake CPU devices would change nothing,
    but a user's shell has none)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}


def aot(config: str, topology: str, *flags: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the tool; it takes /tmp/libtpu.lock itself, so runs queue."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{topology}.json"
    proc = subprocess.run([sys.executable, str(TOOL), str(REPO / "configs" / config),
                           f"--topology={topology}", f"--json={out}", *flags],
                          capture_output=True, text=True, env=aot_env(), timeout=900)
    return proc, json.loads(out.read_text()) if out.is_file() else {}


def check_fits(proc: subprocess.CompletedProcess, r: dict, headroom: float = 0.10,
               max_flops: float = 1.6) -> None:
    """Compiled, fits with `headroom` of HBM to spare, and executes at least the model's FLOPs
    (6N + 12LET), at most `max_flops` times them (a recompute more)."""
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert r["fits"] and r["per_chip_gib"] <= (1 - headroom) * r["hbm_gib"], proc.stdout
    assert r["model_flops_per_chip"] <= r["flops_per_chip"] <= max_flops * r["model_flops_per_chip"], proc.stdout


def check_gpt2_124m(proc: subprocess.CompletedProcess, r: dict, max_flops: float = 1.6,
                    max_collective_gib: float = 8) -> None:
    """configs/gpt2_124m.toml as shipped: fits, 491,520 tokens per step, state and traffic sharded."""
    check_fits(proc, r, max_flops=max_flops)
    assert r["tokens_per_step"] == 491_520, proc.stdout
    chips = r["chips"]
    assert r["seq_per_chip"] == 96 / chips, proc.stdout
    # FSDP: the parameters and both Adam moments (12 bytes a parameter) sharded over the chips,
    # plus what stays whole on every chip (the batch, small vectors): ~25 MiB measured
    assert r["argument_gib"] < 124.5e6 * 12 / chips / 2**30 * 1.05 + 1 / 32, proc.stdout
    # Data moves per chip per step: the weights gathered, the gradients reduced, not activations
    assert sum(r["collective_gib"].values()) < max_collective_gib, proc.stdout
