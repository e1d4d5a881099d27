"""A JAX profiler trace of a few steady-state training steps, where TensorBoard's profile tab looks.

    --train.profile_start=N --train.profile_steps=K    trace steps N .. N+K-1 of this run

The trace lands in `out_dir/plugins/profile/<time>/<host>.xplane.pb` (and a Perfetto-readable
`.trace.json.gz`): `tensorboard --logdir OUT_DIR` lists it under Profile (with
`pip install tensorboard-plugin-profile`). For a gs:// out_dir the trace is written to a local
folder and uploaded once it is complete. Process 0 traces; `--train.profile_all_hosts=true` traces
every host (each writes its own file into the same run folder).

A trace that starts at a run's first step would hold the compilation, so it must start later than
that (a resumed run that is already past N records nothing and says so).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import jax

from nanojaxgpt import storage

log = logging.getLogger(__name__)


class Profiler:
    """Call `before_step(step, state)` before dispatching each step, with the state the previous
    step returned: the profiler waits for it at the trace's ends, so the trace holds the device
    work of every traced step and nothing else."""

    def __init__(self, out_dir: str, start: int, steps: int, *, first_step: int, enabled: bool):
        self.start, self.stop = start, start + steps
        self.out_dir = out_dir
        self._local: str | None = None
        self.enabled = enabled and start >= 0 and steps > 0
        if self.enabled and start <= first_step:
            log.warning("no profile: train.profile_start=%d is not after this run's first step %d "
                        "(which compiles); choose a later step", start, first_step)
            self.enabled = False

    def before_step(self, step: int, state: Any) -> None:
        if not self.enabled:
            return
        if step == self.start:
            jax.block_until_ready(state)  # the trace begins with the device idle
            self._local = (os.path.abspath(self.out_dir) if not storage.is_gcs(self.out_dir)
                           else tempfile.mkdtemp(prefix="nanojaxgpt-profile-"))
            jax.profiler.start_trace(self._local)
            log.info("profiling steps %d-%d", self.start, self.stop - 1)
        elif step == self.stop:
            self.finish(state)

    def finish(self, state: Any) -> None:
        """Stop a trace in progress (at its last step, or when the loop ends before it)."""
        if self._local is None:
            return
        jax.block_until_ready(state)
        started = time.monotonic()
        jax.profiler.stop_trace()
        local, self._local = self._local, None
        self.enabled = False
        if storage.is_gcs(self.out_dir):
            names = [os.path.relpath(os.path.join(root, f), local)
                     for root, _, files in os.walk(local) for f in files]
            storage.upload(local, self.out_dir, names)  # keeps the plugins/profile/... layout
            shutil.rmtree(local, ignore_errors=True)
        log.info("profile of steps %d-%d written to %s (%.1f s)", self.start, self.stop - 1,
                 storage.join(self.out_dir, "plugins/profile"), time.monotonic() - started)
