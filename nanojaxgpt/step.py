"""Pure train and eval steps: float32 cross-entropy, gradient accumulation as a scan, AdamW.

The train state is a plain dict of arrays, so Orbax saves it as is:
    {"model": GPT arrays, "opt_state": optax state, "step": int32 [], "key": uint32 [2]}
The static half of the model (its config and structure) is closed over, never traced.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jaxtyping import Array, Float, Int, PyTree

from nanojaxgpt import optim, sharding
from nanojaxgpt.config import OptimConfig

State = dict[str, Any]


def cross_entropy(logits: Float[Array, "*B T V"], targets: Int[Array, "*B T"]) -> Float[Array, ""]:
    """Mean next-token loss in float32 (padding logits are masked by the model itself)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # A one-hot product instead of gathering the target's log-probability: its gradient is
    # elementwise and fuses, where the gather's is a scatter-add (serial on XLA:CPU, 4x the step).
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    return -jnp.sum(logp * onehot, axis=-1).mean()


def loss_fn(params: PyTree, static: PyTree, tokens: Int[Array, "B T1"],
            key: jax.Array | None) -> Float[Array, ""]:
    """Loss of a batch of windows of block_size+1 tokens: predict tokens[:, 1:] from tokens[:, :-1]."""
    model = eqx.combine(params, static)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if key is None:  # evaluation: no dropout
        logits = jax.vmap(lambda xi: model(xi, inference=True))(x)
    else:
        keys = jax.random.split(key, x.shape[0])
        logits = jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)
    return cross_entropy(logits, y)


def init_state(params: PyTree, tx: optax.GradientTransformation, seed: int) -> State:
    return {"model": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "key": jax.random.key_data(jax.random.key(seed))}


def train_step(state: State, tokens: Int[Array, "A B T1"], *, static: PyTree,
               tx: optax.GradientTransformation, optim_cfg: OptimConfig,
               param_shardings: PyTree | None = None) -> tuple[State, dict[str, Array]]:
    """One optimizer step over A accumulated micro-batches of B sequences each."""
    params, step = state["model"], state["step"]
    # Dropout randomness is a pure function of (seed, step): a resumed run draws the same masks.
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), step)
    micro_keys = jax.random.split(key, tokens.shape[0])
    grad_fn = jax.value_and_grad(loss_fn)

    def constrain(tree):
        if param_shardings is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def accumulate(carry, xs):
        grad_sum, loss_sum = carry
        micro_tokens, micro_key = xs
        loss, grads = grad_fn(params, static, micro_tokens, micro_key)
        return (constrain(jax.tree.map(jnp.add, grad_sum, grads)), loss_sum + loss), None

    n = tokens.shape[0]
    if n == 1:  # no accumulation: a one-trip loop would only block fusion and copy the grads
        loss_sum, grad_sum = grad_fn(params, static, tokens[0], micro_keys[0])
    else:
        zeros = constrain(jax.tree.map(jnp.zeros_like, params))
        (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                               (tokens, micro_keys))
    grads = jax.tree.map(lambda g: g / n, grad_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"model": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": step + 1, "key": state["key"]}
    metrics = {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads),
               "lr": optim.learning_rate(optim_cfg, step)}
    return new_state, metrics


