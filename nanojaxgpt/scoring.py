"""Summed next-token losses of many token rows, batched, jitted and sharded over the mesh.

The shared engine of HellaSwag (a row = context + one ending, scored on the ending) and of the
eval command's validation loss (a row = one window, scored on every target). Rows are sorted by
length and cut into batches padded to a power-of-two window, so a handful of compilations cover
any set; the batch axis is laid out over the mesh's (data, fsdp) devices, each host feeds only the
rows of its own devices, and the per-row results come back replicated to every host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from nanojaxgpt import sharding
from nanojaxgpt.config import MeshConfig
from nanojaxgpt.model import GPT, logical_axes, with_runtime
from nanojaxgpt.sample import padded_window

Row = tuple[Sequence[int] | np.ndarray, int]  # (tokens, index of the first scored token, >= 1)


def _row_losses(model: GPT, tokens: Int[Array, "R W1"], bounds: Int[Array, "R 2"]
                ) -> tuple[Float[Array, " R"], Int[Array, " R"]]:
    """Summed loss of each row's targets j in [start, end) (target j is token j + 1), and their count."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits = jax.vmap(lambda t: model(t, inference=True))(x)
    target = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    j = jnp.arange(x.shape[1])
    mask = (j >= bounds[:, :1]) & (j < bounds[:, 1:])
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=-1), jnp.sum(mask, axis=-1)


@functools.cache
def _scorer(mesh: Mesh):
    return jax.jit(_row_losses, out_shardings=sharding.replicated(mesh))


def place(model: GPT, mesh: Mesh) -> GPT:
    """The model's weights laid out on `mesh` by the sharding rules (a no-op where they already are)."""
    shardings = sharding.named_shardings(mesh, logical_axes(model), eqx.filter(model, eqx.is_array))
    return jax.device_put(model, shardings)


def _batches(lengths: np.ndarray, block_size: int, rows_multiple: int, tokens_per_batch: int):
    """(window, row indices) batches: rows by length, each batch padded to its longest row's
    power-of-two window, rows per batch a multiple of rows_multiple within tokens_per_batch."""
    order = np.argsort(lengths, kind="stable")
    windows = np.array([padded_window(max(1, int(n) - 1), block_size) for n in lengths[order]])
    for w in np.unique(windows):
        rows = order[windows == w]
        per_batch = max(1, tokens_per_batch // (w * rows_multiple)) * rows_multiple
        per_batch = min(per_batch, -(-len(rows) // rows_multiple) * rows_multiple)  # a small set
        for i in range(0, len(rows), per_batch):
            yield int(w), rows[i:i + per_batch], int(per_batch)


def row_losses(model: GPT, rendered: Sequence[Row], *, mesh: Mesh | None = None,
               tokens_per_device: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the summed loss of tokens[start:] given the tokens before them, and their count.

    Every host calls this with the same rows; `mesh` defaults to all devices. `tokens_per_device`
    bounds one forward pass: its logits are tokens_per_device x padded vocab float32 per device.
    """
    mesh = mesh or sharding.make_mesh(MeshConfig())
    cfg = model.config
    if cfg.attention != "xla":  # the portable kernel for any window: splash wants 128-token tiles
        model = with_runtime(model, attention="xla")
    model = place(model, mesh)
    lengths = np.array([len(toks) for toks, _ in rendered])
    if lengths.size and (lengths.min() < 2 or lengths.max() > cfg.block_size + 1):
        raise ValueError(f"rows must hold 2 to block_size + 1 = {cfg.block_size + 1} tokens; "
                         f"got {lengths.min()} to {lengths.max()}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    row_sh = sharding.batch_sharding(mesh, 2, 0)
    pending = []
    for w, rows, per_batch in _batches(lengths, cfg.block_size, shards, tokens_per_device * shards):
        def tokens_of(wanted, rows=rows, w=w):  # only the rows this host's devices hold
            out = np.zeros((len(wanted), w + 1), np.int32)
            for i, r in enumerate(wanted):
                if r < len(rows):
                    toks = rendered[rows[r]][0]
                    out[i, :len(toks)] = toks
            return out

        def bounds_of(wanted, rows=rows):  # padding rows count no target: start = end = 0
            return np.array([(rendered[rows[r]][1] - 1, len(rendered[rows[r]][0]) - 1)
                             if r < len(rows) else (0, 0) for r in wanted], np.int32).reshape(-1, 2)

        tokens = sharding.host_local_array((per_batch, w + 1), row_sh, tokens_of)
        bounds = sharding.host_local_array((per_batch, 2), row_sh, bounds_of)
        pending.append((rows, _scorer(mesh)(model, tokens, bounds)))  # all queued, then read
    loss = np.zeros(len(rendered), np.float64)
    count = np.zeros(len(rendered), np.int64)
    for rows, (row_loss, row_count) in pending:
        loss[rows] = np.asarray(row_loss.addressable_data(0))[:len(rows)]
        count[rows] = np.asarray(row_count.addressable_data(0))[:len(rows)]
    return loss, count
