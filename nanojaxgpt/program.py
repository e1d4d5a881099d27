"""The program a run executes on a mesh: its jitted steps, abstract state and batch shapes.

train.py runs it; tools/aot_compile.py compiles the very same train step for a TPU slice or a GPU
node that is not there, and tools/bench_train.py times it: one builder, so what is checked ahead
of time is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from nanojaxgpt import model as gpt
from nanojaxgpt import sharding
from nanojaxgpt.config import Config, ConfigError
from nanojaxgpt.state import TrainSetup, setup
from nanojaxgpt.step import Steps, jit_steps


@dataclass(frozen=True)
class Program:
    setup: TrainSetup  # static model half, optimizer, state shardings, abstract state, init
    steps: Steps  # jitted train and eval steps (not compiled yet)
    batch: jax.ShapeDtypeStruct  # one train step's tokens: [accumulation, batch_size, block_size + 1]
    eval_batch: jax.ShapeDtypeStruct  # the eval set of a split: [eval_iters, batch_size, block_size + 1]

    @property
    def batch_sharding(self) -> NamedSharding:
        return self.batch.sharding

    @property
    def abstract(self):
        """ShapeDtypeStruct (with sharding) for every leaf of the train state."""
        return self.setup.abstract


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch of sequences is split: over the data and fsdp axes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check(cfg: Config, mesh: Mesh) -> None:
    """ConfigError unless the batch and every parameter split over the mesh as the rules say
    (before anything compiles, or a run directory is touched)."""
    shards = batch_shards(mesh)
    if cfg.train.batch_size % shards:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of mesh data x fsdp = "
            f"{shards} (the batch is split over them); change --batch_size or the mesh")
    model = gpt.abstract_model(cfg.model)
    sharding.named_shardings(mesh, gpt.logical_axes(model), eqx.filter(model, gpt.is_param))


def build(cfg: Config, mesh: Mesh) -> Program:
    """The train and eval steps of `cfg` on `mesh`, with the abstract arguments they take."""
    check(cfg, mesh)
    t, m = cfg.train, cfg.model
    ts = setup(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh, 3, 1)  # [steps or micro-batches, batch, tokens]
    steps = jit_steps(ts.static, ts.tx, cfg.optim, ts.shardings, batch_sh, batch_sh,
                      sharding.replicated(mesh))
    batch = jax.ShapeDtypeStruct((t.gradient_accumulation_steps, t.batch_size, m.block_size + 1),
                                 np.int32, sharding=batch_sh)
    eval_batch = jax.ShapeDtypeStruct((t.eval_iters, t.batch_size, m.block_size + 1), np.int32,
                                      sharding=batch_sh)
    return Program(setup=ts, steps=steps, batch=batch, eval_batch=eval_batch)