def eval_group(n_batches: int, batch_rows: int, block_size: int, max_tokens: int = 4096) -> int:
    """How many eval batches to run as one forward pass: the most within `max_tokens` per device.

    Many small batches (the CPU recipe: 12 x 64 tokens, 200 of them) waste the machine on
    per-trip overhead, and a big pass falls out of the caches: measured on 2 CPU cores, 200
    batches took 0.94 s one at a time, 0.84-0.85 s in groups of 4-5 (3-4k tokens per pass),
    1.09 s in groups of 20 and 1.25 s in groups of 100. GPT-2-sized batches run one at a time.
    """
    fits = max(1, max_tokens // (batch_rows * block_size))
    return max(g for g in range(1, n_batches + 1) if n_batches % g == 0 and g <= fits)


def eval_loss(params: PyTree, tokens: Int[Array, "N B T1"], *, static: PyTree,
              group: int = 1) -> Float[Array, ""]:
    """Mean loss over N batches in one scan, `group` batches per trip (one dispatch in all)."""
    n, b, t1 = tokens.shape
    # [N, B] -> [N/g, B*g] keeping each device's rows of B together: no data moves between devices.
    grouped = tokens.reshape(n // group, group, b, t1).swapaxes(1, 2).reshape(n // group, b * group, t1)

    def body(total, batch):
        return total + loss_fn(params, static, batch, None), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), grouped)
    return total / grouped.shape[0]


# XLA:CPU only: hand whole dot fusions (and reductions) to YNNPACK in the train step. Measured on
# 2 cores, A/B interleaved in one process: the CPU quick-start step (4 x 128, 12 x 64 tokens) takes
# 20.6 ms instead of 27.1, a 6 x 384 model 686 ms instead of 738. The eval forward pass is faster with
# XLA's default (1.07 vs 1.15 s for 200 batches), so it keeps the default. Ignored off CPU.
CPU_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@dataclass(frozen=True)
class Steps:
    """The jitted steps of one run, with their input and output shardings fixed."""
    train: Callable[[State, jax.Array], tuple[State, dict[str, jax.Array]]]
    evaluate: Callable[[PyTree, jax.Array], jax.Array]


def jit_steps(static: PyTree, tx: optax.GradientTransformation, optim_cfg: OptimConfig,
              state_shardings: PyTree, batch_sharding: NamedSharding,
              eval_sharding: NamedSharding, replicated: NamedSharding,
              eval_group_size: int = 1) -> Steps:
    train = jax.jit(
        lambda s, t: train_step(s, t, static=static, tx=tx, optim_cfg=optim_cfg,
                                param_shardings=state_shardings["model"]),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,  # the old state's buffers become the new state's: no second copy
        compiler_options=CPU_TRAIN_OPTIONS if sharding.on_cpu(batch_sharding.mesh) else None)
    evaluate = jax.jit(lambda p, t: eval_loss(p, t, static=static, group=eval_group_size),
                       in_shardings=(state_shardings["model"], eval_sharding),
                       out_shardings=replicated)
    return Steps(train=train, evaluate=evaluate)


class _Compiling:
    """A jitted function being compiled for fixed abstract arguments in a background thread.

    Calling it waits for that compile, then runs the compiled executable (whose arguments must
    have exactly the abstract shapes, dtypes and shardings it was compiled for).
    """

    def __init__(self, fn: Any, args: tuple, pool: ThreadPoolExecutor):
        self._compiled: Future = pool.submit(lambda: fn.lower(*args).compile())

    def __call__(self, *args: Any) -> Any:
        return self._compiled.result()(*args)


def compile_ahead(steps: Steps, state: PyTree, batch: jax.ShapeDtypeStruct | None,
                  eval_batch: jax.ShapeDtypeStruct) -> Steps:
    """The same steps, compiled for these abstract arguments in two background threads from now.

    XLA compiles without holding the GIL, so both compiles overlap with what the caller does next:
    creating the state (its own compile) or restoring a checkpoint. `state` holds
    jax.ShapeDtypeStruct leaves with shardings (TrainSetup.abstract); batch=None: no train step
    will run (evaluation only), so it is not compiled.
    """
    pool = ThreadPoolExecutor(2, thread_name_prefix="nanojaxgpt-compile")
    train = steps.train if batch is None else _Compiling(steps.train, (state, batch), pool)
    steps = Steps(train=train,
                  evaluate=_Compiling(steps.evaluate, (state["model"], eval_batch), pool))
    pool.shutdown(wait=False)  # the threads end when their compile does
    return steps
