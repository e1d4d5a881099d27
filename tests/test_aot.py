"""tools/aot_compile.py: the real train step compiled by the real XLA:TPU compiler, no TPU needed.

A compile takes 1 to 4 minutes on 2 cores and only one process may use libtpu at a time, so the
suite compiles one shipped config for one slice (the README's command, tests/test_readme.py);
`pytest -m aot tests/test_aot.py` compiles the shipped configs for every topology the README
lists (about 40 minutes here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nanojaxgpt import hlo
from tests.aot_run import REPO, aot, aot_env, check_fits, check_gpt2_124m, needs_libtpu


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


# XLA:TPU's bidirectional windowed einsum (FSDP weights gathered while multiplying) counts to
# the number of shards in steps of 2, with two shards' dots per trip: 8 shards are 4 trips.
_STEP_2_LOOP = """HloModule m
%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,4] get-tuple-element(%p), index=1
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %y = f32[4,4] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,4]) tuple(%next, %y)
}
%cond (q: (s32[], f32[4,4])) -> pred[] {
  %q = (s32[], f32[4,4]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %eight = s32[] constant(8)
  ROOT %lt = pred[] compare(%j, %eight), direction=LT
}
ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,4]) tuple(%zero, %a)
  %w = (s32[], f32[4,4]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4,4] get-tuple-element(%w), index=1
}
"""


def test_hlo_counts_a_loop_by_its_counter_step():
    run = hlo.analyze(_STEP_2_LOOP)
    assert run.flops == 4 * 2 * 4 * 4 * 4 and run.unknown_loops == []
    assert hlo.analyze(_STEP_2_LOOP.replace("constant(2)", "constant(1)")).flops == 8 * 2 * 4 * 4 * 4


# Multislice, as XLA:TPU compiles it: one slice's program; what crosses slices is a `send` to the
# host's DCN runtime, tagged with its collective (the gradient shard's all-reduce here).
_TWO_SLICES = """HloModule m
ENTRY %main (g: f32[40,8,128]) -> f32[40,8,128] {
  %g = f32[40,8,128] parameter(0)
  %t = token[] after-all()
  %s = (f32[40,8,128], u32[], token[]) send(%g, %t), channel_id=10, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}
  %r = (f32[40,8,128], u32[], token[]) recv(%t), channel_id=11, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %ag = f32[160,8,128] all-gather(%g), channel_id=1, replica_groups=[4,4]<=[16], dimensions={0}
  ROOT %out = f32[40,8,128] get-tuple-element(%r), index=0
}
"""


def test_hlo_counts_what_crosses_slices_once():
    run = hlo.analyze(_TWO_SLICES)
    shard = 4 * 40 * 8 * 128
    assert run.cross_slice_bytes == {"all-reduce": shard}  # the send; its recv is the same bytes
    assert run.collective_bytes == {"all-reduce": shard, "all-gather": 4 * shard}
    assert hlo.analyze(_STEP_2_LOOP).cross_slice_bytes == {}


@pytest.mark.timeout(300)
def test_out_of_memory_exits_3_saying_what_to_change(tmp_path):
    needs_libtpu()
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


# v5e-16 is compiled in the suite by tests/test_readme.py (the README's command).
SHIPPED = [("gpt2_124m.toml", t) for t in ("v4-8", "v4-32", "v5p-8", "v6e-8", "h100x8")] + [
    ("gpt2_xl.toml", "v4-32"), ("gpt2_xl.toml", "v5e-16")]


@pytest.mark.aot
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config,topology", SHIPPED)
def test_shipped_config_fits(config, topology, tmp_path):
    if topology != "h100x8":
        needs_libtpu()
    proc, r = aot(config, topology, tmp_path=tmp_path)
    (check_gpt2_124m if config == "gpt2_124m.toml" else check_fits)(proc, r)


@pytest.mark.aot
@pytest.mark.timeout(1800)
def test_fsdp_on_v4_32_moves_little_and_keeps_data_parallel_memory(tmp_path):
    """6 sequences per chip on 16 chips: FSDP's collectives stay under 8 GiB per chip per step and
    its temporaries within 1.5x of pure data parallelism's at the same per-chip batch."""
    needs_libtpu()
    proc, fsdp = aot("gpt2_124m.toml", "v4-32", "--mesh.fsdp=-1", tmp_path=tmp_path / "fsdp")
    check_fits(proc, fsdp)
    assert fsdp["seq_per_chip"] == 6 and sum(fsdp["collective_gib"].values()) <= 8, proc.stdout
    proc, dp = aot("gpt2_124m.toml", "v4-32", "--mesh.data=-1", "--mesh.fsdp=1", tmp_path=tmp_path / "dp")
    check_fits(proc, dp)
    assert dp["seq_per_chip"] == 6 and fsdp["temp_gib"] <= 1.5 * dp["temp_gib"], (fsdp, dp)


@pytest.mark.aot
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mesh", [["--mesh.fsdp=-1"], ["--mesh.data=-1", "--mesh.fsdp=1"]], ids=["fsdp", "dp"])
def test_splash_attention_compiles_sharded_on_v4_32(mesh, tmp_path):
    needs_libtpu()
    proc, r = aot("gpt2_124m.toml", "v4-32", "--attention=splash", *mesh, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert r["fits"] and r["per_chip_gib"] <= 0.9 * r["hbm_gib"], proc.stdout


MESH_ROWS = """
import json, sys
from nanojaxgpt import aot, config, topology
topo = topology.TOPOLOGIES["v5e-16x2"]
cfg = config.load(sys.argv[1], ["--mesh.data=2", "--mesh.fsdp=-1"])
with aot.libtpu_lock(topo):
    mesh = aot.make_mesh(cfg, topo, topology.devices(topo))
    print(json.dumps([dict(mesh.shape), [sorted({d.slice_index for d in row.flat}) for row in mesh.devices]]))
"""


@pytest.mark.aot
@pytest.mark.timeout(1200)
def test_two_slices_span_the_data_axis_and_fit(tmp_path):
    """v5e-16x2: the mesh's data axis is the slices (each row of the mesh one slice's 16 chips, so
    only the data axis's gradient reduction crosses the data-centre network), and the step fits."""
    needs_libtpu()
    proc = subprocess.run([sys.executable, "-c", MESH_ROWS, str(REPO / "configs/gpt2_124m.toml")],
                          capture_output=True, text=True, env=aot_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shape, rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shape == {"data": 2, "fsdp": 16, "tensor": 1} and rows == [[0], [1]]
    proc, r = aot("gpt2_124m.toml", "v5e-16x2", "--mesh.data=2", "--mesh.fsdp=-1", tmp_path=tmp_path)
    check_fits(proc, r)
    assert r["seq_per_chip"] == 3, proc.stdout
    # What crosses the slices: each chip's shard of the gradients, once per step (124M float32
    # parameters over 16 chips, 0.029 GiB), and a few activations; the weights' all-gathers stay
    # inside a slice.
    dcn = r["cross_slice_gib"]
    assert 0.5 * 0.029 <= dcn["all-reduce"] <= 1.5 * 0.029, proc.stdout
    assert sum(dcn.values()) <= 0.05 * sum(r["collective_gib"].values()), proc.stdout
    assert re.search(r"of which between the 2 slices \(DCN\): .*all-reduce 0\.0[34]", proc.stdout), proc.stdout
