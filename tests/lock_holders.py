"""Run locks as other runs leave them: a holder process killed with SIGKILL, a lock written by
another machine, a takeover by a run that judged a lock stale. Shared by the lock tests."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from nanojaxgpt import runlock, storage
from nanojaxgpt.runlock import Owner
from tests.multiprocess import REPO


def elsewhere() -> Owner:
    """This process's identity as another machine would write it: its pid means nothing here."""
    return dataclasses.replace(Owner.current(), host="host-b", machine="host-b|boot|pid:[1]")


def lock_blob(url: str):
    """The lock object of the run directory `url`, as google-cloud-storage addresses it."""
    path = storage.GCSPath.parse(storage.join(url, runlock.LOCK_NAME))
    return storage.client().bucket(path.bucket).blob(path.name)


def lock_object(url: str):
    """Its current metadata (generation, updated), or None when there is no lock."""
    blob = lock_blob(url)
    return blob.bucket.get_blob(blob.name)


def steal(url: str) -> None:
    """What another run writes when it judged this lock stale (its holder paused too long)."""
    owner = json.dumps({"owner": dataclasses.asdict(elsewhere())})
    lock_blob(url).upload_from_string(owner, if_generation_match=lock_object(url).generation)


# A process that takes the lock of sys.argv[1], says so, and waits to be killed.
HOLDER = """
import sys, time
from nanojaxgpt import runlock
lock = runlock.acquire(sys.argv[1], stale_s=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def hold_then_kill(out_dir: str, stale_s: float, tmp_path) -> int:
    """Start a holder process, wait until it holds the lock, SIGKILL it; its pid."""
    log = tmp_path / "holder.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, out_dir, str(stale_s)],
                                env={**os.environ, "JAX_PLATFORMS": "cpu",
                                     "PYTHONPATH": str(REPO)}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "held" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    return proc.pid
