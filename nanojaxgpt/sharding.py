"""The device mesh and the one table that says how every logical axis is laid out on it.

Parallelism is configuration: FSDP shards `embed` over the `fsdp` axis, tensor parallelism shards
`heads`/`mlp`/`vocab` over `tensor`, data parallelism shards `batch` over (`data`, `fsdp`).
The model only names its axes, of weights (nanojaxgpt.model.logical_axes) and of activations
(`constrain`, `vmap`, `per_shard` below); this module maps names to devices.

Activations are laid out while a step is traced inside `activations(mesh)`: every chip then
computes only its own sequences, with whole (gathered) weights; outside it (sampling, a single
device) the helpers do nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanojaxgpt.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> the mesh axes its dimension is split over. Every name the model uses is
# here: () replicates it, on purpose. A name missing from the table, or a dimension that its mesh
# axes do not divide, is a ShardingError, never a silent replication.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # the sequences of a batch: each chip computes only its own
    "replica": ("data",),  # data-parallel copies of the model: gradients summed once per step
    "embed": ("fsdp",),  # weights: FSDP keeps 1/fsdp of each on a chip ...
    "act_embed": (),  # ... activations the whole width: weights are gathered for use
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),  # the stacked blocks: every chip runs every layer
    "position": (),  # wpe's rows: a lookup table, small
    "qkv": (),  # q, k and v of one head stay together
    "head_dim": (),
    "seq": (),  # no sequence parallelism: a chip holds whole sequences
}


class ShardingError(ConfigError):
    """An array the mesh cannot lay out as the rules say; the message names the array and the fix."""


@dataclass(frozen=True)
class _Layout:
    """While a step is traced: the mesh its activations are laid out on, the mesh axes that an
    enclosing `vmap` already maps (a dimension can use each mesh axis only once), and whether
    the code runs per chip (inside `per_shard`: nothing left to lay out)."""
    mesh: Mesh
    taken: frozenset[str] = frozenset()
    per_chip: bool = False

    @property
    def active(self) -> bool:
        return self.mesh.size > 1 and not self.per_chip


_LAYOUT: contextvars.ContextVar[_Layout | None] = contextvars.ContextVar(
    "nanojaxgpt_layout", default=None)



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
    """A (data, fsdp, tensor) mesh over all global devices with Auto axes (classic GSPMD).

    With mesh.slices > 1 the data axis is the outer one over slices (over hosts where the devices
    are all on one slice): each slice holds whole fsdp x tensor groups, so weights are gathered and activations
    exchanged inside a slice, and only the gradient reduction of the data axis crosses between them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if cfg.slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    # TPU multislice devices carry their slice; elsewhere (GPU nodes, one slice) a host is one.
    by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
    unit = "slice" if by_slice else "host"
    found = len({getattr(d, "slice_index" if by_slice else "process_index") for d in devices})
    if found != cfg.slices:
        raise ConfigError(f"mesh.slices={cfg.slices} but the {len(devices)} devices are on {found} "
                          f"{unit}(s); set --mesh.slices={found}")
    if shape[0] % cfg.slices:
        raise ConfigError(f"mesh.slices={cfg.slices}: mesh.data={shape[0]} must be a multiple of it "
                          f"(data parallelism crosses {unit}s); e.g. --mesh.data={cfg.slices} "
                          "--mesh.fsdp=-1")
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // cfg.slices, shape[1], shape[2]), (cfg.slices, 1, 1), devices,
        process_is_granule=not by_slice)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _rule(name: str, what: str) -> tuple[str, ...]:
    if name not in RULES:
        close = difflib.get_close_matches(name, RULES, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ShardingError(f"{what}: logical axis {name!r} is not in the sharding table; {hint}"
                            f"add it to sharding.RULES (() replicates it); known: {', '.join(RULES)}")
    return RULES[name]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, taken: Collection[str] = (),
              what: str = "an array") -> P:
    """Logical names -> mesh axes for one array (`what`, for errors); each mesh axis is used at
    most once (and never one of `taken`). ShardingError for a name the table lacks or a dimension
    its mesh axes do not divide."""
    used: set[str] = set(taken)
    out = []
    for i, (name, dim) in enumerate(zip(logical, shape, strict=True)):
        if name is None:
            out.append(None)
            continue
        axes = tuple(a for a in _rule(name, what) if a not in used and mesh.shape[a] > 1)
        parts = math.prod(mesh.shape[a] for a in axes)
        if dim % parts:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            fix = (f"a --mesh.{axes[0]} that divides" if len(axes) == 1 else
                   " and ".join(f"--mesh.{a}" for a in axes) + " whose product divides")
            raise ShardingError(
                f"{what} {tuple(shape)}: dimension {i} ({name!r}, size {dim}) does not split over "
                f"mesh {sizes} ({parts} devices); choose {fix} {dim} ({_divisors(dim)}), or "
                f"give {name!r} the rule () in sharding.RULES to replicate it")
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named_shardings(mesh: Mesh, logical_tree: Any, shapes_tree: Any) -> Any:
    """Pytree of logical `P`s + matching pytree of arrays/ShapeDtypeStructs -> NamedShardings
    (a parameter the mesh cannot lay out is a ShardingError naming it)."""
    def one(path: tuple, spec: P, x: Any) -> NamedSharding:
        what = f"parameter {jax.tree_util.keystr(path, simple=True, separator='.')}"
        return NamedSharding(mesh, mesh_spec(spec, x.shape, mesh, what=what))

    return jax.tree_util.tree_map_with_path(one, logical_tree, shapes_tree)


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


