"""Async Orbax checkpoints of a run, local or on gs://, restorable onto any mesh.

A run directory `out_dir` keeps its checkpoints in `out_dir/checkpoints/<step>/`, three items each:
`state` (the train state pytree: model, optimizer state, step, RNG key), `meta` (JSON: the
integrity record and whatever the caller adds) and `config` (the resolved config, JSON). The step
is the directory's name: the number of train steps done, so also the next batch to read.

Checkpoints live in their own subdirectory because Orbax's clean-up of half-written saves treats
every directory without a commit marker as one on gs://, and would delete a TensorBoard folder.

Leaves may be jax.Arrays of any sharding, typed PRNG keys (jax.random.key) or raw key data; Equinox
modules (their array leaves, e.g. eqx.filter(model, eqx.is_array)) and optax NamedTuple states
round-trip into the structure of the restore target.

Completeness is Orbax's: a local save is written to `<step>.orbax-checkpoint-tmp` and renamed
when done; on gs:// (no atomic rename) it is written in place and `commit_success.txt` is written
last. Half-written saves are invisible to `latest_step()` and removed when a Checkpointer starts.
Every process calls every method (multi-host); Orbax coordinates who writes what.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jaxtyping import PyTree

from nanojaxgpt import integrity, resume
from nanojaxgpt.config import CheckpointConfig, Config

log = logging.getLogger(__name__)

SUBDIR = "checkpoints"
ITEMS = ("state", "meta", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and the step."""


class CheckpointTimeoutError(CheckpointError):
    """An async save still running after `checkpoint.save_timeout_s`."""


class ArchitectureError(CheckpointError):
    """The run asks for another model architecture than its checkpoints hold."""


@dataclass(frozen=True)
class Restored:
    step: int
    state: PyTree
    meta: dict[str, Any]  # what the save was given as meta
    config: dict[str, Any]  # the run's resolved config at that save (Config.to_dict())


@dataclass
class _Pending:
    """A save in flight, and what its one log line reports once it completes."""

    step: int
    path: epath.Path
    nbytes: int
    started: float  # time.monotonic() when the save began
    blocked_s: float | None = None  # how long save() held the training step
    written_s: float | None = None  # start to complete on storage
    logged: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, *, blocked_s: float | None = None, written_s: float | None = None) -> None:
        with self.lock:
            self.blocked_s = self.blocked_s if blocked_s is None else blocked_s
            self.written_s = self.written_s if written_s is None else written_s
            if self.logged or self.blocked_s is None or self.written_s is None:
                return
            self.logged = True
        log.info("checkpoint of step %d: %s, blocked the step %.2f s, written in %.2f s (%s)",
                 self.step, _human_bytes(self.nbytes), self.blocked_s, self.written_s, self.path)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


_FULL = {errno.ENOSPC: "the disk is full (no space left on device)",
         errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "a file grew past the size limit"}
_FULL_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
              "File too large": errno.EFBIG}


def _storage_full(e: BaseException) -> str | None:
    """Why a write failed for lack of space, from the error chain (tensorstore reports errno
    only in its message), or None when it failed for another reason."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return _FULL[e.errno]
        for text, code in _FULL_TEXT.items():
            if text in str(e):
                return _FULL[code]
        e = e.__cause__ or e.__context__
    return None


def checkpoint_dir(run_dir: str) -> epath.Path:
    return epath.Path(run_dir) / SUBDIR


def _as_abstract(tree: PyTree) -> PyTree:
    """Every leaf as a ShapeDtypeStruct that carries the sharding to restore into."""

    def leaf(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            return x
        raise TypeError(f"restore target {jax.tree_util.keystr(path)} is {x!r}; give a "
                        "jax.ShapeDtypeStruct with .sharding (a NamedSharding of the current mesh)")

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _all_processes_ok(ok: bool) -> bool:
    """True only where every process succeeded, so hosts never continue from different steps."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


