"""runlock.py: one run per out_dir, locally (flock) and on gs:// (generation preconditions), on
one host and across jax.distributed processes, and with the real `python -m nanojaxgpt.train`."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from nanojaxgpt import runlock
from nanojaxgpt.runlock import LocalLock, RunLockError, RunLockLostError
from tests import multiprocess, train_runs
from tests.lock_holders import hold_then_kill, lock_object, steal


# --- local: flock --------------------------------------------------------------------------------

def test_local_second_lock_is_refused_naming_the_owner_until_released(tmp_path):
    out = str(tmp_path / "run")
    first = LocalLock(out)
    with pytest.raises(RunLockError) as refused:
        LocalLock(out)
    message = str(refused.value)
    assert "\n" not in message and "in use by another run" in message and out in message
    assert f"pid {os.getpid()}" in message and f"host {first.owner.host}" in message
    first.release()
    assert not os.path.exists(os.path.join(out, runlock.LOCK_NAME))  # nothing left behind
    second = LocalLock(out)
    second.release()


def test_local_lock_of_a_killed_process_is_taken_at_once(tmp_path, caplog):
    out = str(tmp_path / "run")
    pid = hold_then_kill(out, 60, tmp_path)
    assert os.path.exists(os.path.join(out, runlock.LOCK_NAME))  # SIGKILL: no clean-up ran
    with caplog.at_level(logging.INFO, logger="nanojaxgpt.runlock"):
        lock = LocalLock(out)
    assert f"pid {pid}" in caplog.text and "ended without releasing" in caplog.text
    lock.release()


def test_local_lock_whose_directory_was_removed_is_lost(tmp_path):
    out = tmp_path / "run"
    lock = LocalLock(str(out))
    lock.refresh()
    shutil.rmtree(out)
    with pytest.raises(RunLockLostError, match="removed or replaced"):
        lock.refresh()
    lock.release()


# --- several jax.distributed processes: one lock per run -----------------------------------------

JOB = """
import os, sys, time
from pathlib import Path
from nanojaxgpt import distributed, runlock
from nanojaxgpt.config import DistributedConfig
topology = distributed.initialize(DistributedConfig(initialization_timeout_s=60, heartbeat_timeout_s=20))
go = Path(os.environ["GO_DIR"])
try:
    lock = runlock.acquire(os.environ["OUT_DIR"], stale_s=60.0)
except runlock.RunLockError as e:
    print("refused:", e, flush=True)
    sys.exit(2)
print("held", lock.owner is not None, flush=True)
for name in ("refresh", "lost"):
    while not (go / name).exists():
        time.sleep(0.05)
    try:
        lock.refresh()
        print(name, "-> ok", flush=True)
    except runlock.RunLockLostError as e:
        print(name, "-> lost:", e, flush=True)
lock.release()
"""


def test_one_lock_per_multihost_run_and_every_host_agrees(gcs, gcs_server, tmp_path):
    out = f"{gcs}/run"
    env = {**gcs_server.env(), "OUT_DIR": out, "GO_DIR": str(tmp_path)}
    with multiprocess.launch(JOB, 2, env=env) as first:
        first.wait_for_text("held", timeout=120)
        assert "held True" in first.output(0) and "held False" in first.output(1)
        with multiprocess.launch(JOB, 2, env=env) as second:
            refused = second.wait(timeout=120)
        for r in refused:  # both hosts refuse, with process 0's message
            assert r.returncode == 2, r.output
            assert f"refused: out_dir {out} is in use by another run" in r.output, r.output
        (tmp_path / "refresh").touch()
        first.wait_for_text("refresh -> ok", timeout=60)
        # Another run takes the lock over; at its next checkpoint every host of this run stops.
        steal(out)
        (tmp_path / "lost").touch()
        results = first.wait(timeout=60)
    for r in results:
        assert r.returncode == 0, r.output
        assert "lost -> lost: the lock" in r.output and "host host-b" in r.output, r.output
    assert "host-b" in lock_object(out).download_as_text()  # release left the new holder's lock


# --- the real training command ------------------------------------------------------------------

MAX = "--max_iters=20"  # checkpoints at 5, 10, 15, 20 (tests/train_runs.py's TINY)


@pytest.fixture(scope="module")
def data_dir(char_data_dir):
    return char_data_dir


@pytest.fixture(scope="module")
def train_env(tmp_path_factory):
    """One device, and one compilation cache for the runs below: each program compiles once."""
    return train_runs.cached_env(1, str(tmp_path_factory.mktemp("jax-cache")))


def _start(data_dir: str, out, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(train_runs.command(data_dir, str(out), MAX), env=env,
                            cwd=train_runs.REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _run(data_dir: str, out, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(train_runs.command(data_dir, str(out), MAX), env=env, cwd=train_runs.REPO,
                          capture_output=True, text=True, timeout=240)


def _tree(root) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _steps(out) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_second_run_on_a_live_out_dir_refuses_and_the_first_finishes(data_dir, train_env,
                                                                     tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = _start(data_dir, out, train_env, log)
    try:
        train_runs.wait_for(log, "step 5/20", first)  # just after the async save of step 5 began
        train_runs.stop(first)  # alive but not moving: nothing changes out_dir now
        in_flight = [p.name for p in (out / "checkpoints").iterdir() if "tmp" in p.name]
        print(f"saves in flight when the second run started: {in_flight}")
        before = _tree(out)
        second = _run(data_dir, out, train_env)
        assert _tree(out) == before  # the second run wrote, renamed and deleted nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"out_dir {out} is in use by another run" in errors[0] and f"pid {first.pid}" in errors[0]
    assert first.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert _steps(out) == [5, 10, 15, 20]  # every save of the first run, complete
    assert sorted(train_runs.curve(out, "train/loss")) == list(range(20))
    assert not (out / runlock.LOCK_NAME).exists()  # released at the end


def test_run_killed_with_sigkill_restarts_with_the_same_command_at_once(data_dir, train_env,
                                                                        tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    killed = _start(data_dir, out, train_env, log)
    train_runs.wait_for(log, "step 1/20", killed)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "5").is_dir():  # complete: renamed from its tmp folder
        assert killed.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    train_runs.kill(killed)
    assert (out / runlock.LOCK_NAME).exists()  # a SIGKILL leaves its lock file behind
    restarted = _run(data_dir, out, train_env)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"pid {killed.pid}" in restarted.stderr and "ended without releasing" in restarted.stderr
    assert re.search(r"resumed from step (5|10|15) ", restarted.stderr), restarted.stderr[-3000:]
    assert _steps(out)[-1] == 20 and not (out / runlock.LOCK_NAME).exists()
