"""The parameter-holding building blocks of the GPT: Linear, Embedding, LayerNorm, RMSNorm, dropout.

Each layer declares the logical axis names of every parameter in a static field next to it
(`weight_axes` beside `weight`); `model.logical_axes` reads them, and sharding.py's one table maps
the names to mesh axes. Parameters are float32; each layer computes in the dtype it is given.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

Axes = tuple[str | None, ...]


class Linear(eqx.Module):
    """y = x @ W + b, contracting the trailing `in_shape` dims of x with the leading dims of W.

    The weight is stored [*in_shape, *out_shape] (GPT-2's Conv1D layout, [in, out]), so attention
    can keep heads as a real dimension: c_attn is [embed, 3, heads, head_dim].
    """

    weight: Float[Array, "..."]
    bias: Float[Array, "..."] | None
    n_in: int = eqx.field(static=True)  # how many leading weight dims are contracted
    dtype: str = eqx.field(static=True)
    weight_axes: Axes = eqx.field(static=True)
    bias_axes: Axes | None = eqx.field(static=True)

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *, bias: bool,
                 std: float, axes: Axes, dtype: str, key: PRNGKeyArray):
        self.weight = std * jax.random.normal(key, in_shape + out_shape, jnp.float32)
        self.bias = jnp.zeros(out_shape, jnp.float32) if bias else None
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.weight_axes = axes
        self.bias_axes = axes[len(in_shape):] if bias else None

    def __call__(self, x: Array) -> Array:
        y = jnp.tensordot(x.astype(self.dtype), self.weight.astype(self.dtype), axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias.astype(self.dtype)
        return y


class Embedding(eqx.Module):
    """A [num, n_embd] table looked up by integer index (token or position)."""

    weight: Float[Array, "N E"]
    weight_axes: Axes = eqx.field(static=True)

    def __init__(self, num: int, n_embd: int, *, std: float, axes: Axes, key: PRNGKeyArray,
                 num_used: int | None = None):
        w = std * jax.random.normal(key, (num, n_embd), jnp.float32)
        if num_used is not None and num_used < num:
            # Rows past the real vocabulary are padding: zero, never looked up, never predicted.
            w = w.at[num_used:].set(0.0)
        self.weight = w
        self.weight_axes = axes


class LayerNorm(eqx.Module):
    """LayerNorm over the last dim, computed in float32 (as PyTorch autocast does), eps 1e-5."""

    weight: Float[Array, "E"]
    bias: Float[Array, "E"] | None
    eps: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    weight_axes: Axes = eqx.field(static=True)
    bias_axes: Axes | None = eqx.field(static=True)

    def __init__(self, n_embd: int, *, bias: bool, dtype: str, eps: float = 1e-5):
        self.weight = jnp.ones((n_embd,), jnp.float32)
        self.bias = jnp.zeros((n_embd,), jnp.float32) if bias else None
        self.eps = eps
        self.dtype = dtype
        self.weight_axes = ("embed",)
        self.bias_axes = ("embed",) if bias else None

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.astype(self.dtype)


class RMSNorm(eqx.Module):
    """x / rms(x) * weight, in float32; no bias, no mean subtraction."""

    weight: Float[Array, "E"]
    eps: float = eqx.field(static=True)
    dtype: str = eqx.field(static=True)
    weight_axes: Axes = eqx.field(static=True)

    def __init__(self, n_embd: int, *, dtype: str, eps: float = 1e-5):
        self.weight = jnp.ones((n_embd,), jnp.float32)
        self.eps = eps
        self.dtype = dtype
        self.weight_axes = ("embed",)

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * self.weight).astype(self.dtype)


def norm(kind: str, n_embd: int, *, bias: bool, dtype: str) -> LayerNorm | RMSNorm:
    return LayerNorm(n_embd, bias=bias, dtype=dtype) if kind == "layernorm" else RMSNorm(n_embd, dtype=dtype)


def dropout(x: Array, rate: float, key: PRNGKeyArray | None, inference: bool) -> Array:
    """Inverted dropout; a no-op (and no random numbers drawn) when rate is 0 or in inference."""
    if inference or rate == 0.0:
        return x
    if key is None:
        raise ValueError(f"dropout={rate} needs a PRNG key while training: pass key=..., "
                         "or inference=True to disable dropout")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def residual_std(n_layer: int) -> float:
    """GPT-2's init for the projections that write into the residual stream: 0.02/sqrt(2 n_layer)."""
    return 0.02 / math.sqrt(2 * n_layer)
