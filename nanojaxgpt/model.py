"""GPT-2 in Equinox, with GPT-2's parameter names, stacked blocks, and logical axis names.

    wte, wpe, h.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_f; head tied to wte

The default ModelConfig is GPT-2 exactly (tanh GELU, LayerNorm eps 1e-5, biases, learned positions,
N(0, 0.02) init with c_proj at 0.02/sqrt(2 n_layer)), so OpenAI's weights load (hf.py) and match.
The n_layer blocks are ONE Block whose arrays have a leading "layers" dim (built by vmapping the
constructor over n_layer keys) and run with lax.scan: compile time does not grow with depth.
A GPT handles one sequence, `gpt(idx[T]) -> logits[T, padded_vocab]` in float32; batch with vmap.
The padded vocabulary rows (50257 -> 50304) get logits of float32's most negative finite value:
never sampled, and exp() of them is 0 in the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from nanojaxgpt.attention import CausalSelfAttention, Core, Rope, rope_at
from nanojaxgpt.sharding import constrain
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.layers import Embedding, LayerNorm, Linear, RMSNorm, dropout, norm, residual_std


def swiglu_hidden(n_embd: int, bias: bool) -> int:
    """SwiGLU hidden size h giving the GELU MLP's parameter count as closely as an integer can.

    GELU MLP: c_fc E x 4E (+4E bias), c_proj 4E x E (+E bias)  = 8E^2 (+5E)
    SwiGLU:   c_fc E x 2 x h (gate, up; +2h bias), c_proj h x E (+E bias) = 3Eh (+2h + E)
    so h = 8E/3 without bias and h = (8E^2 + 4E)/(3E + 2) with, rounded to the nearest integer:
    the promise is |SwiGLU MLP - GELU MLP| <= half of one hidden unit's parameters (3E + 2 with
    bias, 3E without), per block. For GPT-2 small (E=768) h = 2048 either way.
    """
    if bias:
        return round((8 * n_embd**2 + 4 * n_embd) / (3 * n_embd + 2))
    return round(8 * n_embd / 3)


class MLP(eqx.Module):
    c_fc: Linear  # gelu: [E, 4E]; swiglu: [E, 2, h] (gate and up in one matmul)
    c_proj: Linear  # [4E or h, E]
    kind: str = eqx.field(static=True)  # ModelConfig.mlp
    dropout_rate: float = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        e, dt = cfg.n_embd, cfg.compute_dtype
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            hidden = swiglu_hidden(e, cfg.bias)
            self.c_fc = Linear((e,), (2, hidden), bias=cfg.bias, std=0.02, dtype=dt,
                               axes=("embed", None, "mlp"), key=k1)
        else:
            hidden = 4 * e
            self.c_fc = Linear((e,), (hidden,), bias=cfg.bias, std=0.02, dtype=dt,
                               axes=("embed", "mlp"), key=k1)
        self.c_proj = Linear((hidden,), (e,), bias=cfg.bias, std=residual_std(cfg.n_layer),
                             dtype=dt, axes=("mlp", "embed"), key=k2)
        self.dropout_rate = cfg.dropout

    def __call__(self, x_TE: Array, *, key: PRNGKeyArray | None = None, inference: bool = False) -> Array:
        h = self.c_fc(x_TE)
        if self.kind == "swiglu":
            h = constrain(h, ("seq", None, "mlp"))
            h = jax.nn.silu(h[:, 0]) * h[:, 1]
        else:  # GPT-2's tanh "gelu_new", or nanoGPT's erf GELU
            h = jax.nn.gelu(constrain(h, ("seq", "mlp")), approximate=self.kind == "gelu")
        return dropout(self.c_proj(h), self.dropout_rate, key, inference)


class Block(eqx.Module):
    ln_1: LayerNorm | RMSNorm
    attn: CausalSelfAttention
    ln_2: LayerNorm | RMSNorm
    mlp: MLP

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.ln_1 = norm(cfg.norm, cfg.n_embd, bias=cfg.bias, dtype=cfg.compute_dtype)
        self.attn = CausalSelfAttention(cfg, key=k1)
        self.ln_2 = norm(cfg.norm, cfg.n_embd, bias=cfg.bias, dtype=cfg.compute_dtype)
        self.mlp = MLP(cfg, key=k2)

    def __call__(self, x_TE: Array, rope: Rope | None, *, key: PRNGKeyArray | None = None,
                 inference: bool = False, core: Core | None = None) -> Array:
        """The block on T tokens; `core` replaces the attention's causal core (see attention.py)."""
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        # The residual stream keeps the whole width on every chip (weights are gathered for use).
        x_TE = constrain(x_TE + self.attn(self.ln_1(x_TE), rope, key=k1, inference=inference,
                                          core=core), ("seq", "act_embed"))
        return constrain(x_TE + self.mlp(self.ln_2(x_TE), key=k2, inference=inference),
                         ("seq", "act_embed"))


