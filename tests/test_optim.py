"""The optimizer: nanoGPT's and llm.c's schedules, decay by what a parameter is, torch's clipping."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from nanojaxgpt import model as gpt
from nanojaxgpt import optim
from nanojaxgpt.config import ModelConfig, OptimConfig


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


def llmc_get_lr(it, learning_rate, warmup_iters, train_num_batches, final_frac):
    """llm.c's get_learning_rate (llmc/schedulers.h, "cosine"), transcribed."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    decay_ratio = (it - warmup_iters) / (train_num_batches - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    min_lr = learning_rate * final_frac
    return min_lr + coeff * (learning_rate - min_lr)


def test_llmc_schedule_matches_llmc():
    cfg = OptimConfig(learning_rate=6e-4, min_lr=0.0, warmup_iters=700, lr_decay_iters=18865,
                      schedule="llmc")
    its = [0, 1, 350, 698, 699, 700, 701, 9000, 18000, 18864]
    ours = [float(optim.learning_rate(cfg, it)) for it in its]
    np.testing.assert_allclose(ours, [llmc_get_lr(it, 6e-4, 700, 18865, 0.0) for it in its],
                               rtol=1e-5)  # the last steps' tiny rates too
    assert ours[its.index(699)] == pytest.approx(6e-4)  # the full rate at the last warmup step
    nanogpt = dataclasses.replace(cfg, schedule="nanogpt")
    assert float(optim.learning_rate(nanogpt, 699)) == pytest.approx(6e-4 * 700 / 701)


def _counts(**model):
    return tuple(optim.decay_counts(gpt.abstract_model(ModelConfig(**model))))


def test_gpt2_decays_what_nanogpt_decays():
    # nanoGPT's configure_optimizers on GPT-2 124M (vocab 50304) prints:
    #   num decayed parameter tensors: 50, with 124,354,560 parameters
    #   num non-decayed parameter tensors: 98, with 121,344 parameters
    assert _counts(vocab_size=50304) == (50, 124_354_560, 98, 121_344)
    assert _counts() == _counts(vocab_size=50304)  # 50257 is padded to 50304 here too
    mask = optim.decay_mask(gpt.abstract_model(ModelConfig(n_layer=2, n_embd=64, n_head=4)))
    assert mask.wte.weight and mask.wpe.weight and mask.h.attn.c_attn.weight
    assert mask.h.mlp.c_fc.weight and mask.h.mlp.c_proj.weight and mask.h.attn.c_proj.weight
    # c_attn's bias is [layers, 3, heads, head_dim]: three dims, and still a bias
    assert not (mask.h.attn.c_attn.bias or mask.h.mlp.c_fc.bias or mask.h.ln_1.weight
                or mask.h.ln_1.bias or mask.ln_f.weight)


def test_a_swiglu_rmsnorm_model_decays_its_matrices_only():
    e, layers, hidden = 768, 12, 2048  # SwiGLU's hidden size for E = 768 (model.swiglu_hidden)
    decayed = 50304 * e + 1024 * e + layers * (e * 3 * e + e * e + e * 2 * hidden + hidden * e)
    # per block: 2 RMSNorm gains, c_attn's bias [3, H, D], c_proj's [E], c_fc's [2, h], c_proj's [E]
    other = layers * (2 * e + 3 * e + e + 2 * hidden + e) + e  # + ln_f's gain
    assert _counts(mlp="swiglu", norm="rmsnorm") == (2 + 4 * layers, decayed,
                                                     6 * layers + 1, other)
    assert _counts(mlp="swiglu", norm="rmsnorm", bias=False) == (2 + 4 * layers, decayed,
                                                                 2 * layers + 1, 2 * layers * e + e)


def test_clipping_is_torchs():
    grads = {"w": np.array([[3.0, 4.0], [0.5, -2.0]], np.float32), "b": np.array([1.5, -0.1], np.float32)}
    for max_norm in (1.0, 5.6, 100.0):
        ref = [torch.tensor(grads["b"]), torch.tensor(grads["w"])]
        params = [torch.zeros_like(g, requires_grad=True) for g in ref]
        for p, g in zip(params, ref):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        ours, _ = optim.clip_like_torch(max_norm).update(jax.tree.map(jnp.asarray, grads),
                                                         optax.EmptyState())
        np.testing.assert_allclose(ours["b"], params[0].grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours["w"], params[1].grad.numpy(), rtol=1e-6)


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
