"""tools/aot_compile.py: the real train step compiled by the real XLA:TPU compiler, no TPU needed.

A compile takes 1 to 4 minutes on 2 cores and only one process may use libtpu at a time, so the
suite compiles one shipped config for one slice; `pytest -m aot tests/test_aot.py` compiles the
shipped configs for every topology the README lists (about 20 minutes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nanojaxgpt import hlo

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "aot_compile.py"


def test_hlo_counts_loop_bodies_by_their_trips():
    """A 7-trip scan of a matmul and a psum: 7 x the body, per device, as XLA:CPU compiled it."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))

    def f(a, w):
        def body(c, _):
            y = jnp.tanh(c @ w)  # per device [16, 128] @ [128, 128]
            s = jax.shard_map(lambda t: jax.lax.psum(t, "x"), mesh=mesh, in_specs=P("x"),
                              out_specs=P())(y[:32])  # per device f32[4, 128] summed
            return y, s.sum()
        return jax.lax.scan(body, a, None, length=7)

    a = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
    run = hlo.analyze(jax.jit(f).lower(a, w).compile().as_text())
    assert run.flops == 7 * 2 * 16 * 128 * 128
    assert run.collective_counts["all-reduce"] == 7
    assert run.collective_bytes["all-reduce"] == 7 * 4 * 128 * 4
    assert run.unknown_loops == []


def _needs_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail('libtpu is not installed: pip install -e ".[tpu]" (the TPU compiler; the AOT '
                    "tests need no TPU)", pytrace=False)


def aot(config: str, topology: str, *flags: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the tool as a user does; it takes /tmp/libtpu.lock itself, so runs queue."""
    out = tmp_path / f"{topology}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    proc = subprocess.run([sys.executable, str(TOOL), str(REPO / "configs" / config),
                           f"--topology={topology}", f"--json={out}", *flags],
                          capture_output=True, text=True, env=env, timeout=900)
    return proc, json.loads(out.read_text()) if out.is_file() else {}


def _check_fits(proc: subprocess.CompletedProcess, r: dict, headroom: float = 0.10) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert r["fits"] and r["per_chip_gib"] <= (1 - headroom) * r["hbm_gib"], proc.stdout
    # The executed matmul FLOPs: at least the model's 6N + 12LET, at most a recompute more.
    assert r["model_flops_per_chip"] <= r["flops_per_chip"] <= 1.6 * r["model_flops_per_chip"], proc.stdout


@pytest.mark.timeout(900)
def test_gpt2_124m_as_shipped_fits_v4_8(tmp_path):
    """The fastest of the shipped slices to compile (4 chips): 1 to 3 minutes here."""
    _needs_libtpu()
    proc, r = aot("gpt2_124m.toml", "v4-8", tmp_path=tmp_path)
    _check_fits(proc, r)
    assert r["tokens_per_step"] == 491_520 and r["seq_per_chip"] == 24
    # FSDP: the parameters and both Adam moments (12 bytes a parameter) sharded over the 4 chips
    assert r["argument_gib"] < 124.5e6 * 12 / 4 / 2**30 * 1.1, proc.stdout
    # Data moves per chip per step: the weights gathered, the gradients reduced, not activations
    assert sum(r["collective_gib"].values()) < 8, proc.stdout


@pytest.mark.timeout(300)
def test_out_of_memory_exits_3_saying_what_to_change(tmp_path):
    _needs_libtpu()
    proc, r = aot("gpt2_124m.toml", "v5e-16", "--batch_size=1024", "--gradient_accumulation_steps=1",
                  "--remat=none", tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: v5e-16: the train step does not fit") and "--batch_size" in line
    assert "--remat=full" in line and r["fits"] is False and r["per_chip_gib"] > r["hbm_gib"]


def test_bad_topology_is_one_line_exit_2(tmp_path):
    proc, _ = aot("gpt2_124m.toml", "v9-1", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "v5e-16" in proc.stderr


SHIPPED = [("gpt2_124m.toml", t) for t in ("v4-32", "v5e-16", "v5p-8", "v6e-8", "h100x8")] + [
    ("gpt2_xl.toml", "v4-32"), ("gpt2_xl.toml", "v5e-16")]


@pytest.mark.aot
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config,topology", SHIPPED)
def test_shipped_config_fits(config, topology, tmp_path):
    if topology != "h100x8":
        _needs_libtpu()
    proc, r = aot(config, topology, tmp_path=tmp_path)
    _check_fits(proc, r)
