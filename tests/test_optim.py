"""The optimizer: nanoGPT's schedule, decay only on matrices, clipping."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanojaxgpt import optim
from nanojaxgpt.config import OptimConfig


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT train.py's get_lr, transcribed."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("warmup,decay", [(100, 5000), (2000, 600000), (0, 10)])
def test_schedule_matches_nanogpt(warmup, decay):
    cfg = OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=warmup, lr_decay_iters=decay)
    its = sorted({0, 1, warmup - 1, warmup, warmup + 1, (warmup + decay) // 2, decay - 1, decay,
                  decay + 1, 2 * decay} - {-1})
    ours = [float(optim.learning_rate(cfg, it)) for it in its]
    ref = [nanogpt_get_lr(it, 1e-3, warmup, decay, 1e-4) for it in its]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_constant_when_decay_off():
    cfg = OptimConfig(learning_rate=3e-4, decay_lr=False)
    assert float(optim.learning_rate(cfg, 12345)) == pytest.approx(3e-4)


def test_decay_mask_ignores_the_stacked_layers_axis():
    axes = {"wte": jax.P("vocab", "embed"), "ln_f": jax.P("embed"),
            "c_fc": jax.P("layers", "embed", "mlp"), "c_fc_bias": jax.P("layers", "mlp")}
    assert optim.decay_mask(axes) == {"wte": True, "ln_f": False, "c_fc": True, "c_fc_bias": False}


def test_adamw_decays_only_masked_params_and_clips():
    cfg = OptimConfig(learning_rate=0.1, min_lr=0.1, warmup_iters=0, lr_decay_iters=1,
                      weight_decay=0.5, grad_clip=1.0)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = optim.make(cfg, {"w": True, "b": False})
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5)  # decoupled decay: lr * wd * w
    np.testing.assert_allclose(new["b"], 1.0)  # no decay on biases
    # Adam's step is scale-free, so the clipping shows in its first moment: (1 - beta1) * grad.
    big = {"w": jnp.full((2, 2), 100.0), "b": jnp.full((2,), 100.0)}  # norm 244.9
    small = jax.tree.map(lambda g: g * 0.5 / optax.tree.norm(big), big)  # norm 0.5: kept as is
    for grads, norm_after_clip in ((big, cfg.grad_clip), (small, 0.5)):
        mu = optax.tree_utils.tree_get(tx.update(grads, state, params)[1], "mu")
        np.testing.assert_allclose(optax.tree.norm(mu), (1 - cfg.beta1) * norm_after_clip, rtol=1e-5)
    unclipped = optim.make(dataclasses.replace(cfg, grad_clip=0.0), {"w": True, "b": False})
    mu = optax.tree_utils.tree_get(unclipped.update(big, unclipped.init(params), params)[1], "mu")
    np.testing.assert_allclose(optax.tree.norm(mu), (1 - cfg.beta1) * optax.tree.norm(big), rtol=1e-5)
