"""One host's error stops every host of a jax.distributed job within seconds, naming it.

Without this, the other hosts wait in their next collective until the heartbeat timeout or JAX's
shutdown barrier gives up (minutes). The failing host writes its error into the coordination
service's key-value store before it exits; every host polls that key on a daemon thread, and the
first to see another host's error prints it and exits 1.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import jax
from jax._src import distributed as _jax_distributed  # the job's coordination-service client

from nanojaxgpt.cli import hard_exit

KEY = "nanojaxgpt/failed"
POLL_S = 1.0
LINGER_S = 3.0  # process 0 hosts the store: it stays up this long for the others to read it

_failing = threading.Event()  # this process reports its own error: its watcher stands down


def _client():
    return _jax_distributed.global_state.client


def report(message: str) -> None:
    """Tell the other hosts this one failed with `message` (its one-line error; the first report
    wins); a no-op without a job."""
    _failing.set()
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    try:
        client.key_value_set(KEY, json.dumps({"process": jax.process_index(), "error": message}))
    except Exception:  # noqa: BLE001 - another host reported first, or the service is gone
        return
    if jax.process_index() == 0:
        time.sleep(LINGER_S)


def _stop_for(failed: str, me: int) -> None:
    report = json.loads(failed)
    print(f"error: {report['error']} (process {report['process']} failed first; process {me} "
          "stops too)", file=sys.stderr, flush=True)
    hard_exit(1)


def stop_if_another_failed() -> None:
    """Exit 1 naming the host that failed first, if one did: this host's own error is likely its
    consequence (a collective whose peer left)."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    try:
        failed = client.key_value_try_get(KEY)
    except Exception:  # noqa: BLE001 - NOT_FOUND: nobody failed before this host
        return
    if json.loads(failed)["process"] != jax.process_index():
        _stop_for(failed, jax.process_index())


def watch() -> None:
    """Exit 1 as soon as another host reports an error (call once, after joining the job)."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    me = jax.process_index()

    def poll() -> None:
        while not _failing.is_set():
            time.sleep(POLL_S)
            try:
                failed = client.key_value_try_get(KEY)
            except Exception:  # noqa: BLE001 - NOT_FOUND until a host fails
                continue
            if _failing.is_set():
                return
            _stop_for(failed, me)

    threading.Thread(target=poll, name="nanojaxgpt-failfast", daemon=True).start()
