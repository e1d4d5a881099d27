"""Tuning for XLA:CPU only: compiler options, and how many evaluation batches run per pass.

The project runs on TPUs and GPUs; the CPU quick start runs here too and should be fast. Every
CPU-only trick lives in this module, applied by the code that builds or starts the steps, and only
where the mesh is of CPU devices: the steps' math knows nothing of it, and on an accelerator each
function here returns the accelerator's default (no options, no grouping).
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh


def on_cpu(mesh: Mesh) -> bool:
    """The mesh is of CPU devices: the tuning below applies."""
    return mesh.devices.flat[0].platform == "cpu"


# Hand whole dot fusions (and reductions) to YNNPACK in the train step, where it is faster; the
# eval forward pass is faster with XLA's default, so it keeps the default (README: 'Measurements behind the code').
TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                 "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

# LLVM at -O2 instead of -O3 for the one-off init: a third of the compile time, and the parameters
# are bitwise the same (tests/test_step.py; -O0 changes them) (README: 'Measurements behind the code').
INIT_OPTIONS = {"xla_backend_optimization_level": 2}


def train_options(mesh: Mesh) -> dict[str, Any] | None:
    return TRAIN_OPTIONS if on_cpu(mesh) else None


def init_options(mesh: Mesh) -> dict[str, Any] | None:
    return INIT_OPTIONS if on_cpu(mesh) else None


def batches_per_eval_pass(mesh: Mesh, n_batches: int, batch_rows: int, block_size: int,
                          max_tokens: int = 4096) -> int:
    """How many eval batches to run as one forward pass: the most within `max_tokens` per device.

    Many small batches (the CPU recipe: 12 x 64 tokens, 200 of them) waste the machine on
    per-trip overhead, and a big pass falls out of the caches; a few thousand tokens per pass is
    fastest (README: 'Measurements behind the code'). GPT-2-sized batches run one at a time, and so does every batch on an
    accelerator. `batch_rows` is the rows of one batch per device.
    """
    if not on_cpu(mesh):
        return 1
    fits = max(1, max_tokens // (batch_rows * block_size))
    return max(g for g in range(1, n_batches + 1) if n_batches % g == 0 and g <= fits)
