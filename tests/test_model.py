"""The GPT module: sizes, init, logical axes, causality, scan/remat equivalence, kernels, variants."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanojaxgpt.attention import causal_mask, reference_attention, splash_attention
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.model import (GPT, abstract_model, flops_per_token, logical_axes, num_params,
                              swiglu_hidden, with_runtime)

TINY = ModelConfig(block_size=16, vocab_size=70, n_layer=2, n_head=2, n_embd=32)  # vocab pads to 128


def _tokens(cfg, n=2, t=None, seed=0):
    t = t or cfg.block_size
    return jax.random.randint(jax.random.key(seed), (n, t + 1), 0, cfg.vocab_size)


def _loss(model, tokens):
    logits = jax.vmap(lambda idx: model(idx, inference=True))(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


_value_and_grad = jax.jit(jax.value_and_grad(_loss))


@jax.jit
def _logits(model, idx, key=None):
    return model(idx, key=key, inference=key is None)


def test_gpt2_small_parameter_count_and_flops():
    model = abstract_model(ModelConfig())  # shapes only: nothing is allocated
    assert num_params(model) == 124_439_808  # nanoGPT's figure (vocab 50257, with wpe)
    assert num_params(model, exclude_padding=False) == 124_439_808 + (50304 - 50257) * 768
    assert model.wte.weight.shape == (50304, 768)
    n = 124_439_808 + 47 * 768 - 1024 * 768  # nanoGPT's N: padded vocab, without wpe
    assert flops_per_token(ModelConfig()) == 6 * n + 12 * 12 * 768 * 1024


def test_init_follows_gpt2():
    cfg = dataclasses.replace(TINY, n_embd=128, n_head=4, n_layer=4)
    m = GPT(cfg, key=jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(m))
    np.testing.assert_allclose(np.std(m.h.attn.c_attn.weight), 0.02, rtol=0.05)
    for proj in (m.h.attn.c_proj.weight, m.h.mlp.c_proj.weight):  # residual projections
        np.testing.assert_allclose(np.std(proj), 0.02 / math.sqrt(2 * cfg.n_layer), rtol=0.05)
    assert not np.any(m.h.mlp.c_fc.bias) and np.all(m.h.ln_1.weight == 1)
    assert not np.any(m.wte.weight[cfg.vocab_size:])  # padding rows
    w = m.h.mlp.c_fc.weight  # every block drew from its own key
    assert all(not np.allclose(w[i], w[j]) for i in range(4) for j in range(i))


def test_logical_axes_name_every_dim():
    for cfg in (TINY, dataclasses.replace(TINY, mlp="swiglu", norm="rmsnorm", position="rope", bias=False)):
        model = GPT(cfg, key=jax.random.key(0))
        axes = logical_axes(model)
        params = eqx.filter(model, eqx.is_array)
        assert jax.tree.structure(axes) == jax.tree.structure(params)
        for spec, x in zip(jax.tree.leaves(axes), jax.tree.leaves(params)):
            assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == x.ndim
        assert jax.tree.structure(logical_axes(abstract_model(cfg))) == jax.tree.structure(axes)
    model = GPT(TINY, key=jax.random.key(0))
    axes = logical_axes(model)
    assert axes.wte.weight == jax.P("vocab", "embed")
    assert axes.wpe.weight == jax.P("position", "embed")
    assert axes.h.attn.c_attn.weight == jax.P("layers", "embed", "qkv", "heads", "head_dim")
    assert model.h.attn.c_attn.weight.shape == (2, 32, 3, 2, 16)
    assert axes.h.attn.c_proj.weight == jax.P("layers", "heads", "head_dim", "embed")
    assert axes.h.mlp.c_fc.weight == jax.P("layers", "embed", "mlp")
    assert axes.h.mlp.c_fc.bias == jax.P("layers", "mlp")
    assert axes.ln_f.weight == jax.P("embed")


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_causal(position):
    cfg = dataclasses.replace(TINY, position=position)
    model = GPT(cfg, key=jax.random.key(1))
    idx = _tokens(cfg, 1, seed=2)[0, :-1]
    t = 7
    changed = idx.at[t].set((idx[t] + 1) % cfg.vocab_size)
    a, b = _logits(model, idx), _logits(model, changed)
    np.testing.assert_array_equal(a[:t], b[:t])  # the past never sees the future
    assert np.all(np.abs(a[t:] - b[t:]).max(axis=-1) > 1e-6)  # ... and the present does


def test_padding_logits_are_masked():
    model = GPT(TINY, key=jax.random.key(0))
    logits = _logits(model, _tokens(TINY, 1)[0, :-1])
    assert logits.shape == (16, 128) and logits.dtype == jnp.float32
    assert np.all(logits[:, 70:] == np.finfo(np.float32).min)
    assert np.all(np.isfinite(logits))
    grads = _value_and_grad(model, _tokens(TINY))[1]
    assert np.all(np.isfinite(grads.wte.weight))
    assert not np.any(grads.wte.weight[70:])  # padding rows learn nothing


def test_scan_unrolled_and_remat_agree():
    """One loss and gradient whether the blocks run in lax.scan or a Python loop, with any remat."""
    model = GPT(dataclasses.replace(TINY, n_layer=3), key=jax.random.key(0))
    tokens = _tokens(TINY)
    base_l, base_g = _value_and_grad(model, tokens)
    for runtime in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots")):
        loss, grads = _value_and_grad(with_runtime(model, **runtime), tokens)
        np.testing.assert_allclose(loss, base_l, rtol=1e-6, err_msg=str(runtime))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_g)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=str(runtime))


def test_attention_kernels_match_jax():
    """attention="xla" (our einsum kernel) and the splash kernel against jax's own attention."""
    q, k, v = (jax.random.normal(jax.random.key(i), (128, 2, 16)) for i in range(3))  # splash: T % 128 == 0
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(reference_attention(q, k, v, causal_mask(128)), want, atol=1e-5)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    ours_bf16 = reference_attention(*bf, causal_mask(128))
    assert ours_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours_bf16.astype(jnp.float32), want, atol=3e-2)
    # The TPU kernel itself, run by the Pallas interpreter: same layout and scaling as the others.
    np.testing.assert_allclose(splash_attention(q, k, v, interpret=True), want, atol=1e-5)


