"""One run per out_dir: a second run on a directory that a live run uses refuses to start, and a
run that died (SIGKILL, preemption, a lost host) never blocks the next one.

The lock is `out_dir/run.lock`, holding its owner (host, pid, start time) for the message.
  - Local: an exclusive flock on that file. The kernel drops it when the process dies, so a dead
    run's file is simply locked again; on NFS the server's lease does the same for a lost host.
  - gs:// (no file locks): an object created only if absent, refreshed by its holder, taken over
    once stale (`checkpoint.lock_stale_s`); see nanojaxgpt/gcslock.py.
Multi-host: process 0 alone takes the lock; every process learns the outcome from it (one
broadcast), so all hosts start or refuse together. Every process calls acquire() and refresh();
release() is a no-op but on process 0, and runs at interpreter exit if the caller did not.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

import jax
import numpy as np

from nanojaxgpt import storage
from nanojaxgpt.config import ConfigError

if TYPE_CHECKING:
    from nanojaxgpt.gcslock import GCSLock

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_MESSAGE_BYTES = 1024  # the refusal as process 0 words it, broadcast to every process


class RunLockError(ConfigError):
    """out_dir is in use by another run; the message names it and says what to do."""


class RunLockLostError(RunLockError):
    """Another run took over this run's lock: this run must stop writing to out_dir."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _machine() -> str:
    """Equal for two processes exactly when their pids can be compared: same hostname, same boot
    and same pid namespace (containers on one host share the hostname but not their pids)."""
    boot = (_read("/proc/sys/kernel/random/boot_id") or "").strip()
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}|{boot}|{pidns}"


def _pid_start(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot: a reused pid has another one."""
    stat = _read(f"/proc/{pid}/stat")
    return int(stat.rpartition(")")[2].split()[19]) if stat else None


@dataclasses.dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float  # Unix time
    machine: str  # see _machine()
    pid_start: int | None
    token: str  # unique per lock holder

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, time.time(), _machine(), _pid_start(pid),
                   uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str | bytes | None) -> Owner | None:
        try:
            return cls(**json.loads(text)["owner"])
        except (TypeError, ValueError, KeyError):
            return None  # empty, half-written or foreign: its age alone decides

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
        return f"host {self.host}, pid {self.pid}, started {started:%Y-%m-%d %H:%M:%S} UTC"

    def alive(self) -> bool | None:
        """Whether the owner process exists; None where this machine cannot tell."""
        if self.machine != _machine():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        return self.pid_start is None or _pid_start(self.pid) in (None, self.pid_start)


def describe(owner: Owner | None) -> str:
    return owner.describe() if owner else "owner unknown"


def in_use_error(out_dir: str, owner: Owner | None, detail: str = "") -> RunLockError:
    return RunLockError(f"out_dir {out_dir} is in use by another run ({describe(owner)}{detail});"
                        " wait for it to end or stop it, or choose another --out_dir")


class LocalLock:
    """flock on out_dir/run.lock; raises RunLockError when another process holds it."""

    def __init__(self, out_dir: str, owner: Owner | None = None) -> None:
        self.owner = owner or Owner.current()
        self.path = os.path.join(out_dir, LOCK_NAME)
        os.makedirs(out_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Owner.parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise in_use_error(out_dir, holder) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (and deleted) the file after we opened it
        self._fd: int | None = fd
        previous = Owner.parse(os.pread(fd, 1 << 16, 0))
        if previous:
            log.info("%s: the previous run (%s) ended without releasing its lock; taking it",
                     self.path, previous.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"owner": dataclasses.asdict(self.owner)}).encode(), 0)

    def refresh(self) -> None:
        """RunLockLostError when the file is no longer the one locked (out_dir was removed)."""
        try:
            same = self._fd is not None and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise RunLockLostError(f"{self.path} was removed or replaced while this run held it: "
                                   "stopping without writing more to the directory")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.refresh()
            os.unlink(self.path)  # still locked: no other run can hold this inode meanwhile
        except (RunLockLostError, OSError):
            pass
        os.close(self._fd)
        self._fd = None


def _agree(error: str | None) -> str | None:
    """Process 0's error (None: success) on every process: all hosts start or stop together."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    encoded = (error or "").encode()[:_MESSAGE_BYTES]
    text = np.zeros(_MESSAGE_BYTES, np.uint8)
    text[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    out = multihost_utils.broadcast_one_to_all(
        {"failed": np.array([error is not None], np.int32), "text": text})
    if not out["failed"][0]:
        return None
    return bytes(out["text"]).rstrip(b"\0").decode(errors="ignore")


class RunLock:
    """This run's hold on out_dir, on every process (the lock itself lives on process 0)."""

    def __init__(self, out_dir: str, held: LocalLock | GCSLock | None) -> None:
        self.out_dir = out_dir
        self._held = held

    @property
    def owner(self) -> Owner | None:
        return self._held.owner if self._held else None

    def refresh(self) -> None:
        """Call on every process before writing a checkpoint: RunLockLostError on all of them
        when another run has taken the lock over. A transient storage error only warns."""
        error = None
        if self._held is not None:
            try:
                self._held.refresh()
            except RunLockLostError as e:
                error = str(e)
            except Exception as e:
                log.warning("could not refresh the lock of %s (%s: %s); the heartbeat retries",
                            self.out_dir, type(e).__name__, e)
        error = _agree(error)
        if error:
            raise RunLockLostError(error)

    def release(self) -> None:
        """Let the next run have out_dir (no collective: safe to call from one process)."""
        if self._held is not None:
            atexit.unregister(self.release)
            self._held.release()
            self._held = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(out_dir: str, stale_s: float) -> RunLock:
    """Lock out_dir for this run, on every process together; RunLockError (on all of them) when a
    live run holds it. Waits up to `stale_s` on gs:// when the holder might be gone."""
    held, error = None, None
    if jax.process_index() == 0:
        try:
            if storage.is_gcs(out_dir):
                from nanojaxgpt.gcslock import GCSLock  # google-cloud-storage on gs:// use only

                held = GCSLock(out_dir, stale_s)
            else:
                held = LocalLock(out_dir)
        except RunLockError as e:
            error = str(e)
        except Exception as e:  # storage refused: say so on every host instead of hanging them
            reason = str(e).splitlines()[0] if str(e) else ""
            error = (f"cannot lock out_dir {out_dir} ({type(e).__name__}: {reason}); check that "
                     "it exists and that this machine may write to it")
    error = _agree(error)
    if error:
        raise RunLockError(error)
    lock = RunLock(out_dir, held)
    if held is not None:
        atexit.register(lock.release)  # also on an error or sys.exit, after Orbax's writers end
        log.info("locked %s for this run (%s)", storage.join(out_dir, LOCK_NAME),
                 held.owner.describe())
    return lock