class Checkpointer:
    """Async, keep-N checkpoints of one run; see the module docstring for the layout."""

    def __init__(self, out_dir: str, cfg: CheckpointConfig) -> None:
        self.out_dir = out_dir
        self.directory = checkpoint_dir(out_dir)
        self._cfg = cfg
        self._pending: _Pending | None = None
        self._unreadable: set[int] = set()  # steps restore() skipped: a save may replace them
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(cfg.keep_checkpoints),
            cleanup_tmp_directories=True,  # a save killed half-way is removed, never resumed from
            enable_async_checkpointing=True,
            # Orbax's own limit on the background write; wait() also enforces it on the whole save.
            async_options=ocp.AsyncOptions(timeout_secs=max(1, math.ceil(cfg.save_timeout_s))),
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self._cfg.checkpoint_interval == 0

    def latest_step(self) -> int | None:
        """The latest complete checkpoint (a save still in flight does not count)."""
        self._settle(block=False)
        steps = [s for s in self._mngr.all_steps()
                 if self._pending is None or s != self._pending.step]
        return max(steps) if steps else None

    def save(self, step: int, state: PyTree, config: Config, *,
             meta: dict[str, Any] | None = None) -> None:
        """Start an async save of `step` (the caller decides when: should_save, the end, a stop),
        with the run's resolved config beside it; returns once the arrays are copied off the
        devices. `meta`: anything else JSON-serialisable to keep with it.

        The metadata records a digest of every array (nanojaxgpt/integrity.py), for restore to
        check. Raises the error of a previous save that failed or ran past save_timeout_s.
        """
        self._settle(block=False)
        if step in self._mngr.all_steps():
            if step not in self._unreadable:
                log.info("checkpoint of step %d already in %s", step, self.directory)
                return
            log.warning("replacing the unusable checkpoint %s", self.directory / str(step))
            self._mngr.delete(step)
            self._unreadable.discard(step)
        config, meta = config.to_dict(), dict(meta or {})
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"meta for step {step} must be JSON-serialisable "
                             f"(ints, floats, strings, lists, dicts): {e}") from None
        self._settle(block=True)  # Orbax keeps one save in flight: finish the last one first
        started = time.monotonic()
        digests = integrity.compute(state)  # waits for the state, as the copy below would
        if digests.nonfinite:
            log.warning("the state of step %d holds non-finite values (%s); a resume will skip "
                        "this checkpoint", step, ", ".join(digests.nonfinite[:3]))
        meta[integrity.KEY] = integrity.record(digests, meta, config)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                  config=ocp.args.JsonSave(config))
        pending = _Pending(step, self.directory / str(step), started=started,
                           nbytes=sum(int(x.nbytes) for x in jax.tree.leaves(state)))
        try:
            self._mngr.save(step, args=args, force=True)  # force: the caller decided
        except Exception as e:
            raise CheckpointError(self._save_failed(step, e, "")) from e
        self._pending = pending
        pending.report(blocked_s=time.monotonic() - started)
        threading.Thread(target=self._watch, args=(pending,), daemon=True,
                         name=f"checkpoint-{step}-watch").start()

    def _watch(self, pending: _Pending) -> None:
        """Log the save's line as soon as it is complete, not when the run next looks."""
        while self._mngr.is_saving_in_progress():
            time.sleep(0.05)
            if self._pending is not pending:
                return
        if ocp.path.step.is_path_finalized(pending.path):
            pending.report(written_s=time.monotonic() - pending.started)

    def _save_failed(self, step: int, e: BaseException, kind: str) -> str:
        full = _storage_full(e)
        if full is None:
            return (f"{kind}save of step {step} to {self.directory} failed: "
                    f"{type(e).__name__}: {e}")
        kept = sorted(self._mngr.all_steps())
        return (f"saving step {step} to {self.directory} failed: {full}; the previous "
                f"checkpoints are kept ({', '.join(map(str, kept)) or 'none'}): free space there "
                "and run the same command to resume")

    def wait(self, timeout_s: int | float | None = None) -> None:
        """Block until the pending save is complete; raise its error or a timeout.

        The limit is checkpoint.save_timeout_s from the start of the save, or `timeout_s` from now.
        """
        self._settle(block=True, timeout_s=timeout_s)

    def close(self) -> None:
        self.wait()
        self._mngr.close()

    def _settle(self, block: bool, timeout_s: int | float | None = None) -> None:
        pending = self._pending
        if pending is None:
            return
        deadline = (pending.started + self._cfg.save_timeout_s if timeout_s is None
                    else time.monotonic() + timeout_s)
        while self._mngr.is_saving_in_progress():
            now = time.monotonic()
            if now >= deadline:
                raise CheckpointTimeoutError(
                    f"checkpoint save of step {pending.step} to {self.directory} still running "
                    f"{now - pending.started:.1f} s after it began (checkpoint.save_timeout_s="
                    f"{self._cfg.save_timeout_s:g}): the storage "
                    "is stalled or too slow; raise the timeout or check the bucket")
            if not block:
                return
            time.sleep(min(0.02, deadline - now))
        self._pending = None
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise CheckpointError(self._save_failed(pending.step, e, "async checkpoint ")) from e
        pending.report(written_s=time.monotonic() - pending.started)  # if the watcher has not

    def restore(self, abstract_state: PyTree, step: int | None = None, *,
                expect: Config | None = None) -> Restored:
        """The state of `step` (default: the latest complete one) in abstract_state's shardings.

        Each checkpoint is checked against the digests saved with it, and for non-finite values.
        With step=None a damaged or unreadable checkpoint is skipped, with one warning, for the
        one before. With `expect` (this run's config) a checkpoint of another model architecture
        is an ArchitectureError that names the differing keys.
        """
        self.wait()
        self._mngr.reload()  # another process (a previous run) may have written since we started
        abstract = _as_abstract(abstract_state)
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no complete checkpoint of step {step} in "
                                      f"{self.directory}; complete ones: {sorted(steps)}")
            try:
                return self._restore_step(abstract, step, expect)
            except ArchitectureError:
                raise
            except Exception as e:
                raise CheckpointError(f"cannot restore checkpoint {self.directory / str(step)}: "
                                      f"{_reason(e)}") from e
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        failures = []
        for s in steps:
            restored, error = None, None
            try:
                restored = self._restore_step(abstract, s, expect)
            except ArchitectureError:
                raise  # every checkpoint of the run holds the same architecture
            except Exception as e:  # a damaged or unreadable checkpoint: try the one before
                error = e
            if _all_processes_ok(error is None):
                return restored
            reason = _reason(error) if error else "failed on another process"
            failures.append(f"step {s}: {reason}")
            self._unreadable.add(s)
            log.warning("checkpoint %s is damaged, resuming from the one before it: %s",
                        self.directory / str(s), reason)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures))

    def _restore_step(self, abstract: PyTree, step: int, expect: Config | None) -> Restored:
        # The JSON items first: a bad record or another architecture stops before any array read.
        out = self._mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        meta, config = dict(out.meta), dict(out.config)
        rec = meta.pop(integrity.KEY, None)
        if rec is not None:
            _raise_if(integrity.check_json(rec, meta, config))
        if expect is not None:
            diff = resume.architecture_diff(config, expect)
            if diff:
                raise ArchitectureError(resume.architecture_message(self.out_dir, diff))
        state = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
        if rec is None:
            log.warning("checkpoint %s has no digests (written before they were recorded); "
                        "restored without an integrity check", self.directory / str(step))
        else:
            _raise_if(integrity.check_arrays(rec, integrity.compute(state)))
        return Restored(step=step, state=state, meta=meta, config=config)


class _Damaged(Exception):
    """A checkpoint whose content does not match what was saved."""


def _raise_if(reason: str | None) -> None:
    if reason is not None:
        raise _Damaged(reason)


def _reason(e: BaseException) -> str:
    """Why a checkpoint cannot be used, in one short line."""
    if isinstance(e, _Damaged):
        return f"failed its integrity check: {e}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"unreadable: {type(e).__name__}: {first[:300]}"
