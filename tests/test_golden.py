"""Golden values: the loss, gradient norm and a parameter checksum after 1 and 10 train steps of a
tiny fixed run (dropout, accumulation, warmup and clipping on; a 2 x 4 data x fsdp mesh).

"The loss went down" tests miss a silent change to initialisation, loss, RNG use or optimizer;
this one does not. When a change is meant to alter the numbers, run this file with -s, check
that the new values are what the change should give, and paste them into GOLDEN.
"""

import jax
import numpy as np

from nanojaxgpt import config, sharding
from nanojaxgpt.state import setup
from nanojaxgpt.step import jit_steps

CFG = config.load(None, {
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
    "model.vocab_size": 65, "model.dropout": 0.1, "train.batch_size": 8,
    "train.gradient_accumulation_steps": 2, "train.seed": 1234, "optim.learning_rate": 1e-2,
    "optim.min_lr": 1e-3, "optim.warmup_iters": 3, "optim.lr_decay_iters": 10,
    "optim.grad_clip": 1.0, "mesh.data": 2, "mesh.fsdp": 4})

# step: (loss, grad_norm, sum of |parameter|), measured with XLA:CPU.
GOLDEN = {1: (4.185065269470215, 0.6897663474082947, 516.8828180044811),
          10: (4.195199012756348, 0.413872092962265, 798.0710112275272)}


def test_golden_steps():
    mesh = sharding.make_mesh(CFG.mesh)
    ts = setup(CFG, mesh)
    batch_sh = sharding.batch_sharding(mesh, 3, 1)
    steps = jit_steps(ts.static, ts.tx, CFG.optim, ts.shardings, batch_sh, batch_sh,
                      sharding.replicated(mesh))
    state = ts.init(CFG)
    rng = np.random.default_rng(0)
    got = {}
    for step in range(1, 11):
        tokens = rng.integers(0, CFG.model.vocab_size, (2, 8, 17), dtype=np.int32)
        state, out = steps.train(state, jax.device_put(tokens, batch_sh))
        if step in GOLDEN:
            params = jax.tree.leaves(jax.device_get(state["model"]))
            got[step] = (float(out["loss"]), float(out["grad_norm"]),
                         float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in params)))
    print("GOLDEN =", got)
    for step, want in GOLDEN.items():
        np.testing.assert_allclose(
            got[step], want, rtol=1e-5,
            err_msg=f"step {step} (loss, grad_norm, sum |params|) changed: if the change was "
                    "intended, check the new values and update GOLDEN in tests/test_golden.py")
