"""Train a GPT: `python -m nanojaxgpt.train CONFIG.toml [--key=value ...]`.

config -> distributed init -> mesh -> data -> sharded state -> restore -> loop (step, log, eval,
checkpoint). Every host runs this same program; process 0 alone writes logs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import equinox as eqx
import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jaxtyping import PyTree

from nanojaxgpt import batches, checkpoint, completion, config, data, distributed, hellaswag, metrics
from nanojaxgpt import optim, sharding, storage
from nanojaxgpt import model as gpt
from nanojaxgpt import compile_cache, failfast, program, resume, runlock, saved
from nanojaxgpt.cli import hard_exit, one_line, run_command
from nanojaxgpt.feed import Feed
from nanojaxgpt.preemption import Preemption, exit_during_startup
from nanojaxgpt.profile import Profiler
from nanojaxgpt.progress import Progress, peak_flops_per_device
from nanojaxgpt.state import TrainSetup
from nanojaxgpt.step import State, Steps, compile_ahead

log = logging.getLogger("nanojaxgpt.train")

# Steps of batches read ahead of training: a gs:// read waits on the network, so more are in flight.
LOCAL_FEED_DEPTH, REMOTE_FEED_DEPTH = 4, 8


def model_origin(cfg: config.Config, meta: data.Meta, *, resuming: bool
                 ) -> tuple[config.Config, gpt.GPT | None]:
    """Where the run's model comes from: its config, and the pretrained model to start from.

    - init_from="scratch": the config's architecture, with the vocabulary of the prepared data;
    - a fine-tuning run that resumes: the architecture in its own checkpoint;
    - a fine-tuning run that starts: the pretrained model's architecture, as nanoGPT does (the
      config file's is ignored), and that model's weights.
    The config's run-time fields (ModelConfig.RUNTIME_FIELDS) apply in every case.
    """
    pretrained = None
    if cfg.train.init_from == "scratch":
        if cfg.model.vocab_size != meta.vocab_size:
            log.info("vocab_size %d from %s/meta.json (config said %d)", meta.vocab_size,
                     cfg.data.data_dir, cfg.model.vocab_size)
            cfg = config.replace(cfg, {"model.vocab_size": meta.vocab_size})
        return cfg, None
    if resuming:
        arch = saved.read_config(cfg.train.out_dir).model
    else:
        from nanojaxgpt import hf

        pretrained = hf.load(cfg.train.init_from, **cfg.model.runtime())
        arch = pretrained.config
    model = dataclasses.replace(arch, **cfg.model.runtime())
    if model != cfg.model:
        log.info("model architecture from %s: n_layer=%d n_head=%d n_embd=%d block_size=%d "
                 "vocab_size=%d", cfg.train.init_from, model.n_layer, model.n_head, model.n_embd,
                 model.block_size, model.vocab_size)
    if meta.vocab_size > model.vocab_size:
        raise config.ConfigError(
            f"{cfg.data.data_dir} has {meta.vocab_size} token ids but the model "
            f"({cfg.train.init_from}) only {model.vocab_size}: prepare the data with the "
            "model's tokenizer")
    return dataclasses.replace(cfg, model=model), pretrained


def _first_state(cfg: config.Config, setup: TrainSetup, ckpt: checkpoint.Checkpointer,
                 pretrained: gpt.GPT | None) -> tuple[State, batches.Origin]:
    """The state the loop starts from, and its step and data position: the latest good checkpoint
    if there is one, else the pretrained weights, else a fresh initialisation."""
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(setup.abstract, expect=cfg)  # another architecture: one-line error
        origin = batches.Origin(restored.step, _samples_read(restored))
        log.info("resumed from step %d (%s; %d training windows read)", origin.step,
                 cfg.train.out_dir, origin.sample)
        for change in resume.changes(restored.config, cfg):
            log.info("changed since the checkpoint: %s", change)
        return restored.state, origin
    if pretrained is not None:
        log.info("initialised from %s", cfg.train.init_from)
        return setup.from_params(eqx.filter(pretrained, eqx.is_array), cfg), batches.Origin()
    return setup.init(cfg), batches.Origin()


SAMPLES = "samples"  # checkpoint meta: how many training windows the run had read


def _samples_read(restored: checkpoint.Restored) -> int:
    """The data position saved with a checkpoint; one saved without it had read the same number
    of windows at every step (its own batch_size x gradient_accumulation_steps)."""
    if SAMPLES in restored.meta:
        return int(restored.meta[SAMPLES])
    t = restored.config["train"]
    return restored.step * t["batch_size"] * t["gradient_accumulation_steps"]


def _eval_tokens(cfg: config.Config, meta: data.Meta, split: str, shape: tuple[int, int, int],
                 batch_sh: NamedSharding) -> jax.Array:
    """The fixed evaluation set of a split (batches.eval_set): `shape` = eval_iters batches of
    batch_size windows."""
    t = cfg.train
    windows = batches.eval_set(cfg.data.data_dir, split, block_size=cfg.model.block_size,
                               batch_size=t.batch_size, eval_iters=t.eval_iters, seed=t.seed,
                               sampling=cfg.data.sampling, meta=meta,
                               read_timeout_s=cfg.data.read_timeout_s)
    return sharding.host_local_array(shape, batch_sh, lambda rows: windows.read(0, rows))


class Diverged(RuntimeError):
    """The loss or the gradient norm is not finite: the run stops before it saves a bad state."""

    exit_code = 1


def _check_finite(step: int, values: dict[str, float], ckpt: checkpoint.Checkpointer) -> None:
    """Raise Diverged unless the loss and gradient norm of `step` are finite.

    A finite gradient norm at step s means the update of step s was finite, so the state after it
    (the one a checkpoint of step s + 1 would hold) is finite too.
    """
    bad = {k: values[k] for k in ("loss", "grad_norm") if not np.isfinite(values[k])}
    if not bad:
        return
    ckpt.wait()  # the last good save, if one is in flight, completes
    last = ckpt.latest_step()
    saved = (f"the last checkpoint is step {last} in {ckpt.directory}" if last is not None
             else "no checkpoint was written")
    raise Diverged(f"step {step}: " + ", ".join(f"{k} is {v}" for k, v in bad.items())
                   + f"; the run diverged and stopped without saving; {saved}. To continue, run the "
                   "same command with a lower --learning_rate (README: 'When a run diverges')")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    exit_during_startup()
    path = argv[0] if argv and not argv[0].startswith("--") else None
    cfg = config.load(path, argv[1:] if path else argv)
    if not cfg.train.eval_only and completion.is_complete(cfg.train.out_dir, cfg.train.max_iters):
        # Every host reads the same marker, so all of them stop here, before joining the others.
        print(f"{cfg.train.out_dir} is complete (step {completion.done_step(cfg.train.out_dir)} "
              f">= max_iters {cfg.train.max_iters}); nothing to do", file=sys.stderr)
        return 0

    compile_cache.enable(cfg.train.compilation_cache_dir, cfg.train.out_dir)  # before any compile
    topo = distributed.initialize(cfg.distributed)
    exit_during_startup()  # jax.distributed installs its own SIGTERM handler
    distributed.setup_logging(topo)
    failfast.watch()  # another host's error stops this one within seconds
    mesh = sharding.make_mesh(cfg.mesh)
    program.check(cfg, mesh)  # before the run lock: a bad batch size touches nothing
    meta = data.read_meta(cfg.data.data_dir)
    if not storage.bucket_exists(cfg.train.out_dir):  # every host stops here, before any collective
        raise config.ConfigError(
            f"out_dir {cfg.train.out_dir}: bucket gs://{storage.GCSPath.parse(cfg.train.out_dir).bucket} "
            "does not exist; create it (gcloud storage buckets create gs://BUCKET) or fix --out_dir")
    # Before anything writes there: a second run must not clean up this run's in-flight save.
    with runlock.acquire(cfg.train.out_dir, cfg.checkpoint.lock_stale_s) as lock:
        return _run(cfg, topo, mesh, meta, lock)  # released on every way out, errors too


def _run(cfg: config.Config, topo: distributed.Topology, mesh: Mesh, meta: data.Meta,
         lock: runlock.RunLock) -> int:
    """Everything after the run lock is held: model, state, evaluation, the loop."""
    ckpt = checkpoint.Checkpointer(cfg.train.out_dir, cfg.checkpoint)
    cfg, pretrained = model_origin(cfg, meta, resuming=ckpt.latest_step() is not None)
    t, m = cfg.train, cfg.model
    log.info("config:\n%s", config.to_toml_like(cfg))
    rows = t.batch_size * t.gradient_accumulation_steps
    log.info("%d processes, %d devices, mesh %s; %d tokens per step (%d x %d x %d)",
             topo.process_count, topo.global_device_count, dict(mesh.shape),
             rows * m.block_size, t.gradient_accumulation_steps, t.batch_size, m.block_size)
    for line in optim.decay_counts(gpt.abstract_model(m)).lines():  # nanoGPT's two lines
        log.info(line)

    prog = program.build(cfg, mesh)  # the same steps tools/aot_compile.py checks ahead of time
    hellaswag_scores = hellaswag.for_training(cfg, prog.setup.static, mesh, meta.tokenizer)
    # Both steps compile in the background while the state is created or restored.
    steps = compile_ahead(prog.steps, prog.abstract, None if t.eval_only else prog.batch,
                          prog.eval_batch)
    state, origin = _first_state(cfg, prog.setup, ckpt, pretrained)
    start = origin.step
    if topo.process_index == 0:
        out = epath.Path(t.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())  # the resolved config, beside the checkpoints
    tb = metrics.Metrics(t.out_dir, enabled=topo.process_index == 0, resume_step=start)
    evaluate = _Evaluation(cfg, meta, prog, steps, tb, hellaswag_scores)
    if t.eval_only:  # nanoGPT's eval_only: evaluate the restored (or initial) model and stop
        evaluate(start, state["model"])
        ckpt.close()
        tb.close()
        return 0

    train_set = batches.Batches(cfg.data.data_dir, "train", block_size=m.block_size, rows=rows,
                                seed=t.seed, sampling=cfg.data.sampling, origin=origin, meta=meta,
                                read_timeout_s=cfg.data.read_timeout_s)
    if cfg.data.sampling == "epoch":
        log.info("data: an epoch is %d windows of %d tokens, %.1f steps; step %d starts epoch %d",
                 train_set.n_windows, train_set.window, train_set.n_windows / rows, start,
                 train_set.consumed(start) // train_set.n_windows)

    def global_batch(step: int) -> jax.Array:
        return sharding.host_local_array(prog.batch.shape, prog.batch_sharding,
                                         lambda r: train_set.read(step, r))

    remote = storage.is_gcs(cfg.data.data_dir)
    feed = Feed(global_batch, start=start, stop=t.max_iters,
                depth=REMOTE_FEED_DEPTH if remote else LOCAL_FEED_DEPTH, threads=4 if remote else 2)
    progress = Progress(start=start, max_iters=t.max_iters, tokens_per_step=rows * m.block_size,
                        flops_per_token=gpt.flops_per_token(m), n_devices=topo.global_device_count,
                        peak=peak_flops_per_device(jax.devices()[0]))
    try:
        finished = _loop(cfg, topo, steps, state, start, feed=feed, evaluate=evaluate,
                         progress=progress, ckpt=ckpt, lock=lock, tb=tb,
                         samples_read=train_set.consumed)
    except Diverged:
        tb.close()  # the points up to the divergence stay in TensorBoard
        ckpt.close()
        raise
    finally:
        feed.close()
    ckpt.close()
    tb.close()
    if finished and topo.process_index == 0:  # after the final checkpoint is committed
        completion.mark(t.out_dir, t.max_iters)
        log.info("run complete: wrote %s", completion.path(t.out_dir))
    return 0


class _Evaluation:
    """The loss on the fixed evaluation sets (and HellaSwag when on), logged at a step."""

    def __init__(self, cfg: config.Config, meta: data.Meta, prog: program.Program, steps: Steps,
                 tb: metrics.Metrics, hellaswag_scores: Callable[[int, PyTree], dict[str, float]]):
        self._sets = {split: _eval_tokens(cfg, meta, split, prog.eval_batch.shape,
                                          prog.batch_sharding) for split in ("train", "val")}
        self._steps, self._tb, self._hellaswag = steps, tb, hellaswag_scores

    def __call__(self, step: int, params: PyTree) -> None:
        losses = {s: float(self._steps.evaluate(params, toks)) for s, toks in self._sets.items()}
        log.info("step %d: train loss %.4f, val loss %.4f", step, losses["train"], losses["val"])
        self._tb.scalars(step, {"val/loss": losses["val"], "eval/train_loss": losses["train"],
                                **self._hellaswag(step, params)})


def _fetch(out: dict[str, jax.Array]) -> dict[str, float]:
    """A step's metrics on the host (waits for that step)."""
    return {k: float(v) for k, v in jax.device_get(out).items()}


