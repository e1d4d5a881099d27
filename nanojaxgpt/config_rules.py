"""The rules a config's values must follow, beyond their types: each broken rule is a message that
names the key, its value and what it must be. config.from_dict raises the first as a ConfigError."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanojaxgpt.config import Config


def problems(cfg: Config) -> Iterator[str]:
    """The broken rules, in order; each rule may assume the ones before it hold."""
    m, t, o, c, d = cfg.model, cfg.train, cfg.optim, cfg.checkpoint, cfg.distributed
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                yield f"{section}.{key}={value} must be a finite number"
    positive = {"model.block_size": m.block_size, "model.vocab_size": m.vocab_size,
                "model.vocab_multiple": m.vocab_multiple, "model.n_layer": m.n_layer,
                "model.n_head": m.n_head, "model.n_embd": m.n_embd,
                "train.batch_size": t.batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.eval_interval": t.eval_interval, "train.eval_iters": t.eval_iters,
                "train.log_interval": t.log_interval, "train.profile_steps": t.profile_steps,
                "optim.learning_rate": o.learning_rate,
                "data.read_timeout_s": cfg.data.read_timeout_s,
                "checkpoint.checkpoint_interval": c.checkpoint_interval,
                "checkpoint.keep_checkpoints": c.keep_checkpoints,
                "checkpoint.save_timeout_s": c.save_timeout_s,
                "checkpoint.lock_stale_s": c.lock_stale_s,
                "distributed.initialization_timeout_s": d.initialization_timeout_s,
                "distributed.heartbeat_timeout_s": d.heartbeat_timeout_s}
    for k, v in positive.items():
        if not (v > 0):
            yield f"{k}={v} must be positive"
    non_negative = {"train.max_iters": t.max_iters, "train.hellaswag_limit": t.hellaswag_limit,
                    "optim.warmup_iters": o.warmup_iters,
                    "optim.lr_decay_iters": o.lr_decay_iters, "optim.weight_decay": o.weight_decay,
                    "optim.grad_clip": o.grad_clip}
    for k, v in non_negative.items():
        if not (v >= 0):
            yield f"{k}={v} must be >= 0"
    if not (t.profile_start >= -1):
        yield f"train.profile_start={t.profile_start} must be a step, or -1 for none"
    if not (m.n_embd % m.n_head == 0):
        yield f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}"
    if m.position == "rope" and m.head_dim % 2:
        yield f"position='rope' needs an even head size; n_embd/n_head={m.head_dim}"
    if not (0.0 <= m.dropout < 1.0):
        yield f"model.dropout={m.dropout} must be in [0, 1)"
    if m.attention == "splash" and m.block_size % 128:
        yield (f"attention='splash' tiles the sequence in blocks of 128, but model.block_size="
               f"{m.block_size}; use a multiple of 128 or attention='xla'")
    if m.attention == "cudnn" and m.compute_dtype != "bfloat16":
        yield (f"attention='cudnn' (cuDNN flash attention) runs in bfloat16, but "
               f"model.compute_dtype={m.compute_dtype!r}; set --compute_dtype=bfloat16 or "
               "--attention=xla")
    if not (0.0 <= o.min_lr <= o.learning_rate):
        yield f"optim.min_lr={o.min_lr} must be in [0, optim.learning_rate={o.learning_rate}]"
    for k in ("beta1", "beta2"):
        v = getattr(o, k)
        if not (0.0 <= v < 1.0):
            yield f"optim.{k}={v} must be in [0, 1)"
    if o.decay_lr and o.warmup_iters > o.lr_decay_iters:
        yield (f"optim.warmup_iters={o.warmup_iters} must be <= optim.lr_decay_iters="
               f"{o.lr_decay_iters} (the schedule decays after the warmup)")
    for k in ("data.data_dir", "train.out_dir", "train.init_from"):
        section, key = k.split(".")
        if not str(getattr(getattr(cfg, section), key)).strip():
            yield f"{k} must not be empty"
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        if not (v > 0 or v == -1):
            yield f"mesh.{axis}={v} must be a positive device count or -1 (the rest)"
    if not (cfg.mesh.slices >= 1):
        yield f"mesh.slices={cfg.mesh.slices} must be >= 1"
    if not ([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1):
        yield "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"
