"""Checkpoints: bitwise round trip, restore onto other meshes, keep-N, a save killed half-way,
corrupt files, async errors, a stalled bucket, gs:// on the loopback GCS server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from nanojaxgpt import checkpoint, saved
from nanojaxgpt.config import CheckpointConfig, Config, ModelConfig
from tools.gcs_server import GCSServer
from tools import inspect_checkpoint

REPO = Path(__file__).resolve().parents[1]
ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
CFG = Config(model=ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))


class TinyNet(eqx.Module):
    """A stand-in Equinox model: arrays, nested modules and static fields, like GPT."""

    wte: eqx.nn.Embedding
    ln_f: eqx.nn.LayerNorm
    lm_head: eqx.nn.Linear
    n_layer: int = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, *, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.wte = eqx.nn.Embedding(cfg.vocab_size, cfg.n_embd, key=k1)
        self.ln_f = eqx.nn.LayerNorm(cfg.n_embd)
        self.lm_head = eqx.nn.Linear(cfg.n_embd, cfg.vocab_size, use_bias=False, key=k2)
        self.n_layer = cfg.n_layer


def abstract_tiny(cfg: ModelConfig) -> TinyNet:
    return eqx.filter_eval_shape(TinyNet, cfg, key=jax.random.key(0))


def train_state(seed: int = 0) -> dict:
    """Model params + AdamW state after one update (non-zero moments) + step + both key kinds."""
    tx = optax.adamw(1e-3)

    @eqx.filter_jit  # one compile instead of one per eager op
    def make(key):
        params = eqx.filter(TinyNet(CFG.model, key=key), eqx.is_array)
        opt_state = tx.init(params)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    params, opt_state = make(jax.random.key(seed))
    return {"model": params, "opt_state": opt_state, "step": jnp.int32(7),
            "key": jax.random.key(seed + 1),
            "key_data": jax.random.key_data(jax.random.key(seed + 2)),
            "bf16": jnp.arange(6, dtype=jnp.bfloat16)}


def abstract_of(tree, sharding=None):
    sharding = sharding or NamedSharding(jax.make_mesh((1,), ("x",), (AxisType.Auto,),
                                                       devices=jax.devices()[:1]), P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def raw_bytes(x) -> bytes:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).tobytes()


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert raw_bytes(x) == raw_bytes(y)


def save(ck, step, state, **meta):
    ck.save(step, state, CFG, meta=meta)


def test_round_trip_is_bitwise(tmp_path):
    state = train_state()
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        assert ck.latest_step() is None
        save(ck, 10, state, note="hello")
    assert (tmp_path / "checkpoints" / "10").is_dir()  # checkpoints/ beside config.json and logs
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        assert ck.latest_step() == 10
        r = ck.restore(abstract_of(state))
    assert r.step == 10
    assert r.meta == {"note": "hello"}
    assert r.config == json.loads(CFG.to_json())
    assert_bitwise_equal(r.state, state)
    assert isinstance(r.state["model"], TinyNet) and r.state["model"].n_layer == 2
    assert jax.tree.structure(r.state["opt_state"]) == jax.tree.structure(state["opt_state"])
    assert saved.read_config(str(tmp_path)) == CFG


def test_restore_onto_other_meshes(tmp_path):
    mesh8 = jax.make_mesh((2, 4), ("a", "b"), (AxisType.Auto,) * 2)
    w = jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32)
    state = {"w": jax.device_put(w, NamedSharding(mesh8, P("a", "b"))),
             "mu": jax.device_put(w * 2, NamedSharding(mesh8, P(None, "b"))),
             "b": jax.device_put(jnp.ones(32), NamedSharding(mesh8, P()))}
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        save(ck, 1, state)
    mesh4 = jax.make_mesh((4,), ("fsdp",), (AxisType.Auto,), devices=jax.devices()[4:])
    mesh1 = jax.make_mesh((1,), ("fsdp",), (AxisType.Auto,), devices=jax.devices()[:1])
    for target in ({"w": NamedSharding(mesh4, P(None, "fsdp")), "mu": NamedSharding(mesh4, P("fsdp")),
                    "b": NamedSharding(mesh4, P())},
                   {k: NamedSharding(mesh1, P()) for k in state}):
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k])
                    for k, v in state.items()}
        with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
            r = ck.restore(abstract)
        for k, v in state.items():
            assert r.state[k].sharding == target[k]
            np.testing.assert_array_equal(np.asarray(r.state[k]), np.asarray(v))


def test_keep_n_should_save_latest_step(tmp_path):
    cfg = CheckpointConfig(checkpoint_interval=2, keep_checkpoints=2)
    with checkpoint.Checkpointer(str(tmp_path), cfg) as ck:
        assert [s for s in range(6) if ck.should_save(s)] == [2, 4]
        for step in range(1, 8):
            if ck.should_save(step) or step == 7:  # 7: the end of the run
                ck.save(step, {"w": jnp.full((4,), step)}, CFG)
        ck.save(7, {"w": jnp.zeros(4)}, CFG)  # no-op: step 7 exists
        ck.wait()
        assert ck.latest_step() == 7
        with pytest.raises(ValueError, match="JSON-serialisable"):
            ck.save(8, {"w": jnp.zeros(4)}, CFG, meta={"bad": object()})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6", "7"]
    with checkpoint.Checkpointer(str(tmp_path), cfg) as ck:
        r = ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=ONE)}, 6)
        assert r.step == 6 and r.state["w"].tolist() == [6] * 4
        with pytest.raises(checkpoint.CheckpointError, match=r"no complete checkpoint of step 4"):
            ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=ONE)}, 4)
        with pytest.raises(TypeError, match=r"\['w'\].*ShapeDtypeStruct with .sharding"):
            ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.int32)})


# A process that saves step 1, then starts async saves of steps 2, 3, ... until it sees one half
# on storage (files written, not committed): there it prints the step and stops itself (SIGSTOP
# freezes every thread at once), and the test SIGKILLs it. Checkpoint s holds w + s.
_KILLED_SAVER = r"""
import os, signal, sys
import jax
import orbax.checkpoint as ocp
from etils import epath
from nanojaxgpt import checkpoint
from nanojaxgpt.config import CheckpointConfig, Config
out_dir, n = sys.argv[1], int(sys.argv[2])
ck = checkpoint.Checkpointer(out_dir, CheckpointConfig())
w = jax.random.normal(jax.random.key(0), (n,))
ck.save(1, {"w": w + 1}, Config())
ck.wait()
root = epath.Path(out_dir) / "checkpoints"
for step in range(2, 20):
    ck.save(step, {"w": w + step}, Config())
    while not ocp.path.step.is_path_finalized(root / str(step)):
        if any(p.name.startswith(str(step)) and (p / "state").exists() for p in root.iterdir()):
            print("MID-SAVE", step, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    # Too late: that save completed between two looks. Try the next step.
"""


def kill_mid_save(out_dir: str, n: int) -> int:
    """Run _KILLED_SAVER, SIGKILL it mid-save; the step it was writing."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, out_dir, str(n)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("MID-SAVE"), f"saver exited early (rc={proc.poll()})"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return int(line.split()[1])


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_save_killed_midway_is_ignored(where, tmp_path, request, capsys):
    # Locally the half save is `<step>.orbax-checkpoint-tmp` (renamed when done); on gs:// it is
    # `<step>/` without commit_success.txt (written last).
    out = request.getfixturevalue("gcs") + "/run" if where == "gcs" else str(tmp_path)
    n = 1 << 22
    killed = kill_mid_save(out, n)
    root = epath.Path(out) / "checkpoints"
    half = [p for p in root.iterdir() if p.name.startswith(str(killed))]
    assert len(half) == 1 and not ocp.path.step.is_path_finalized(half[0])
    assert (half[0].name != str(killed)) == (where == "local")

    assert inspect_checkpoint.main([out]) == 0
    table = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[2:]]
    assert table[-2:] == [[str(killed - 1), "complete"], [str(killed), "INCOMPLETE"]]

    expected = np.asarray(jax.random.normal(jax.random.key(0), (n,)) + (killed - 1))
    with checkpoint.Checkpointer(out, CheckpointConfig()) as ck:
        assert ck.latest_step() == killed - 1
        r = ck.restore({"w": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=ONE)})
        assert r.step == killed - 1
        np.testing.assert_array_equal(np.asarray(r.state["w"]), expected)
        save(ck, killed, {"w": jnp.zeros(n)})  # the resumed run writes that step again
    assert [p.name for p in root.iterdir() if p.name.startswith(str(killed))] == [str(killed)]
    assert ocp.path.step.is_path_finalized(root / str(killed))  # the half save was replaced