@contextlib.contextmanager
def _using(layout: _Layout | None) -> Iterator[None]:
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def activations(mesh: Mesh) -> contextlib.AbstractContextManager[None]:
    """Lay out activations on `mesh` (by RULES) in what is traced inside (no-op on one device)."""
    return _using(_Layout(mesh))


def _active() -> _Layout | None:
    layout = _LAYOUT.get()
    return layout if layout is not None and layout.active else None


def _mapped(layout: _Layout, name: str, size: int) -> tuple[str, ...]:
    """The mesh axes a dimension of `size` named `name` is split over."""
    axes = mesh_spec(P(name), (size,), layout.mesh, layout.taken, what=f"the {name!r} dimension")[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x laid out as its logical dim names say (under `vmap`, the mapped dim is not named here)."""
    if (layout := _active()) is None:
        return x
    spec = mesh_spec(P(*names), x.shape, layout.mesh, layout.taken, what=f"activation {names}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def vmap(f: Callable, name: str, size: int, **vmap_kwargs: Any) -> Callable:
    """jax.vmap over a dimension of `size` named `name`: on the active mesh, the mapped dimension
    of every constrained activation and every `per_shard` kernel inside is split by RULES[name]
    (jax.vmap's spmd_axis_name), so that the chips share the mapped items instead of each
    computing all of them."""
    if (layout := _active()) is None:
        return jax.vmap(f, **vmap_kwargs)
    axes = _mapped(layout, name, size)
    inner_layout = replace(layout, taken=layout.taken | set(axes))

    def inner(*args: Any) -> Any:
        with _using(inner_layout):
            return f(*args)

    return jax.vmap(inner, spmd_axis_name=axes or None, **vmap_kwargs)


def split(name: str, size: int) -> int:
    """Into how many parts the active mesh splits a dimension of `size` named `name` (1: none)."""
    if (layout := _active()) is None:
        return 1
    return math.prod(layout.mesh.shape[a] for a in _mapped(layout, name, size))


def stacked(shardings: Any, name: str, size: int) -> Any:
    """Shardings of arrays with a new leading dim of `size` named `name` before each of these."""
    if (layout := _active()) is None:
        return shardings
    axes = _mapped(layout, name, size)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(lead, *s.spec)), shardings)


def per_shard(f: Callable, names: Sequence[str | None]) -> Callable:
    """f(*arrays) -> array run on each chip's own shard: for kernels XLA cannot partition (Pallas,
    cuDNN). The arguments and the result have dims named `names` (the result the first argument's
    shape); under `vmap`, the mapped dims are split as that vmap says."""
    if (layout := _active()) is None:
        return f

    def local(*args: Any) -> Any:
        with _using(replace(layout, per_chip=True)):
            return f(*args)

    def run(*args: jax.Array) -> jax.Array:
        specs = [mesh_spec(P(*names), a.shape, layout.mesh, layout.taken, what=f"kernel input {names}")
                 for a in args]
        return jax.shard_map(local, mesh=layout.mesh, in_specs=tuple(specs), out_specs=specs[0],
                             check_vma=False)(*args)

    return run


def platform() -> str:
    """The platform that what is being traced will run on: the mesh's devices, else the default
    device's. Decided by the devices, so a TPU program traces on a host without a TPU."""
    layout = _LAYOUT.get()
    return (layout.mesh.devices.flat[0] if layout is not None else jax.devices()[0]).platform
