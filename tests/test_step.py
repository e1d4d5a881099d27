"""The pure steps: loss, gradient accumulation, grouped evaluation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanojaxgpt import model as gpt
from nanojaxgpt import optim, step
from nanojaxgpt.config import ModelConfig, OptimConfig

CFG = ModelConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def _setup():
    model = gpt.GPT(CFG, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    tx = optim.make(OptimConfig(warmup_iters=0), optim.decay_mask(model))
    return params, static, tx


def _tokens(*shape):
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_cross_entropy_equals_optax():
    logits = jax.random.normal(jax.random.key(1), (3, 5, 64)) * 3
    targets = jax.random.randint(jax.random.key(2), (3, 5), 0, 64)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    np.testing.assert_allclose(step.cross_entropy(logits, targets), ref, rtol=1e-6)


def test_accumulating_two_micro_batches_equals_one_batch():
    # Plain SGD so the update is the gradient: Adam would turn the float noise of gradients
    # that are exactly zero in theory (the attention key bias) into full-size steps.
    params, static, _ = _setup()
    tx = optax.sgd(1.0)
    state = step.init_state(params, tx, seed=0)
    tokens = _tokens(8, CFG.block_size + 1)
    one, m1 = step.train_step(state, tokens[None], static=static, tx=tx, optim_cfg=OptimConfig())
    two, m2 = step.train_step(state, tokens.reshape(2, 4, -1), static=static, tx=tx,
                              optim_cfg=OptimConfig())
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one["model"]), jax.tree.leaves(two["model"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(one["step"]) == int(two["step"]) == 1


def test_grouped_evaluation_equals_one_batch_at_a_time():
    params, static, _ = _setup()
    tokens = _tokens(20, 4, CFG.block_size + 1)
    ref = step.eval_loss(params, tokens, static=static, per_pass=1)
    for per_pass in (2, 5, 20):
        np.testing.assert_allclose(step.eval_loss(params, tokens, static=static, per_pass=per_pass),
                                   ref, rtol=1e-6)


def test_batches_per_eval_pass_bounds_tokens_per_pass():
    from nanojaxgpt import cpu

    mesh = jax.make_mesh((1,), ("data",))
    assert cpu.batches_per_eval_pass(mesh, 200, 12, 64) == 5  # 5 x 12 x 64 = 3,840 tokens <= 4,096
    assert cpu.batches_per_eval_pass(mesh, 200, 12, 1024) == 1  # GPT-2 sized batches: one at a time
    assert cpu.batches_per_eval_pass(mesh, 7, 1, 16) == 7


def _mesh_steps(cfg):
    from nanojaxgpt import sharding
    from nanojaxgpt.state import setup

    mesh = sharding.make_mesh(cfg.mesh)
    ts = setup(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh, 3, 1)
    steps = step.jit_steps(ts.static, ts.tx, cfg.optim, ts.shardings, batch_sh, batch_sh,
                           sharding.replicated(mesh), batches_per_eval_pass=2)
    return ts, steps, batch_sh


def test_steps_compiled_ahead_equal_the_jitted_steps_on_a_mesh():
    from nanojaxgpt import config

    cfg = config.load(None, {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
                             "vocab_size": 50, "batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4})
    ts, steps, batch_sh = _mesh_steps(cfg)
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(0, 50, (1, 8, 17), dtype=np.int32), batch_sh)
               for _ in range(3)]
    eval_tokens = jax.device_put(rng.integers(0, 50, (4, 8, 17), dtype=np.int32), batch_sh)
    ahead = step.compile_ahead(steps, ts.abstract,
                               jax.ShapeDtypeStruct((1, 8, 17), np.int32, sharding=batch_sh),
                               jax.ShapeDtypeStruct((4, 8, 17), np.int32, sharding=batch_sh))

    def trajectory(s):
        state, losses = ts.init(cfg), []
        for tokens in batches:
            state, out = s.train(state, tokens)
            losses.append(float(out["loss"]))
        return losses, float(s.evaluate(state["model"], eval_tokens)), state

    plain_losses, plain_eval, plain_state = trajectory(steps)
    ahead_losses, ahead_eval, ahead_state = trajectory(ahead)
    assert plain_losses == ahead_losses and plain_eval == ahead_eval
    for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(ahead_state)):
        np.testing.assert_array_equal(a, b)
        assert a.sharding == b.sharding
    # The evaluation-only form compiles no train step, and still evaluates the same.
    only_eval = step.compile_ahead(steps, ts.abstract, None,
                                   jax.ShapeDtypeStruct((4, 8, 17), np.int32, sharding=batch_sh))
    assert only_eval.train is steps.train
    assert float(only_eval.evaluate(plain_state["model"], eval_tokens)) == plain_eval


def test_cpu_train_options_do_not_change_results():
    # The train step compiles with cpu.TRAIN_OPTIONS on CPU; without them it must compute the same.
    from nanojaxgpt import config

    cfg = config.load(None, {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
                             "vocab_size": 50, "batch_size": 8})
    ts, steps, batch_sh = _mesh_steps(cfg)
    plain = jax.jit(lambda s, t: step.train_step(s, t, static=ts.static, tx=ts.tx,
                                                 optim_cfg=cfg.optim,
                                                 param_shardings=ts.shardings["model"]),
                    in_shardings=(ts.shardings, batch_sh))
    tokens = jax.device_put(np.random.default_rng(1).integers(0, 50, (1, 8, 17), dtype=np.int32),
                            batch_sh)
    a, out_a = plain(ts.init(cfg), tokens)
    b, out_b = steps.train(ts.init(cfg), tokens)
    np.testing.assert_allclose(out_a["loss"], out_b["loss"], rtol=1e-6)
    np.testing.assert_allclose(optax.tree.norm(a["model"]), optax.tree.norm(b["model"]), rtol=1e-6)


def test_cpu_init_options_give_bitwise_the_same_state():
    # TrainSetup.init compiles with cpu.INIT_OPTIONS (a faster compile) on CPU: same bits as -O3.
    from nanojaxgpt import config

    cfg = config.load(None, {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16,
                             "vocab_size": 50, "batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4})
    ts, _, _ = _mesh_steps(cfg)
    fast = ts.init(cfg)

    def fresh():  # TrainSetup.init's function, compiled with XLA's default options
        model = gpt.GPT(cfg.model, key=jax.random.key(cfg.train.seed))
        return step.init_state(eqx.filter(model, eqx.is_array), ts.tx, cfg.train.seed)

    default = jax.jit(fresh, out_shardings=ts.shardings)()
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.sharding == b.sharding