def test_splash_is_a_clear_error_off_tpu():
    model = GPT(dataclasses.replace(TINY, attention="splash"), key=jax.random.key(0))
    with pytest.raises(RuntimeError, match="TPU.*'xla'"):
        jax.eval_shape(lambda: model(_tokens(TINY, 1)[0, :-1], inference=True))


def test_bfloat16_compute_returns_float32_logits():
    model = GPT(TINY, key=jax.random.key(0))
    idx = _tokens(TINY, 1)[0, :-1]
    ref = _logits(model, idx)
    bf16 = with_runtime(model, compute_dtype="bfloat16")
    out = _logits(bf16, idx)
    assert out.dtype == jnp.float32 and bf16.h.mlp.c_fc.weight.dtype == jnp.float32
    np.testing.assert_allclose(out[:, :70], ref[:, :70], atol=5e-3)  # measured error ~1.1e-3


def test_with_runtime_changes_only_runtime_fields():
    model = GPT(TINY, key=jax.random.key(0))
    assert with_runtime(model, vocab_multiple=128).config.vocab_multiple == 128  # 70 pads to 128 still
    with pytest.raises(ValueError, match="n_layer of a model's config cannot change"):
        with_runtime(model, n_layer=3)
    with pytest.raises(ValueError, match="changes the model's parameters"):
        with_runtime(model, vocab_multiple=256)


def test_dropout_needs_a_key_and_is_off_in_inference():
    model = GPT(dataclasses.replace(TINY, dropout=0.2), key=jax.random.key(0))
    idx = _tokens(TINY, 1)[0, :-1]
    with pytest.raises(ValueError, match="PRNG key"):
        jax.eval_shape(lambda: model(idx))
    a, b = _logits(model, idx, jax.random.key(1)), _logits(model, idx, jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(_logits(model, idx), _logits(with_runtime(model, dropout=0.0), idx))


def test_swiglu_hidden_size_promise():
    for e in (32, 64, 100, 128, 768, 1600):
        for bias in (True, False):
            h = swiglu_hidden(e, bias)
            gelu, unit = 8 * e * e + (5 * e if bias else 0), 3 * e + (2 if bias else 0)
            swiglu = 3 * e * h + ((2 * h + e) if bias else 0)
            assert abs(swiglu - gelu) <= unit / 2  # within half of one hidden unit's parameters
    assert swiglu_hidden(768, True) == swiglu_hidden(768, False) == 2048


@pytest.mark.parametrize("variant", [dict(mlp="swiglu"), dict(norm="rmsnorm", position="rope"),
                                     dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False)])
def test_variants_train(variant):
    cfg = dataclasses.replace(TINY, **variant)
    model = GPT(cfg, key=jax.random.key(0))
    base = num_params(GPT(dataclasses.replace(TINY, mlp="gelu", bias=cfg.bias), key=jax.random.key(0)))
    n, diff = num_params(model), 0
    if cfg.position == "rope":
        assert model.wpe is None
        diff -= cfg.block_size * cfg.n_embd
    if cfg.norm == "rmsnorm" and cfg.bias:
        diff -= (2 * cfg.n_layer + 1) * cfg.n_embd  # RMSNorm has no bias
    if cfg.mlp == "swiglu":
        assert abs(n - (base + diff)) <= cfg.n_layer * (3 * cfg.n_embd + 2) / 2
    else:
        assert n == base + diff
    tokens = _tokens(cfg, 4)
    opt = optax.adam(3e-3)
    state = opt.init(model)

    @jax.jit
    def step(model, state):
        loss, grads = jax.value_and_grad(_loss)(model, tokens)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(model, updates), state, loss, grads

    model, state, first, grads = step(model, state)
    assert all(np.all(np.isfinite(g)) and np.any(g) for g in jax.tree.leaves(grads))
    for _ in range(5):
        model, state, loss, _ = step(model, state)
    assert loss < first - 0.1
