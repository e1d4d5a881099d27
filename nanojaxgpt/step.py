"""Pure train and eval steps: float32 cross-entropy, gradient accumulation as a scan, AdamW.

On a mesh (traced inside sharding.activations) each chip computes only its own sequences. The
data-parallel replicas ("replica", the `data` mesh axis) each keep their own float32 gradient sum
through the accumulation scan; the sum crosses the replicas once per optimizer step.

The train state is a plain dict of arrays, so Orbax saves it as is:
    {"model": GPT arrays, "opt_state": optax state, "step": int32 [], "key": uint32 [2]}
The static half of the model (its config and structure) is closed over, never traced.
"""

from __future__ import annotations

import functools
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

from nanojaxgpt import cpu, optim, sharding
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
            keys: jax.Array | None) -> Float[Array, ""]:
    """Loss of a batch of windows of block_size+1 tokens: predict tokens[:, 1:] from tokens[:, :-1].

    keys: one dropout key per sequence, or None for evaluation (no dropout)."""
    model = eqx.combine(params, static)
    x, y = tokens[:, :-1], tokens[:, 1:]
    batched = functools.partial(sharding.vmap, name="batch", size=x.shape[0])
    if keys is None:
        logits = batched(lambda xi: model(xi, inference=True))(x)
    else:
        logits = batched(lambda xi, ki: model(xi, key=ki))(x, keys)
    return cross_entropy(logits, y)


def init_state(params: PyTree, tx: optax.GradientTransformation, seed: int) -> State:
    return {"model": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "key": jax.random.key_data(jax.random.key(seed))}


def train_step(state: State, tokens: Int[Array, "A B T1"], *, static: PyTree,
               tx: optax.GradientTransformation, optim_cfg: OptimConfig,
               param_shardings: PyTree | None = None) -> tuple[State, dict[str, Array]]:
    """One optimizer step over A accumulated micro-batches of B sequences each."""
    params, step = state["model"], state["step"]
    n, b, t1 = tokens.shape
    # Dropout randomness is a pure function of (seed, step, micro-batch, row): a resumed run, or
    # one on another mesh, draws the same masks.
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), step)
    row_keys = jax.vmap(lambda k: jax.random.split(k, b))(jax.random.split(key, n))  # [A, B]
    grad_fn = jax.value_and_grad(loss_fn)
    # R data-parallel replicas, each with B/R sequences of every micro-batch (the rows of one
    # replica lie on its devices already): each sums its own gradients over the A micro-steps,
    # so nothing crosses the replicas inside the loop.
    r = sharding.split("replica", b)
    if r == 1:
        def micro_step(micro_tokens, micro_keys):
            return grad_fn(params, static, micro_tokens, micro_keys)
        sum_shardings = param_shardings
    else:
        per_replica = sharding.vmap(lambda t, k: grad_fn(params, static, t, k), "replica", r)

        def micro_step(micro_tokens, micro_keys):
            return per_replica(micro_tokens.reshape(r, b // r, t1), micro_keys.reshape(r, b // r))
        sum_shardings = (None if param_shardings is None
                         else sharding.stacked(param_shardings, "replica", r))

    def constrain(tree):
        return tree if sum_shardings is None else jax.lax.with_sharding_constraint(tree, sum_shardings)

    def accumulate(carry, xs):
        grad_sum, loss_sum = carry
        loss, grads = micro_step(*xs)
        return (constrain(jax.tree.map(jnp.add, grad_sum, grads)), loss_sum + loss), None

    if n == 1:  # no accumulation: a one-trip loop would only block fusion and copy the grads
        loss_sum, grad_sum = micro_step(tokens[0], row_keys[0])
    else:
        lead = () if r == 1 else (r,)
        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(lead + p.shape, p.dtype), params))
        (grad_sum, loss_sum), _ = jax.lax.scan(
            accumulate, (zeros, jnp.zeros(lead, jnp.float32)), (tokens, row_keys))
    if r > 1:  # the one reduction across replicas, of float32 sums
        grad_sum = jax.tree.map(lambda g: g.sum(0) / r, grad_sum)
        loss_sum = loss_sum.sum() / r
        if param_shardings is not None:
            grad_sum = jax.lax.with_sharding_constraint(grad_sum, param_shardings)
    grads = jax.tree.map(lambda g: g / n, grad_sum)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"model": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": step + 1, "key": state["key"]}
    metrics = {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads),
               "lr": optim.learning_rate(optim_cfg, step)}
    return new_state, metrics


def eval_loss(params: PyTree, tokens: Int[Array, "N B T1"], *, static: PyTree,
              per_pass: int = 1) -> Float[Array, ""]:
    """Mean loss over N batches in one scan, `per_pass` batches per trip (one dispatch in all)."""
    n, b, t1 = tokens.shape
    # [N, B] -> [N/p, B*p] keeping each device's rows of B together: no data moves between devices.
    g = per_pass
    passes = tokens.reshape(n // g, g, b, t1).swapaxes(1, 2).reshape(n // g, b * g, t1)

    def body(total, batch):
        return total + loss_fn(params, static, batch, None), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), passes)
    return total / passes.shape[0]


@dataclass(frozen=True)
class Steps:
    """The jitted steps of one run, with their input and output shardings fixed."""
    train: Callable[[State, jax.Array], tuple[State, dict[str, jax.Array]]]
    evaluate: Callable[[PyTree, jax.Array], jax.Array]


def jit_steps(static: PyTree, tx: optax.GradientTransformation, optim_cfg: OptimConfig,
              state_shardings: PyTree, batch_sharding: NamedSharding,
              eval_sharding: NamedSharding, replicated: NamedSharding,
              batches_per_eval_pass: int | None = None) -> Steps:
    """The steps, traced with their activations laid out on the batch's mesh.

    batches_per_eval_pass: None: what nanojaxgpt.cpu.batches_per_eval_pass picks for
    the mesh and the evaluation tokens' shape (1 off CPU).
    """
    mesh = batch_sharding.mesh

    def train_fn(s, t):
        with sharding.activations(mesh):
            return train_step(s, t, static=static, tx=tx, optim_cfg=optim_cfg,
                              param_shardings=state_shardings["model"])

    def eval_fn(p, t):
        with sharding.activations(mesh):
            n, b, t1 = t.shape
            per_pass = batches_per_eval_pass or cpu.batches_per_eval_pass(
                mesh, n, b // sharding.split("batch", b), t1 - 1)
            return eval_loss(p, t, static=static, per_pass=per_pass)

    train = jax.jit(train_fn, in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated),
                    donate_argnums=0,  # the old state's buffers become the new state's: no second copy
                    compiler_options=cpu.train_options(mesh))
    evaluate = jax.jit(eval_fn, in_shardings=(state_shardings["model"], eval_sharding),
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