def _loop(cfg: config.Config, topo: distributed.Topology, steps: Steps, state: State, start: int,
          *, feed: Feed, evaluate: _Evaluation, progress: Progress, ckpt: checkpoint.Checkpointer,
          lock: runlock.RunLock, tb: metrics.Metrics, samples_read: Callable[[int], int]) -> bool:
    """Train from step `start` to max_iters: evaluate, step, log, check, save. True when it got
    there; False when a stop signal ended it (after a complete checkpoint of the step reached)."""
    t = cfg.train
    cache_dir = compile_cache.directory(t.compilation_cache_dir, t.out_dir)
    profiler = Profiler(t.out_dir, t.profile_start, t.profile_steps, first_step=start,
                        enabled=t.profile_all_hosts or topo.process_index == 0)
    preemption = Preemption()  # from here on a stop signal saves the step every host agrees on
    logged = None  # (step, metrics) of a log step, read once the next step is queued behind it
    finished = False
    try:
        for step in range(start, t.max_iters):
            if step % t.eval_interval == 0:
                evaluate(step, state["model"])
            profiler.before_step(step, state)
            state, out = steps.train(state, feed.get(step))
            if step == start and cache_dir is not None:  # every step is compiled by now
                log.info("compilation cache %s: %d compiles loaded from it, %.1f s of compiling "
                         "saved", cache_dir, *compile_cache.served())
            done = step + 1
            if logged is not None:  # one step late: the host never waits on the step it queued
                _report(*logged, progress, ckpt, tb)
                logged = None
            stop = preemption.should_stop(done) and done < t.max_iters
            save = ckpt.should_save(done) or done == t.max_iters or stop
            if step % t.log_interval == 0 or done == t.max_iters:
                logged = (step, out)
            if save:  # the save waits for this step's state anyway: check it is finite first
                if logged is None:
                    _check_finite(step, _fetch(out), ckpt)
                else:
                    _report(*logged, progress, ckpt, tb)
                    logged = None
                lock.refresh()  # stops here, on every host, if another run took out_dir over
                ckpt.save(done, state, cfg, meta={SAMPLES: samples_read(done)})
                tb.flush(wait=True)  # logs are durable up to every checkpoint: a resume leaves no gap
            if stop:
                ckpt.wait()
                log.warning("preempted: saved a complete checkpoint of step %d in %s; run the same "
                            "command to resume", done, t.out_dir)
                break
        else:
            if t.max_iters % t.eval_interval == 0:
                evaluate(t.max_iters, state["model"])
            finished = True
    finally:
        preemption.close()
    profiler.finish(state)
    ckpt.wait()
    return finished


