"""The pure steps: loss, gradient accumulation, grouped evaluation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanojaxgpt import model as gpt
from nanojaxgpt import optim, step
from nanojaxgpt.config import ModelConfig, OptimConfig

CFG = ModelConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def _setup():
    model = gpt.GPT(CFG, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    tx = optim.make(OptimConfig(warmup_iters=0), optim.decay_mask(gpt.logical_axes(model)))
    return params, static, tx


def _tokens(*shape):
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_cross_entropy_equals_optax():
    logits = jax.random.normal(jax.random.key(1), (3, 5, 64)) * 3
    targets = jax.random.randint(jax.random.key(2), (3, 5), 0, 64)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    np.testing.assert_allclose(step.cross_entropy(logits, targets), ref, rtol=1e-6)


def test_accumulating_two_micro_batches_equals_one_batch():
    # Plain SGD so the update is the gradient: Adam would turn the float noise of gradients
    # that are exactly zero in theory (the attention key bias) into full-size steps.
    params, static, _ = _setup()
    tx = optax.sgd(1.0)
    state = step.init_state(params, tx, seed=0)
    tokens = _tokens(8, CFG.block_size + 1)
    one, m1 = step.train_step(state, tokens[None], static=static, tx=tx, optim_cfg=OptimConfig())
    two, m2 = step.train_step(state, tokens.reshape(2, 4, -1), static=static, tx=tx,
                              optim_cfg=OptimConfig())
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one["model"]), jax.tree.leaves(two["model"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(one["step"]) == int(two["step"]) == 1


def test_grouped_evaluation_equals_one_batch_at_a_time():
    params, static, _ = _setup()
    tokens = _tokens(20, 4, CFG.block_size + 1)
    ref = step.eval_loss(params, tokens, static=static, group=1)
    for group in (2, 5, 20):
        np.testing.assert_allclose(step.eval_loss(params, tokens, static=static, group=group),
                                   ref, rtol=1e-6)


def test_eval_group_bounds_tokens_per_pass():
    assert step.eval_group(200, 12, 64) == 20  # 20 x 12 x 64 = 15,360 tokens <= 16,384
    assert step.eval_group(200, 12, 1024) == 1  # GPT-2 sized batches: one at a time
    assert step.eval_group(7, 1, 16) == 7