def _remat(fn: Callable, policy: str, scan: bool) -> Callable:
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=not scan)
    # "dots": keep the weight matmuls' outputs, recompute the rest (attention scores included, as
    # they carry batch dims): a little compute for a lot of memory. On XLA:CPU it is also the
    # fastest: a scan without remat saves every intermediate into zero-filled stacked buffers.
    return jax.checkpoint(fn, prevent_cse=not scan,
                          policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def _run_blocks(stack: Block, fn: Callable[[Block, Array, Any], Array], x: Array, xs: Any, *,
                scan: bool, remat: str) -> Array:
    """x = fn(block_i, x, xs[i]) for each stacked block, by lax.scan or a Python loop."""
    params, static = eqx.partition(stack, eqx.is_array)

    def body(x, layer):
        p, xs_i = layer
        return fn(eqx.combine(p, static), x, xs_i), None

    body = _remat(body, remat, scan)
    if scan:
        return jax.lax.scan(body, x, (params, xs))[0]
    for i in range(jax.tree.leaves(params)[0].shape[0]):
        x, _ = body(x, jax.tree.map(lambda a: a[i], (params, xs)))
    return x


class GPT(eqx.Module):
    wte: Embedding  # [padded_vocab, E]; also the output head (tied)
    wpe: Embedding | None  # [block_size, E]; None with position="rope"
    h: Block  # n_layer blocks stacked: every array has a leading "layers" dim
    ln_f: LayerNorm | RMSNorm
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k_wte, k_wpe, k_h = jax.random.split(key, 3)
        self.config = cfg
        self.wte = Embedding(cfg.padded_vocab_size, cfg.n_embd, std=0.02, axes=("vocab", "embed"),
                             num_used=cfg.vocab_size, key=k_wte)
        self.wpe = (Embedding(cfg.block_size, cfg.n_embd, std=0.02, axes=("position", "embed"),
                              key=k_wpe) if cfg.position == "learned" else None)
        # Each block from its own key; vmap stacks them into one Block with a leading layer dim.
        self.h = eqx.filter_vmap(lambda k: Block(cfg, key=k))(jax.random.split(k_h, cfg.n_layer))
        self.ln_f = norm(cfg.norm, cfg.n_embd, bias=cfg.bias, dtype=cfg.compute_dtype)

    def embed(self, idx_T: Int[Array, "T"], positions_T: Int[Array, "T"]) -> Float[Array, "T E"]:
        """Token (+ learned position) embeddings: the float32 residual stream."""
        x = self.wte.weight[idx_T]
        if self.wpe is not None:
            x = x + self.wpe.weight[positions_T]
        return x

    def rope(self, positions_T: Int[Array, "T"]) -> Rope | None:
        return rope_at(positions_T, self.config.head_dim) if self.config.position == "rope" else None

    def head(self, x_TE: Float[Array, "T E"]) -> Float[Array, "T V"]:
        """ln_f, then logits against the tied embedding in float32; padding logits masked."""
        cfg = self.config
        x = self.ln_f(x_TE)
        logits = constrain(jnp.einsum("te,ve->tv", x, self.wte.weight.astype(x.dtype),
                                      preferred_element_type=jnp.float32), ("seq", "vocab"))
        if cfg.padded_vocab_size == cfg.vocab_size:
            return logits
        real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        return jnp.where(real, logits, jnp.finfo(jnp.float32).min)

    def hidden(self, idx_T: Int[Array, "T"], *, key: PRNGKeyArray | None = None,
               inference: bool = False) -> Float[Array, "T E"]:
        """The residual stream after the last block (before ln_f)."""
        cfg = self.config
        t = idx_T.shape[0]
        if t > cfg.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the context "
                             f"(block_size={cfg.block_size}); crop it to the last {cfg.block_size}")
        positions = jnp.arange(t)
        if key is not None and cfg.dropout > 0 and not inference:
            key, k_embd = jax.random.split(key)
            keys = jax.random.split(key, cfg.n_layer)
        else:
            k_embd = keys = None
        x = constrain(self.embed(idx_T, positions), ("seq", "act_embed"))
        x = dropout(x, cfg.dropout, k_embd, inference)
        rope = self.rope(positions)

        def layer(block: Block, x_TE: Array, k: PRNGKeyArray | None) -> Array:
            return block(x_TE, rope, key=k, inference=inference)

        return _run_blocks(self.h, layer, x, keys, scan=cfg.scan_layers, remat=cfg.remat)

    def __call__(self, idx: Int[Array, "T"], *, key: PRNGKeyArray | None = None,
                 inference: bool = False) -> Float[Array, "T V"]:
        return self.head(self.hidden(idx, key=key, inference=inference))


