"""nanoGPT's optimizer: AdamW on two parameter groups, its warmup + cosine schedule, its clipping.

The groups are chosen by what a parameter is, as nanoGPT's configure_optimizers chooses them for
GPT-2: the weights of the Linear and Embedding layers decay (wte, wpe, c_attn, c_proj, c_fc; the
tied head is wte, counted once); biases and norm gains never do, whatever their shape. (A rule by
rank would decay c_attn's bias here: it is [3, heads, head_dim], not GPT-2's flat [3E].)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from nanojaxgpt.config import OptimConfig
from nanojaxgpt.layers import Embedding, Linear
from nanojaxgpt.model import is_param


def learning_rate(cfg: OptimConfig, it: Int[Array, ""] | int) -> Float[Array, ""]:
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr.

    schedule="nanogpt" is nanoGPT's get_lr, warming up as lr * (it + 1) / (warmup_iters + 1);
    schedule="llmc" is llm.c's (and build-nanogpt's), lr * (it + 1) / warmup_iters, which reaches
    the full rate at the last warmup step. Both decay alike after the warmup.
    """
    it = jnp.asarray(it, jnp.float32)
    if not cfg.decay_lr:
        return jnp.full((), cfg.learning_rate, jnp.float32)
    warmup_span = cfg.warmup_iters + 1 if cfg.schedule == "nanogpt" else max(cfg.warmup_iters, 1)
    warm = cfg.learning_rate * (it + 1) / warmup_span
    span = max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    left = jnp.clip((cfg.lr_decay_iters - it) / span, 0.0, 1.0)  # 1 - decay_ratio, 1 -> 0
    # 0.5 * (1 + cos(pi * ratio)) written as sin(pi/2 * (1 - ratio))**2: the same number, and
    # accurate in float32 to the last step (the cosine form cancels to 0 near the end).
    coeff = jnp.square(jnp.sin(0.5 * jnp.pi * left))
    decayed = cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
    return jnp.where(it < cfg.warmup_iters, warm,
                     jnp.where(it > cfg.lr_decay_iters, cfg.min_lr, decayed))


def decay_mask(model: Any) -> PyTree:
    """True for each array of `model` (a GPT, built or abstract) that weight decay applies to:
    the `weight` of every Linear and Embedding. The tree is that of eqx.filter(model, is_param)."""
    def decays(path: tuple, _leaf: Any) -> bool:
        owner = model
        for entry in path[:-1]:
            owner = getattr(owner, entry.name)
        return isinstance(owner, (Linear, Embedding)) and path[-1].name == "weight"

    return jax.tree_util.tree_map_with_path(decays, eqx.filter(model, is_param))


class DecayCounts(NamedTuple):
    decayed_tensors: int
    decayed_params: int
    other_tensors: int
    other_params: int

    def lines(self) -> list[str]:
        """nanoGPT's two lines, so the two programs' logs can be put side by side."""
        return [f"num decayed parameter tensors: {self.decayed_tensors}, with "
                f"{self.decayed_params:,} parameters",
                f"num non-decayed parameter tensors: {self.other_tensors}, with "
                f"{self.other_params:,} parameters"]


def decay_counts(model: Any) -> DecayCounts:
    """Tensors and parameters in each group, counted as nanoGPT counts them: a stacked block
    array is n_layer tensors, and the padded vocabulary rows are parameters (nanoGPT's model holds
    them too)."""
    n_layer = model.config.n_layer
    counts = [0, 0, 0, 0]
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, is_param))
    for (path, leaf), decays in zip(leaves, jax.tree.leaves(decay_mask(model)), strict=True):
        tensors = n_layer if path[0].name == "h" else 1
        group = 0 if decays else 2
        counts[group] += tensors
        counts[group + 1] += int(np.prod(leaf.shape))
    return DecayCounts(*counts)


def clip_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)) (optax's own
    clip_by_global_norm has no 1e-6 and leaves a norm just under max_norm alone)."""

    def update(grads: PyTree, state: optax.EmptyState, params: PyTree = None
               ) -> tuple[PyTree, optax.EmptyState]:
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(grads) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make(cfg: OptimConfig, mask: PyTree) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW at the scheduled rate (torch's eps, 1e-8); `mask` selects
    what decays (decay_mask)."""
    steps = [clip_like_torch(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    steps.append(optax.adamw(lambda count: learning_rate(cfg, count), b1=cfg.beta1, b2=cfg.beta2,
                             eps=1e-8, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*steps)
