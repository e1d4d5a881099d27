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


# Hand whole dot fusions (and reductions) to YNNPACK in the train step. Measured on 2 cores, A/B
# interleaved in one process: the CPU quick-start step (4 x 128, 12 x 64 tokens) takes 20.6 ms
# instead of 27.1, a 6 x 384 model 686 ms instead of 738. The eval forward pass is faster with
# XLA's default (1.07 vs 1.15 s for 200 batches), so it keeps the default.
TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                 "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

# LLVM at -O2 instead of -O3 for the one-off init. Measured on 2 cores: its compile takes 0.6 s
# instead of 1.8 s for the CPU quick-start model and for GPT-2 124M alike, and the parameters are
# bitwise the same (-O0 changes them).
INIT_OPTIONS = {"xla_backend_optimization_level": 2}


def train_options(mesh: Mesh) -> dict[str, Any] | None:
    return TRAIN_OPTIONS if on_cpu(mesh) else None


def init_options(mesh: Mesh) -> dict[str, Any] | None:
    return INIT_OPTIONS if on_cpu(mesh) else None


def batches_per_eval_pass(mesh: Mesh, n_batches: int, batch_rows: int, block_size: int,
                          max_tokens: int = 4096) -> int:
    """How many eval batches to run as one forward pass: the most within `max_tokens` per device.

    Many small batches (the CPU recipe: 12 x 64 tokens, 200 of them) waste the machine on
    per-trip overhead, and a big pass falls out of the caches: measured on 2 CPU cores, 200
    batches took 0.94 s one at a time, 0.84-0.85 s in groups of 4-5 (3-4k tokens per pass),
    1.09 s in groups of 20 and 1.25 s in groups of 100. GPT-2-sized batches run one at a time,
    and so does every batch on an accelerator. `batch_rows` is the rows of one batch per device.
    """
    if not on_cpu(mesh):
        return 1
    fits = max(1, max_tokens // (batch_rows * block_size))
    return max(g for g in range(1, n_batches + 1) if n_batches % g == 0 and g <= fits)