def _report(step: int, out: dict[str, jax.Array], progress: Progress,
            ckpt: checkpoint.Checkpointer, tb: metrics.Metrics) -> None:
    """Read the metrics of `step` (waiting for it), stop on a divergence, log them."""
    vals = _fetch(out)
    _check_finite(step, vals, ckpt)
    values = progress.values(step, vals)
    tb.scalars(step, values)
    log.info(progress.line(step, values))


def _main_telling_the_others(argv: list[str]) -> int:
    try:
        return main(argv)
    except Exception as e:  # any error, expected or not: the other hosts stop too
        failfast.stop_if_another_failed()  # or this one is the consequence of another's
        failfast.report(one_line(e))
        raise


def cli(argv: list[str] | None = None, exit: Callable[[int], NoReturn] = sys.exit) -> NoReturn:  # noqa: A002
    run_command(_main_telling_the_others, argv,
                errors=(config.ConfigError, data.DataError, distributed.DistributedError,
                        checkpoint.CheckpointError, metrics.MetricsError, Diverged),
                exit=exit)


if __name__ == "__main__":
    # hard_exit: an error must not wait for a compile, a stalled write in a worker thread, or
    # JAX's shutdown barrier (an unexpected error prints its traceback, then exits 1).
    try:
        cli(exit=hard_exit)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        hard_exit(1)
