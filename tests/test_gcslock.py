"""gcslock.py against a real GCS-protocol server (fake-gcs-server): refusal while the holder
refreshes, takeover of a dead host's stale lock and of a killed local process's, stolen locks."""

from __future__ import annotations

import json
import logging
import time

import pytest

from nanojaxgpt.gcslock import GCSLock
from nanojaxgpt.runlock import RunLockError, RunLockLostError
from tests.lock_holders import elsewhere, hold_then_kill, lock_object, steal

STALE_S = 1.0  # locks in these tests go stale fast; a live holder refreshes 6 times as often


def test_gcs_second_run_is_refused_while_the_holder_refreshes(gcs):
    out = f"{gcs}/run"
    holder = GCSLock(out, STALE_S, owner=elsewhere())  # on "another host": only its beats tell
    with pytest.raises(RunLockError, match="host host-b.*refreshed just now") as refused:
        GCSLock(out, STALE_S)
    assert "\n" not in str(refused.value)
    assert holder.lost is None
    holder.release()
    assert lock_object(out) is None
    GCSLock(out, STALE_S).release()


def test_gcs_lock_of_a_dead_host_is_taken_over_once_stale(gcs, caplog):
    out = f"{gcs}/run"
    dead = GCSLock(out, STALE_S, owner=elsewhere(), heartbeat=False)  # never refreshed again
    left = lock_object(out).generation
    with caplog.at_level(logging.WARNING, logger="nanojaxgpt.runlock"):
        lock = GCSLock(out, STALE_S)
    assert "waiting up to" in caplog.text and "took over the lock" in caplog.text
    assert "not refreshed for" in caplog.text and "host host-b" in caplog.text
    now = lock_object(out)
    assert now.generation != left
    assert json.loads(now.download_as_bytes())["owner"]["token"] == lock.owner.token
    dead.release()  # the old holder, back before it noticed: must not delete the new lock
    assert json.loads(lock_object(out).download_as_bytes())["owner"]["token"] == lock.owner.token
    lock.release()
    assert lock_object(out) is None


def test_gcs_lock_already_stale_by_its_age_is_taken_without_waiting(gcs, caplog):
    out = f"{gcs}/run"
    GCSLock(out, STALE_S, owner=elsewhere(), heartbeat=False)
    deadline = time.monotonic() + 30
    while time.time() - lock_object(out).updated.timestamp() <= STALE_S:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="nanojaxgpt.runlock"):
        GCSLock(out, STALE_S).release()
    assert "took over the lock" in caplog.text and "waiting" not in caplog.text


def test_gcs_lock_of_a_killed_process_on_this_machine_is_taken_at_once(gcs, tmp_path, caplog):
    out = f"{gcs}/run"
    pid = hold_then_kill(out, 600, tmp_path)
    with caplog.at_level(logging.WARNING, logger="nanojaxgpt.runlock"):
        lock = GCSLock(out, 600.0)  # waiting out 600 s would fail the test's timeout
    assert f"pid {pid}" in caplog.text and "its process is gone" in caplog.text
    lock.release()


def test_gcs_heartbeat_detects_a_stolen_lock(gcs):
    out = f"{gcs}/run"
    lock = GCSLock(out, STALE_S)
    # Another run that judged the lock stale (its holder was paused past lock_stale_s) replaces it.
    steal(out)
    deadline = time.monotonic() + 30
    while lock.lost is None:
        assert time.monotonic() < deadline, "the heartbeat never noticed"
        time.sleep(0.05)
    assert "taken over by host host-b" in lock.lost
    with pytest.raises(RunLockLostError):
        lock.refresh()
    lock.release()
    assert "host-b" in lock_object(out).download_as_text()  # the thief's lock is left alone


def test_a_write_whose_answer_was_lost_is_not_taken_for_a_takeover(gcs):
    lock = GCSLock(f"{gcs}/run", STALE_S, heartbeat=False)
    lock._write(if_generation_match=lock._generation)  # landed; the caller never learnt it
    lock.refresh()  # a 412 against its own newer write: still this run's lock
    lock.refresh()
    assert lock.lost is None
    lock.release()
    assert lock_object(f"{gcs}/run") is None
