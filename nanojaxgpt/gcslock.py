"""The gs:// run lock: GCS has no file locks, so the lock is an object whose generation decides.

  - acquire: create `out_dir/run.lock` only if absent (ifGenerationMatch=0).
  - refresh: rewrite it with this run's generation as precondition, from a heartbeat thread
    (HEARTBEATS_PER_STALE times per stale period) and at every checkpoint. A 412 means another
    run took it over: this run is told, and stops before its next checkpoint.
  - take over: a holder that is a live process of this machine is refused at once. Otherwise a
    run that finds the object watches its generation: a change means a live holder, refused. It
    takes over, with the generation it read as precondition (one winner),
    when the owner is a process of this machine that is gone, or when the object has not been
    rewritten for `stale_s` (by its server time against this clock, or watched for that long).
    A clock off by more than `stale_s` could take a live lock; its holder then stops before its
    next checkpoint instead of writing beside the new run.
  - release: delete it, with the generation as precondition, if it is still this run's.
Every write carries a precondition, so google-cloud-storage's retries are safe; a write of ours
that landed although its answer was lost is recognised by the holder's token in the object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

from nanojaxgpt import storage
from nanojaxgpt.runlock import LOCK_NAME, Owner, RunLockLostError, describe, in_use_error

log = logging.getLogger(__name__)

HEARTBEATS_PER_STALE = 6  # refreshes per stale period: a late beat or two is not a takeover


@dataclasses.dataclass(frozen=True)
class _Seen:
    generation: int
    age_s: float  # since the object was last written, by the server's clock against ours
    owner: Owner | None


class GCSLock:
    """The gs:// lock object; raises RunLockError when a live run holds it (see the module doc).

    `heartbeat=False` leaves refreshing to the caller (refresh() at every checkpoint).
    """

    def __init__(self, out_dir: str, stale_s: float, *, owner: Owner | None = None,
                 heartbeat: bool = True) -> None:
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY

        self._errors = exceptions
        self.owner = owner or Owner.current()
        self.out_dir = out_dir
        self.url = storage.join(out_dir, LOCK_NAME)
        self.stale_s = stale_s
        path = storage.GCSPath.parse(self.url)
        self._name = path.name
        self._bucket = storage.client().bucket(path.bucket)
        # Every write carries a generation precondition, so retrying one is safe; a retry or a
        # request that outlasts the stale period would be a takeover waiting to happen.
        self._retry = DEFAULT_RETRY.with_timeout(max(1.0, stale_s / 2))
        self._timeout = max(1.0, min(60.0, stale_s / 3))
        self._writes = 0
        self._mutex = threading.Lock()  # the heartbeat and the main thread both refresh
        self._lost: str | None = None
        self._generation: int | None = self._acquire()
        self._stop = threading.Event()
        self._thread = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                            daemon=True)
            self._thread.start()

    @property
    def lost(self) -> str | None:
        """Why this lock is no longer held (another run took it), or None."""
        return self._lost

    def _write(self, if_generation_match: int) -> int | None:
        """The new generation, or None when the object's generation was not the one given."""
        self._writes += 1
        data = json.dumps({"owner": dataclasses.asdict(self.owner), "write": self._writes,
                           "time": time.time()}).encode()
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(data, content_type="application/json",
                                    if_generation_match=if_generation_match,
                                    timeout=self._timeout, retry=self._retry)
            return blob.generation
        except self._errors.PreconditionFailed:
            # Only this holder writes its token: a write of ours landed though its answer was lost
            # (a retry then sees the generation it made itself, or an earlier call gave up).
            seen = self._stat()
            mine = seen and seen.owner and seen.owner.token == self.owner.token
            return seen.generation if mine else None

    def _stat(self) -> _Seen | None:
        """The object as it is now, or None when it is absent (or changed while read)."""
        blob = self._bucket.get_blob(self._name, timeout=self._timeout, retry=self._retry)
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation,
                                          timeout=self._timeout, retry=self._retry)
        except (self._errors.NotFound, self._errors.PreconditionFailed):
            return None
        return _Seen(blob.generation, time.time() - blob.updated.timestamp(), Owner.parse(data))

    def _acquire(self) -> int:
        watched: tuple[int, float] | None = None  # (generation, time.monotonic() first seen)
        announced = False
        while True:
            generation = self._write(if_generation_match=0)
            if generation is not None:
                return generation
            seen = self._stat()
            if seen is None:
                continue  # released meanwhile: create it again
            if watched is not None and watched[0] != seen.generation:
                raise in_use_error(self.out_dir, seen.owner, ", its lock was refreshed just now")
            if watched is None:
                watched = (seen.generation, time.monotonic())
            alive = seen.owner.alive() if seen.owner else None
            if alive:
                raise in_use_error(self.out_dir, seen.owner)
            quiet = max(seen.age_s, time.monotonic() - watched[1])
            reason = ("its process is gone" if alive is False else
                      f"its lock was not refreshed for {quiet:.0f} s (checkpoint.lock_stale_s="
                      f"{self.stale_s:g})" if quiet > self.stale_s else None)
            if reason:
                generation = self._write(if_generation_match=seen.generation)
                if generation is not None:
                    log.warning("%s: took over the lock of a run that is gone (%s): %s",
                                self.url, describe(seen.owner), reason)
                    return generation
                watched = None  # another run wrote it first: look again
                continue
            if not announced:
                announced = True
                log.warning("%s is held by %s, refreshed %.0f s ago: waiting up to %.0f s to see "
                            "whether that run is alive", self.url, describe(seen.owner),
                            max(seen.age_s, 0.0), self.stale_s - quiet)
            time.sleep(min(1.0, self.stale_s / 20))

    def refresh(self) -> None:
        """Rewrite the object; RunLockLostError when another run has taken it over."""
        with self._mutex:
            if self._lost:
                raise RunLockLostError(self._lost)
            if self._generation is None:
                return  # released
            generation = self._write(if_generation_match=self._generation)
            if generation is None:
                seen = self._stat()
                by = f"by {describe(seen.owner)}" if seen else "(it was deleted)"
                self._lost = (f"the lock {self.url} of this run was taken over {by}: stopping "
                              f"without writing more to {self.out_dir}")
                raise RunLockLostError(self._lost)
            self._generation = generation

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / HEARTBEATS_PER_STALE):
            try:
                self.refresh()
            except RunLockLostError as e:
                log.error("%s", e)
                return
            except Exception as e:  # transient: the next beat tries again
                log.warning("could not refresh %s (%s: %s)", self.url, type(e).__name__, e)

    def release(self) -> None:
        """Delete the object if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            generation, self._generation = self._generation, None
            if generation is None or self._lost:
                return
            try:
                # The precondition makes the delete safe on GCS; the emulator used by the tests
                # ignores it on deletes, so the generation is also checked first.
                seen = self._stat()
                if seen is None or seen.generation != generation:
                    log.warning("%s is no longer this run's lock; leaving it", self.url)
                    return
                self._bucket.blob(self._name).delete(if_generation_match=generation,
                                                     timeout=self._timeout, retry=self._retry)
            except (self._errors.NotFound, self._errors.PreconditionFailed):
                pass
            except Exception as e:
                log.warning("could not delete %s (%s: %s); the next run takes it over after "
                            "checkpoint.lock_stale_s=%g s", self.url, type(e).__name__, e,
                            self.stale_s)