def damage_arrays(step_dir: Path, how: str) -> None:
    """Truncate to half, or delete, every array data file of a checkpoint's state."""
    data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        if how == "delete":
            p.unlink()
        else:
            os.truncate(p, p.stat().st_size // 2)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_latest_falls_back_with_warning(how, tmp_path, caplog):
    states = {s: train_state(seed=s) for s in (1, 2)}
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        for s, state in states.items():
            save(ck, s, state)
    damage_arrays(tmp_path / "checkpoints" / "2", how)
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        assert ck.latest_step() == 2  # complete on storage; the damage shows only when read
        with caplog.at_level(logging.WARNING, logger="nanojaxgpt.checkpoint"):
            r = ck.restore(abstract_of(states[1]))
        assert r.step == 1
        assert_bitwise_equal(r.state, states[1])
        warned = [m for m in caplog.messages if "unreadable" in m]
        assert len(warned) == 1 and str(tmp_path / "checkpoints" / "2") in warned[0]
        with pytest.raises(checkpoint.CheckpointError, match="cannot restore checkpoint .*2"):
            ck.restore(abstract_of(states[1]), step=2)
        save(ck, 2, states[2])  # the resumed run reaches step 2 again: the damaged one is replaced
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        assert_bitwise_equal(ck.restore(abstract_of(states[1])).state, states[2])
    for s in (1, 2):
        damage_arrays(tmp_path / "checkpoints" / str(s), how)
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
            ck.restore(abstract_of(states[1]))


def test_async_save_error_is_raised_by_next_save_and_wait(tmp_path):
    big = {"w": jax.random.normal(jax.random.key(0), (1 << 24,))}  # 64 MiB: a write of ~0.1 s+
    small = {"w": jnp.zeros(4)}
    ck = checkpoint.Checkpointer(str(tmp_path), CheckpointConfig())
    save(ck, 1, big)
    # While step 1 is written in the background, a non-empty `1/` appears: the final rename of
    # `1.orbax-checkpoint-tmp` onto it fails in the background thread.
    (tmp_path / "checkpoints" / "1").mkdir()
    (tmp_path / "checkpoints" / "1" / "blocker").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match=r"save of step 1 to .*checkpoints failed"):
        save(ck, 2, small)
    assert ck.latest_step() is None
    save(ck, 3, small)
    ck.wait()
    assert ck.latest_step() == 3
    save(ck, 4, big)
    (tmp_path / "checkpoints" / "4").mkdir()
    (tmp_path / "checkpoints" / "4" / "blocker").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="save of step 4"):
        ck.wait()
    ck.close()


