"""The mesh, the logical-axis rules table, and host-local global batches (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanojaxgpt import sharding
from nanojaxgpt.config import ConfigError, MeshConfig


def test_mesh_fills_the_rest_and_is_auto():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("cfg,msg", [
    (MeshConfig(data=3, fsdp=1, tensor=1), "needs 3 devices but there are 8"),
    (MeshConfig(data=3, fsdp=-1, tensor=1), "cannot be split"),
    (MeshConfig(data=2, fsdp=-1, slices=2),
     r"mesh.slices=2 but the 8 devices are on 1 host\(s\); set --mesh.slices=1"),
])
def test_mesh_that_does_not_match_the_devices_is_a_clear_error(cfg, msg):
    with pytest.raises(ConfigError, match=msg):
        sharding.make_mesh(cfg)


def test_rules_table():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    assert sharding.mesh_spec(P("vocab", "embed"), (50304, 768), mesh) == P("tensor", "fsdp")
    assert sharding.mesh_spec(P("layers", "embed", "mlp"), (4, 128, 512), mesh) == P(None, "fsdp", "tensor")
    assert sharding.mesh_spec(P("batch", "seq"), (16, 64), mesh) == P("fsdp", None)
    dp = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.mesh_spec(P("batch", None), (8, 3), dp) == P(("data", "fsdp"), None)
    # Names the table replicates, by rules written in it.
    assert sharding.mesh_spec(P("layers", "qkv", "heads", "head_dim"), (4, 3, 8, 16), mesh) == P(
        None, None, "tensor", None)


def test_a_dimension_the_mesh_does_not_divide_is_an_error_naming_it_and_the_fix():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    with pytest.raises(sharding.ShardingError) as e:
        sharding.mesh_spec(P("vocab", "embed"), (65, 6), mesh, what="parameter wte.weight")
    assert str(e.value) == (
        "parameter wte.weight (65, 6): dimension 0 ('vocab', size 65) does not split over mesh "
        "tensor=2 (2 devices); choose a --mesh.tensor that divides 65 (1, 5, 13, 65), or give "
        "'vocab' the rule () in sharding.RULES to replicate it")
    dp = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with pytest.raises(sharding.ShardingError, match=r"dimension 0 \('batch', size 6\) does not "
                       r"split over mesh data=2 x fsdp=2 \(4 devices\); choose --mesh.data and "
                       r"--mesh.fsdp whose product divides 6 \(1, 2, 3, 6\)"):
        sharding.mesh_spec(P("batch", None), (6, 3), dp)
    # A mesh axis of size 1 splits nothing, so it divides everything.
    assert sharding.mesh_spec(P("vocab"), (65,), sharding.make_mesh(MeshConfig(fsdp=-1))) == P(None)


def test_a_name_the_table_does_not_know_is_an_error_with_the_close_ones():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    with pytest.raises(sharding.ShardingError, match=r"parameter h.attn.w: logical axis 'head' is "
                       r"not in the sharding table; did you mean heads, head_dim\? add it to "
                       r"sharding.RULES \(\(\) replicates it\)"):
        sharding.mesh_spec(P("embed", "head"), (64, 4), mesh, what="parameter h.attn.w")


def test_every_name_the_models_use_is_in_the_table():
    from nanojaxgpt import model as gpt
    from nanojaxgpt.config import ModelConfig

    for variant in ({}, {"mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "bias": False}):
        axes = jax.tree.leaves(gpt.logical_axes(gpt.abstract_model(ModelConfig(**variant))),
                               is_leaf=lambda x: isinstance(x, P))
        assert {n for spec in axes for n in spec if n is not None} <= set(sharding.RULES)


def test_host_local_array_reads_only_needed_rows_and_matches():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    full = np.arange(3 * 8 * 5, dtype=np.int32).reshape(3, 8, 5)
    calls = []

    def read_rows(rows):
        calls.append(rows)
        return full.reshape(24, 5)[rows]

    arr = sharding.host_local_array((3, 8, 5), sharding.batch_sharding(mesh, 3, 1), read_rows)
    np.testing.assert_array_equal(np.asarray(arr), full)
    assert len(calls) == 1 and sorted(calls[0]) == list(range(24))  # one process holds all rows
    assert arr.sharding.spec == P(None, ("data", "fsdp"), None)
