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
    # A dimension the axis does not divide is replicated, not an error.
    assert sharding.mesh_spec(P("vocab", "embed"), (65, 6), mesh) == P(None, None)


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
