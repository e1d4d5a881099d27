"""The device mesh and the one table that says how every logical axis is laid out on it.

Parallelism is configuration: FSDP shards `embed` over the `fsdp` axis, tensor parallelism shards
`heads`/`mlp`/`vocab` over `tensor`, data parallelism shards `batch` over (`data`, `fsdp`).
The model only names its axes (nanojaxgpt.model.logical_axes); this module maps names to devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanojaxgpt.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Names not listed (layers, position, qkv, head_dim, seq) are
# never sharded. A dimension the mesh axes do not divide evenly is replicated instead.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve a -1 axis to the rest of the devices and check the product is the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}: {n_devices} devices "
                f"cannot be split so that the fixed axes ({known} devices) divide them")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} "
            f"devices but there are {n_devices} (set one of --mesh.data/--mesh.fsdp/--mesh.tensor "
            f"to -1 to use the rest)")
    return sizes[0], sizes[1], sizes[2]


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all global devices with Auto axes (classic GSPMD)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Logical names -> mesh axes for one array; each mesh axis is used at most once."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape, strict=True):
        axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return P(*out)


def named_shardings(mesh: Mesh, logical_tree: Any, shapes_tree: Any) -> Any:
    """Pytree of logical `P`s + matching pytree of arrays/ShapeDtypeStructs -> NamedShardings."""
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, mesh_spec(spec, x.shape, mesh)),
                        logical_tree, shapes_tree)


def on_cpu(mesh: Mesh) -> bool:
    """The mesh is of CPU devices: XLA:CPU-only tuning applies (compiler options, malloc)."""
    return mesh.devices.flat[0].platform == "cpu"


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int) -> NamedSharding:
    """Sharding of a token array whose `batch_dim` holds sequences of the global batch."""
    spec = [None] * ndim
    spec[batch_dim] = RULES["batch"]
    return NamedSharding(mesh, P(*spec))


def host_local_array(global_shape: tuple[int, ...], sharding: NamedSharding, read_rows) -> jax.Array:
    """A global array whose rows (axis -2) this host reads itself: only those on its devices.

    `read_rows(rows: np.ndarray) -> np.ndarray[len(rows), ...]` reads rows of the flattened
    leading axes; it is called once per step with every row any local device needs, so no
    host ever reads another host's data and the global array never exists on one host.
    """
    index_map = sharding.addressable_devices_indices_map(global_shape)
    lead = global_shape[:-1]
    flat = np.arange(math.prod(lead)).reshape(lead)
    needed = np.unique(np.concatenate([flat[idx[:-1]].ravel() for idx in index_map.values()]))
    data = read_rows(needed)
    position = {int(r): i for i, r in enumerate(needed)}

    def block(idx):
        rows = flat[idx[:-1]]
        picked = data[[position[int(r)] for r in rows.ravel()]]
        return picked.reshape(rows.shape + data.shape[1:])[..., idx[-1]]

    return jax.make_array_from_callback(global_shape, sharding, block)
