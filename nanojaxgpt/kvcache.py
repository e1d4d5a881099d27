"""The KV cache for generation: prefill a window once, then one fixed-shape step per new token.

A decode step feeds one token per sequence at a traced position `pos`: it writes its key/value at
`pos`, then attends to the cached positions <= pos. Nothing is shaped by pos, so one compilation
serves every length. Positions > pos may hold stale values (the prefill of a padded window writes
them); they are masked out, and overwritten before they are ever attended to.

Both passes run the model's own blocks, with only the attention core swapped (see
CausalSelfAttention.__call__): the prefill keeps each layer's keys and values, a decode step
writes the new ones into the cache and attends over it. The layout, chosen by measuring
(README: 'Measurements behind the code'):
- Generation runs a `Decoder`: the GPT with each block's arrays unstacked, looped in Python. A
  lax.scan over the stacked blocks copies every layer's weights and cache out of the stack on each
  step (a dynamic-slice is not fused into a dot). It costs one copy of the block weights while
  sampling, and compile time that grows with n_layer.
- Each layer's cache is its own [batch * n_head, block_size, head_dim] array: the attention dots
  have one batch dim over contiguous [S, D] rows and nothing is transposed per step (a
  [B, S, H, D] cache was), and the write at pos is in place (with a [B, H, S, D] cache XLA
  copied the whole cache every step when B was 1).
- The new key/value is written before the cache is read, so the old cache is dead after the
  update (reading it afterwards made XLA copy the whole cache too).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from nanojaxgpt.model import GPT, Block


class Decoder(eqx.Module):
    gpt: GPT  # embeddings, ln_f, the tied head and the config; its stacked `h` is dropped (None)
    blocks: tuple[Block, ...]


def decoder(model: GPT) -> Decoder:
    """The model laid out for generation (copies the block weights once, outside any jit)."""
    params, static = eqx.partition(model.h, eqx.is_array)
    blocks = tuple(eqx.combine(jax.tree.map(lambda a: a[i], params), static)
                   for i in range(model.config.n_layer))
    return Decoder(eqx.tree_at(lambda m: m.h, model, replace=None), blocks)


class KVCache(eqx.Module):
    k: tuple[Float[Array, "BH S D"], ...]  # one per layer; row b * n_head + h is sequence b, head h
    v: tuple[Float[Array, "BH S D"], ...]


class Step(NamedTuple):
    logits: Float[Array, "B V"]  # for the next token of each sequence
    cache: KVCache


def _attend_cache(q_ND: Array, k_NSD: Array, v_NSD: Array, pos: Array) -> Array:
    """One query per (sequence, head) row over the cache positions <= pos (its own included)."""
    scale = 1.0 / np.sqrt(q_ND.shape[-1])
    s_NS = jnp.einsum("nd,nsd->ns", q_ND, k_NSD, preferred_element_type=jnp.float32) * scale
    s_NS = jnp.where(jnp.arange(k_NSD.shape[1]) <= pos, s_NS, jnp.finfo(jnp.float32).min)
    return jnp.einsum("ns,nsd->nd", jax.nn.softmax(s_NS, axis=-1).astype(v_NSD.dtype), v_NSD)


def _keep_kv(block: Block, kept: list, q_THD: Array, k_THD: Array, v_THD: Array) -> Array:
    """The prefill's attention core: the block's own attention of the window, keeping k and v."""
    kept.append((k_THD.swapaxes(0, 1), v_THD.swapaxes(0, 1)))  # [H, T, D]
    return block.attn.attend(q_THD, k_THD, v_THD, key=None, inference=True)


def _prefill_one(dec: Decoder, idx_T: Array) -> tuple[Array, list[tuple[Array, Array]]]:
    positions = jnp.arange(idx_T.shape[0])
    rope = dec.gpt.rope(positions)
    x_TE, kept = dec.gpt.embed(idx_T, positions), []
    for block in dec.blocks:
        x_TE = block(x_TE, rope, inference=True, core=functools.partial(_keep_kv, block, kept))
    return x_TE, kept


def prefill(dec: Decoder, idx: Int[Array, "B T"], last: Int[Array, ""]) -> Step:
    """Run whole windows (T <= block_size); logits at position `last` and a cache of block_size."""
    cfg = dec.gpt.config
    b, t = idx.shape
    if t > cfg.block_size:
        raise ValueError(f"window of {t} tokens is longer than block_size={cfg.block_size}")
    x_BTE, kept = jax.vmap(_prefill_one, in_axes=(None, 0))(dec, idx)
    logits = jax.vmap(dec.gpt.head)(x_BTE[:, last][:, None])[:, 0]

    def rows(kv_BHTD: Array) -> Array:  # [B, H, T, D] -> [B*H, block_size, D]
        return jnp.pad(kv_BHTD.reshape(b * cfg.n_head, t, cfg.head_dim),
                       [(0, 0), (0, cfg.block_size - t), (0, 0)])

    return Step(logits, KVCache(tuple(rows(k) for k, _ in kept), tuple(rows(v) for _, v in kept)))


def _write_and_attend(k_NSD: Array, v_NSD: Array, pos: Array, kept: list,
                      q_BHD: Array, k_BHD: Array, v_BHD: Array) -> Array:
    """The decode step's attention core: the new key/value written at pos, then read back."""
    n, d = k_NSD.shape[0], k_NSD.shape[2]
    k_NSD = jax.lax.dynamic_update_slice(k_NSD, k_BHD.reshape(n, 1, d), (0, pos, 0))
    v_NSD = jax.lax.dynamic_update_slice(v_NSD, v_BHD.reshape(n, 1, d), (0, pos, 0))
    kept.append((k_NSD, v_NSD))
    return _attend_cache(q_BHD.reshape(n, d), k_NSD, v_NSD, pos).reshape(q_BHD.shape)


def decode(dec: Decoder, tokens: Int[Array, "B"], pos: Int[Array, ""], cache: KVCache) -> Step:
    """Feed each sequence's token at position pos (< block_size); logits for the token after it.

    The blocks run on the B new tokens as a window of B positions: everything but attention acts
    on each token alone, and the attention core reads each sequence's own cache rows.
    """
    rope = dec.gpt.rope(pos[None])  # one position's angles broadcast over the B tokens
    x_BE, kept = dec.gpt.embed(tokens, jnp.broadcast_to(pos, tokens.shape)), []
    for block, k_NSD, v_NSD in zip(dec.blocks, cache.k, cache.v):
        core = functools.partial(_write_and_attend, k_NSD, v_NSD, pos, kept)
        x_BE = block(x_BE, rope, inference=True, core=core)
    return Step(dec.gpt.head(x_BE), KVCache(tuple(k for k, _ in kept), tuple(v for _, v in kept)))