def _join_new_threads(before: set[threading.Thread], timeout_s: float = 30.0) -> None:
    """Give the threads the test started until the deadline to end. Orbax's own thread class
    raises from join() where threading's returns: TimeoutError for one that waits on a signal of the
    abandoned save (it is left, as threading.Thread.join(timeout) leaves it), or the error that
    ended it (the abandoned save's own failure, which the test has already seen)."""
    deadline = time.monotonic() + timeout_s
    for t in set(threading.enumerate()) - before:
        if not t.daemon:
            try:
                t.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - see above
                pass


def test_stalled_bucket_times_out_naming_path_and_step(monkeypatch):
    before = set(threading.enumerate())
    server = GCSServer()  # our own server: the test freezes it
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        run = server.create_bucket("stalled-bucket") + "/run"
        ck = checkpoint.Checkpointer(run, CheckpointConfig(save_timeout_s=2.0))
        save(ck, 1, {"w": jax.random.normal(jax.random.key(0), (1 << 22,))})
        os.kill(server._proc.pid, signal.SIGSTOP)  # the storage stops answering mid-write
        t0 = time.monotonic()
        with pytest.raises(checkpoint.CheckpointTimeoutError,
                           match=r"step 1 to gs://stalled-bucket/run/checkpoints still running"):
            ck.wait()
        assert time.monotonic() - t0 < 10
        time.sleep(1.0)  # past Orbax's own limit on the background write (same 2 s, begun later)
        os.kill(server._proc.pid, signal.SIGCONT)
        # The abandoned save then fails; why is Orbax's own race (its 2 s commit timeout, or its
        # executor shut down first), so only the path, the step and the failure are held here.
        with pytest.raises(checkpoint.CheckpointError,
                           match="save of step 1 to gs://stalled-bucket/run/checkpoints failed: "):
            ck.wait(timeout_s=60)
        assert ck.latest_step() is None
        ck.close()
    finally:
        os.kill(server._proc.pid, signal.SIGCONT)
        _join_new_threads(before)  # Orbax's abandoned writers finish against the live server
        server.stop()


