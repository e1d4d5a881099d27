"""Causal self-attention: GPT-2's c_attn/c_proj with heads as a real dim, RoPE, and three kernels.

Shapes are suffixed by their dims (one sequence; batching is vmap at the call site):
T query positions, S key positions, H heads, D head_dim, E n_embd.
The kernel behind the softmax(q k^T / sqrt(D)) v is ModelConfig.attention:
  "xla"    `reference_attention`: einsums and a float32 softmax that XLA fuses, any backend; also
           attention dropout (the fused kernels have none) and the KV cache's one-token decode step
  "cudnn"  jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention (NVIDIA, bf16/fp16)
  "splash" the Pallas TPU splash-attention kernel (TPU only)
All three compute the same function. Our einsums rather than jax.nn.dot_product_attention(
implementation="xla"), whose [B, T, K, G, H] layout costs transposes and a slow softmax-gradient
sum (README: 'Measurements behind the code').
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from nanojaxgpt import sharding
from nanojaxgpt.config import ModelConfig
from nanojaxgpt.layers import Linear, dropout, residual_std


# An attention core: (q [T, H, D], k [T, H, D], v [T, H, D]) -> y [T, H, D].
Core = Callable[[Array, Array, Array], Array]


class Rope(eqx.Module):
    """cos/sin of the rotary angles at some positions, [T, D/2] each (base 10000, rotate-half)."""

    cos: Float[Array, "T half"]
    sin: Float[Array, "T half"]


def rope_at(positions: Int[Array, "T"], head_dim: int) -> Rope:
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return Rope(jnp.cos(angles), jnp.sin(angles))


def apply_rope(x_THD: Array, rope: Rope) -> Array:
    """Rotate each (x[i], x[i + D/2]) pair by its position's angle; computed in float32."""
    half = x_THD.shape[-1] // 2
    x = x_THD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = rope.cos[:, None, :], rope.sin[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_THD.dtype)


def reference_attention(q_THD: Array, k_SHD: Array, v_SHD: Array, mask_TS: Bool[Array, "T S"], *,
                        dropout_rate: float = 0.0, key: PRNGKeyArray | None = None,
                        inference: bool = True) -> Array:
    """softmax(q k^T / sqrt(D) masked) v with float32 scores and softmax; dropout on the weights."""
    scale = 1.0 / np.sqrt(q_THD.shape[-1])
    # Heads first, explicitly: XLA:CPU then runs the batched matmuls without relayouts.
    q_HTD, k_HSD, v_HSD = (jnp.swapaxes(a, 0, 1) for a in (q_THD, k_SHD, v_SHD))
    s_HTS = jnp.einsum("htd,hsd->hts", q_HTD, k_HSD, preferred_element_type=jnp.float32) * scale
    s_HTS = jnp.where(mask_TS[None], s_HTS, jnp.finfo(jnp.float32).min)
    p_HTS = jax.nn.softmax(s_HTS, axis=-1)
    p_HTS = dropout(p_HTS, dropout_rate, key, inference).astype(v_SHD.dtype)
    return jnp.swapaxes(jnp.einsum("hts,hsd->htd", p_HTS, v_HSD), 0, 1)


def causal_mask(t: int) -> Bool[Array, "T T"]:
    return jnp.tril(jnp.ones((t, t), dtype=bool))


