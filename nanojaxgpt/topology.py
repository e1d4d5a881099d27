"""Accelerator slices a run can be compiled for ahead of time, without the hardware.

libtpu (pip install -e ".[tpu]") gives compile-only TPU devices for any slice shape through
jax.experimental.topologies; the CUDA plugin does the same for a GPU node from a device
description. Each entry carries the per-chip figures a roofline needs.

Chip figures (per chip, dense bfloat16), from the vendors' published specifications:
  TPU v4   275 TFLOP/s, 32 GiB HBM at 1,200 GB/s, ICI 2,400 Gbit/s
  TPU v5e  197 TFLOP/s, 16 GiB HBM at   819 GB/s, ICI 1,600 Gbit/s
  TPU v5p  459 TFLOP/s, 95 GiB HBM at 2,765 GB/s, ICI 4,800 Gbit/s
  TPU v6e  918 TFLOP/s, 32 GiB HBM at 1,640 GB/s, ICI 3,200 Gbit/s
  H100 SXM 989 TFLOP/s, 80 GB HBM3 at 3,350 GB/s, NVLink 900 GB/s
`hbm_gib` is what one program may use: for TPUs the limit the TPU compiler states in its
out-of-memory errors (e.g. "exceeds available HBM (30.75G)" on v4); for the H100 JAX's default
GPU allocation, 75% of the 79.1 GiB the device reports (XLA_PYTHON_CLIENT_MEM_FRACTION=.75).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_gib: float  # usable by one program
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # one chip's interconnect bandwidth, all links


@dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    platform: str  # "tpu" or "cuda"
    topology_name: str  # libtpu's "v4:2x2x4", or the GPU node's "1x1x8"
    chip_config: str = "default"  # "megacore" for v4/v5p: two TensorCores as one device
    chips_per_host: tuple[int, int, int] = (2, 2, 1)
    num_slices: int = 1
    # Between slices, per chip: an assumed 200 Gbit/s NIC per host, shared by its 4 chips.
    dcn_bytes_per_s: float = 200e9 / 8 / 4


V4 = Chip("TPU v4", 275e12, 30.75, 1.2e12, 2400e9 / 8)
V5E = Chip("TPU v5e", 197e12, 15.75, 819e9, 1600e9 / 8)
V5P = Chip("TPU v5p", 459e12, 95.74, 2765e9, 4800e9 / 8)
V6E = Chip("TPU v6e", 918e12, 31.25, 1640e9, 3200e9 / 8)
H100 = Chip("H100 SXM", 989e12, 59.3, 3350e9, 900e9 / 2)  # NVLink 900 GB/s is both directions

TOPOLOGIES = {t.name: t for t in [
    Topology("v4-8", V4, "tpu", "v4:2x2x1", "megacore"),
    Topology("v4-32", V4, "tpu", "v4:2x2x4", "megacore"),
    Topology("v4-32x2", V4, "tpu", "v4:2x2x4", "megacore", num_slices=2),
    Topology("v5p-8", V5P, "tpu", "v5:2x2x1", "megacore"),
    Topology("v5e-16", V5E, "tpu", "v5e:4x4"),
    Topology("v5e-16x2", V5E, "tpu", "v5e:4x4", num_slices=2),
    Topology("v5e-256", V5E, "tpu", "v5e:16x16"),
    Topology("v6e-8", V6E, "tpu", "v6e:2x4"),
    Topology("h100x8", H100, "cuda", "1x1x8"),
]}

# XLA's H100 SXM device description, trimmed (the CUDA compiler needs one without a GPU).
_H100_TARGET = Path(__file__).resolve().parent / "h100_sxm.txtpb"


class TopologyError(RuntimeError):
    """The compile-only devices cannot be made here; the message says what to install."""


def devices(topo: Topology) -> list:
    """The compile-only devices of every chip of the topology (all slices)."""
    from jax.experimental import topologies

    if topo.platform == "cuda":
        try:
            desc = topologies.get_topology_desc(platform="cuda", topology=topo.topology_name,
                                                target_config=_H100_TARGET.read_text())
        except Exception as e:  # noqa: BLE001 - the plugin's errors are its own types
            raise TopologyError(f"{topo.name}: no compile-only CUDA devices ({e}); install "
                                f"jax-cuda12-plugin and jax-cuda12-pjrt =={jax.__version__} "
                                "(README: 'Check a slice before you book it')") from None
        return list(desc.devices)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(f"{topo.name}: libtpu is not installed; pip install -e \".[tpu]\" "
                            "(the TPU compiler; no TPU needed)") from None
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.chips_per_host, num_slices=topo.num_slices, wrap=(False,) * 3)
    return list(desc.devices)