def test_gcs_round_trip_and_load_model(gcs):
    run = gcs + "/run"
    state = train_state()
    with checkpoint.Checkpointer(run, CheckpointConfig()) as ck:
        save(ck, 5, state)
    assert epath.Path(run, "checkpoints", "5", "commit_success.txt").exists()
    with checkpoint.Checkpointer(run, CheckpointConfig()) as ck:
        r = ck.restore(abstract_of(state))
    assert r.step == 5 and r.config == json.loads(CFG.to_json())
    assert_bitwise_equal(r.state, state)
    assert saved.read_config(run) == CFG
    model, cfg = saved.load_model(run, abstract=abstract_tiny)
    assert cfg == CFG
    assert isinstance(model, TinyNet) and model.n_layer == 2
    assert_bitwise_equal(eqx.filter(model, eqx.is_array), state["model"])


def test_read_config_and_load_model_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        saved.read_config(str(tmp_path / "missing"))
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoints"):
        saved.load_model(str(tmp_path), abstract=abstract_tiny)


def test_load_model_builds_the_real_gpt(tmp_path):
    from nanojaxgpt.model import GPT, abstract_model, is_param

    # Laid out with eval_shape and filled by numpy: building it eagerly compiles every init op.
    shapes, static = eqx.partition(abstract_model(CFG.model), is_param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), shapes,
                          is_leaf=is_param)
    model = eqx.combine(params, static)
    state = {"model": params, "opt_state": jax.jit(optax.adamw(1e-3).init)(params),
             "step": jnp.int32(1)}
    with checkpoint.Checkpointer(str(tmp_path), CheckpointConfig()) as ck:
        save(ck, 1, state)
    loaded, _ = saved.load_model(str(tmp_path))
    assert isinstance(loaded, GPT) and loaded.config == CFG.model
    assert_bitwise_equal(eqx.filter(loaded, eqx.is_array), params)
    assert all(x.sharding.device_set == {jax.devices()[0]}
               for x in jax.tree.leaves(eqx.filter(loaded, eqx.is_array)))
    idx = jnp.arange(CFG.model.block_size) % CFG.model.vocab_size
    forward = eqx.filter_jit(lambda m, i: m(i, inference=True))
    np.testing.assert_array_equal(np.asarray(forward(loaded, idx)), np.asarray(forward(model, idx)))