@functools.cache
def _splash_kernel(n_head: int, t: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)
    mask = masks.MultiHeadMask([masks.CausalMask((t, t))] * n_head)
    block = 512 if t % 512 == 0 else 128  # the kernel's tiles; 128 is the TPU lane width
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q_THD: Array, k_THD: Array, v_THD: Array, *, interpret: bool = False) -> Array:
    """Causal attention with the Pallas TPU splash kernel (which wants [H, T, D] and unscaled logits)."""
    if not interpret and sharding.platform() != "tpu":
        raise RuntimeError(f"attention='splash' is the TPU Pallas kernel, but the devices are "
                           f"{sharding.platform()!r}; use attention='xla' (any backend) or "
                           "'cudnn' (NVIDIA GPUs)")
    t, n_head, head_dim = q_THD.shape
    if t % 128:
        raise ValueError(f"attention='splash' tiles the sequence in blocks of 128; a window of {t} "
                         "tokens does not divide (use a block_size that is a multiple of 128)")
    kernel = _splash_kernel(n_head, t, interpret)
    q_HTD = jnp.transpose(q_THD, (1, 0, 2)) * jnp.asarray(1.0 / np.sqrt(head_dim), q_THD.dtype)
    out_HTD = kernel(q_HTD, jnp.transpose(k_THD, (1, 0, 2)), jnp.transpose(v_THD, (1, 0, 2)))
    return jnp.transpose(out_HTD, (1, 0, 2))


class CausalSelfAttention(eqx.Module):
    c_attn: Linear  # [E, 3, H, D]: q, k, v for every head in one matmul
    c_proj: Linear  # [H, D, E]
    n_head: int = eqx.field(static=True)
    kernel: str = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    rope: bool = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        e, h, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.c_attn = Linear((e,), (3, h, d), bias=cfg.bias, std=0.02, dtype=cfg.compute_dtype,
                             axes=("embed", "qkv", "heads", "head_dim"), key=k1)
        self.c_proj = Linear((h, d), (e,), bias=cfg.bias, std=residual_std(cfg.n_layer),
                             dtype=cfg.compute_dtype, axes=("heads", "head_dim", "embed"), key=k2)
        self.n_head = h
        self.kernel = cfg.attention
        self.dropout_rate = cfg.dropout
        self.rope = cfg.position == "rope"

    def qkv(self, x_TE: Array, rope: Rope | None) -> tuple[Array, Array, Array]:
        qkv_T3HD = sharding.constrain(self.c_attn(x_TE), ("seq", None, "heads", None))
        q, k, v = qkv_T3HD[:, 0], qkv_T3HD[:, 1], qkv_T3HD[:, 2]
        if self.rope:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def attend(self, q_THD: Array, k_THD: Array, v_THD: Array, *, key: PRNGKeyArray | None,
               inference: bool) -> Array:
        """Causal attention of a whole window with the configured kernel."""
        if self.kernel == "xla" or (self.dropout_rate > 0 and not inference):
            return reference_attention(q_THD, k_THD, v_THD, causal_mask(q_THD.shape[0]),
                                       dropout_rate=self.dropout_rate, key=key, inference=inference)
        if self.kernel == "cudnn" and q_THD.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention='cudnn' (cuDNN flash attention) runs in bfloat16 or float16, "
                             f"not {q_THD.dtype}: set compute_dtype='bfloat16' or attention='xla'")
        # The fused kernels cannot be partitioned by XLA: each chip runs them on its own sequences
        # (and heads, under tensor parallelism).
        kernel = (splash_attention if self.kernel == "splash" else functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation=self.kernel))
        return sharding.per_shard(kernel, ("seq", "heads", None))(q_THD, k_THD, v_THD)

    def __call__(self, x_TE: Array, rope: Rope | None, *, key: PRNGKeyArray | None = None,
                 inference: bool = False, core: Core | None = None) -> Array:
        """c_proj(attention(c_attn(x))); `core`, if given, replaces the causal attention of the
        window: the KV cache's passes (kvcache.py) keep or read the keys and values there."""
        k_attn, k_resid = jax.random.split(key) if key is not None else (None, None)
        q, k, v = self.qkv(x_TE, rope)
        y_THD = (core(q, k, v) if core is not None
                 else self.attend(q, k, v, key=k_attn, inference=inference))
        y_THD = sharding.constrain(y_THD, ("seq", "heads", None))
        return dropout(self.c_proj(y_THD), self.dropout_rate, k_resid, inference)
