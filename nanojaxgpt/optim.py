"""AdamW with weight decay on 2-D+ weights only, nanoGPT's warmup + cosine schedule, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from nanojaxgpt.config import OptimConfig


def learning_rate(cfg: OptimConfig, it: Int[Array, ""] | int) -> Float[Array, ""]:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    it = jnp.asarray(it, jnp.float32)
    if not cfg.decay_lr:
        return jnp.full((), cfg.learning_rate, jnp.float32)
    warm = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    span = max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    ratio = jnp.clip((it - cfg.warmup_iters) / span, 0.0, 1.0)
    coeff = 0.5 * (1.0 + jnp.cos(jnp.pi * ratio))  # 1 -> 0 over the decay span
    decayed = cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
    return jnp.where(it < cfg.warmup_iters, warm,
                     jnp.where(it > cfg.lr_decay_iters, cfg.min_lr, decayed))


def decay_mask(logical_axes):
    """Decay matrices and embeddings, never biases or norm gains: a parameter decays when it has
    two or more dimensions besides the stacked `layers` one (a stacked bias is 2-D but not a matrix)."""
    return jax.tree.map(lambda spec: sum(name != "layers" for name in spec) >= 2, logical_axes)


def make(cfg: OptimConfig, mask) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW at the scheduled rate; `mask` selects what decays."""
    steps = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    steps.append(optax.adamw(lambda count: learning_rate(cfg, count), b1=cfg.beta1, b2=cfg.beta2,
                             eps=1e-8, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*steps)
