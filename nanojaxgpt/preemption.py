"""Stop cleanly on SIGTERM (what TPU VMs and schedulers send before a kill) or Ctrl-C, with every
host agreeing on the step at which to stop.

The signal handler only sets a flag. `should_stop(step)` turns the flags of all hosts into one
answer that is the same everywhere, so that every host saves the same checkpoint step and leaves
the loop together (a host that stops alone would leave the others hanging in a collective):

    preemption = Preemption()            # after distributed.initialize()
    for step in range(start, max_iters):
        ...train step...
        if preemption.should_stop(step):
            save checkpoint at `step`, wait for it, exit 0

Cost per step. One process: reading a Python flag (~1 us). Several: each call dispatches a max
over one int per device (a 4-byte-per-device all-reduce across hosts) and reads the previous
call's result, which has normally finished by then, so the host keeps one step of lead over the
devices and the stop lands one step after a signal is seen. On TPU/GPU dispatch is asynchronous
(a jitted call, tens of microseconds) and the all-reduce takes microseconds. The CPU backend runs
the gloo all-reduce inside dispatch, still cheaper than a synchronous
multihost_utils.process_allgather (README: 'Measurements behind the code'), and cheap next to any real step, so it
runs every step.

Every host must create Preemption and call should_stop exactly once per step, at the same point
of its loop (both run a collective). A second Ctrl-C raises KeyboardInterrupt at once.
jax.distributed.initialize() installs its own SIGTERM notifier (for
multihost_utils.reached_preemption_sync_point); Preemption replaces it, so create it after.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)


def exit_during_startup(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Until Preemption() takes over at the first step, SIGTERM or Ctrl-C ends the process at once
    with exit code 0: nothing is trained yet, so nothing needs saving. The exit does not wait for
    the steps' compilation in their background threads. Call again after
    jax.distributed.initialize(), which installs its own SIGTERM handler."""

    def handle(signum: int, frame: FrameType | None) -> None:
        log.warning("received %s during start-up, before the first step: nothing to save; exiting",
                    signal.Signals(signum).name)
        logging.shutdown()
        os._exit(0)

    if threading.current_thread() is threading.main_thread():
        for s in signals:
            signal.signal(s, handle)


class Preemption:
    """Signal flag + cross-host agreement on the step to stop at. Use as a context manager or
    call close() to put the previous signal handlers back."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption() must be created in the main thread (Python delivers "
                               "signals only there)")
        self._received: int | None = None
        self._announced = False
        self._stop_step: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._process_count = jax.process_count()
        self._pending: jax.Array | None = None
        if self._process_count > 1:
            # One int per device on a 1-D mesh over every device of the job; the max is the answer.
            mesh = Mesh(np.array(jax.devices()), ("devices",))
            per_device = NamedSharding(mesh, PartitionSpec("devices"))
            n = len(jax.devices())
            self._flags = {v: jax.make_array_from_callback((n,), per_device,
                                                           lambda _, v=v: np.full((1,), v, np.int32))
                           for v in (0, 1)}  # built once: a step dispatches, never transfers
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
            self._pending = self._reduce(self._flags[0])  # compile now, not at the first step

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self._received = signum

    @property
    def requested(self) -> bool:
        """This process received a stop signal (the others may not have yet)."""
        return self._received is not None

    @property
    def stop_step(self) -> int | None:
        """The step at which should_stop first returned True."""
        return self._stop_step

    def should_stop(self, step: int) -> bool:
        """True at the same step on every host once any host has received SIGTERM or SIGINT."""
        if self._stop_step is not None:
            return True
        if self._received is not None and not self._announced:
            self._announced = True
            log.warning("received %s at step %d: stopping at the step all hosts agree on",
                        signal.Signals(self._received).name, step)
        if self._process_count == 1:
            decided = self._received is not None
        else:
            current = self._reduce(self._flags[int(self._received is not None)])
            # The previous call's answer: identical on every host, and finished by now unless the
            # devices are more than a step behind the host.
            decided = bool(self._pending.addressable_data(0))
            self._pending = current
        if decided:
            self._stop_step = step
            log.warning("stop requested: every host stops at step %d", step)
        return decided

    def close(self) -> None:
        """Put back the signal handlers that were installed before this object."""
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "Preemption":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
