"""The train state of a run, created directly in its shardings on the mesh.

eval_shape -> shardings -> jit(init, out_shardings): no device ever holds a full replicated copy
of the parameters or the optimizer state, so a model that only fits sharded can be initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import optax
from jax.sharding import Mesh

from nanojaxgpt import model as gpt
from nanojaxgpt import cpu, optim, sharding
from nanojaxgpt.config import Config
from nanojaxgpt.step import State, init_state


@dataclass(frozen=True)
class TrainSetup:
    static: Any  # the non-array half of the GPT module (structure + config)
    tx: optax.GradientTransformation
    shardings: Any  # NamedSharding for every leaf of the state
    abstract: Any  # ShapeDtypeStruct (with sharding) for every leaf: the restore target

    def init(self, cfg: Config) -> State:
        """A fresh state from cfg.train.seed, created sharded."""
        tx = self.tx

        def fresh():
            model = gpt.GPT(cfg.model, key=jax.random.key(cfg.train.seed))
            return init_state(eqx.filter(model, eqx.is_array), tx, cfg.train.seed)

        return jax.jit(fresh, out_shardings=self.shardings,
                       compiler_options=cpu.init_options(self.shardings["step"].mesh))()

    def from_params(self, params: Any, cfg: Config) -> State:
        """A state around given parameters (e.g. GPT-2 weights), placed in the state's shardings."""
        params = jax.device_put(params, self.shardings["model"])
        return jax.jit(lambda p: init_state(p, self.tx, cfg.train.seed),
                       out_shardings=self.shardings)(params)


def setup(cfg: Config, mesh: Mesh) -> TrainSetup:
    abstract_model = gpt.abstract_model(cfg.model)
    params, static = eqx.partition(abstract_model, gpt.is_param)
    axes = gpt.logical_axes(abstract_model)
    tx = optim.make(cfg.optim, optim.decay_mask(abstract_model))
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx, cfg.train.seed), params)

    param_sh = sharding.named_shardings(mesh, axes, params)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], param_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=gpt.is_param)
    shardings = {"model": param_sh, "opt_state": opt_sh, "step": rep, "key": rep}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract_state, shardings)
    return TrainSetup(static=static, tx=tx, shardings=shardings, abstract=abstract)