def is_param(x: Any) -> bool:
    """Arrays, and their abstract stand-ins from jax.eval_shape (so a model can be laid out unbuilt)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def logical_axes(model: GPT) -> PyTree:
    """The tree of eqx.filter(model, eqx.is_array) with each array replaced by jax.P(logical names).

    Names come from the `<param>_axes` static field next to each parameter; arrays under `h` get
    "layers" first (the stacked block dim). Works on a jax.eval_shape'd model too.
    """
    def spec(path: tuple, leaf: Any) -> jax.sharding.PartitionSpec:
        owner = model
        for entry in path[:-1]:
            owner = getattr(owner, entry.name)
        name = path[-1].name
        axes = getattr(owner, f"{name}_axes")
        if path[0].name == "h":
            axes = ("layers", *axes)
        if len(axes) != len(leaf.shape):
            raise AssertionError(f"{jax.tree_util.keystr(path)}: axes {axes} do not match shape {leaf.shape}")
        return jax.P(*axes)

    return jax.tree_util.tree_map_with_path(spec, eqx.filter(model, is_param))


def num_params(model: GPT, *, exclude_padding: bool = True) -> int:
    """Parameter count; the tied head is the embedding (counted once); padded vocab rows excluded."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(eqx.filter(model, is_param)))
    if exclude_padding:
        cfg = model.config
        n -= (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    return n


def abstract_model(cfg: ModelConfig) -> GPT:
    """The model's structure, shapes and dtypes without computing or allocating anything."""
    return jax.eval_shape(lambda: GPT(cfg, key=jax.random.key(0)))


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token, nanoGPT's estimate_mfu (PaLM appendix B): 6N + 12 L E T.

    N is as nanoGPT counts it for its padded-vocab run: every parameter but wpe (a lookup, no
    matmul); the padded vocab rows are included because the head multiplies them. The second term
    is the attention scores and weighted sum (2 matmuls of T x E per token per layer, x3 for backward).
    """
    n = num_params(abstract_model(cfg), exclude_padding=False)
    if cfg.position == "learned":
        n -= cfg.block_size * cfg.n_embd
    return float(6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size)


def with_runtime(model: GPT, **changes: Any) -> GPT:
    """The same weights under a config with other ModelConfig.RUNTIME_FIELDS; a change of any
    other field, or one that alters a parameter's shape (vocab_multiple can), is an error."""
    if bad := sorted(set(changes) - set(ModelConfig.RUNTIME_FIELDS)):
        raise ValueError(f"{', '.join(bad)} of a model's config cannot change; "
                         f"only {', '.join(ModelConfig.RUNTIME_FIELDS)} can")
    cfg = dataclasses.replace(model.config, **changes)
    target = abstract_model(cfg)
    old, new = jax.tree.leaves(model), jax.tree.leaves(target)
    if [a.shape for a in old] != [b.shape for b in new]:
        raise ValueError(f"{changes} changes the model's parameters; only run-time fields may change")
    return jax.tree.unflatten(jax.tree.structure(target), old)
