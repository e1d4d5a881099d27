#!/usr/bin/env python3
"""Keep a training run going on Cloud TPU until it marks itself complete (out_dir/DONE).

    python launch/supervise.py --name gpt2 --zone us-central2-b --accelerator v4-32 --spot -- \\
        configs/gpt2_124m.toml --data_dir=gs://B/openwebtext --out_dir=gs://B/runs/gpt2

Creates the slice (or a queued resource with --queued), waits until it is READY/ACTIVE, installs
this checkout on every worker, starts the same training command on all of them and watches: a
slice that is preempted, deleted or unhealthy is deleted and created again, a training command
that exits non-zero is started again; each restart resumes from the latest checkpoint in out_dir.
Stops with exit 0 when out_dir/DONE exists, exit 1 after more than --max-retries failures in all.
Needs only Python and `gcloud` on the machine it runs on. Every action is logged in UTC.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RC_FILE = "nanojaxgpt-train.rc"  # on each worker: the training command's exit status once it ends
LOG_FILE = "nanojaxgpt-train.log"
SLICES_KEY = "mesh.slices"  # the config key that --num-slices sets on the training command
UNREACHABLE_POLLS = 10  # a slice whose workers do not answer this often in a row is recreated
UP = {"READY", "ACTIVE"}  # a node that is READY, a queued resource that is ACTIVE
LOST = {"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED", "SUSPENDING", "DELETING", "STOPPED",
        "STOPPING", "NOT_FOUND"}


class Stop(Exception):
    """The supervisor stops: `code` is its exit status, the message says why."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


LOG_TO: list = []  # open files that also get every log line (--log-file)


def log(msg: str) -> None:
    line = f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} {msg}"
    for f in [sys.stderr, *LOG_TO]:
        print(line, file=f, flush=True)


def gcloud(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(["gcloud", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"gcloud {' '.join(args[:4])} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    return proc


def out_dir_of(train_args: list[str]) -> str | None:
    for a in train_args:
        for key in ("--out_dir=", "--train.out_dir="):
            if a.startswith(key):
                return a[len(key):]
    return None


def is_complete(out_dir: str) -> bool:
    """out_dir/DONE exists (gs:// through `gcloud storage`, local paths directly)."""
    marker = f"{out_dir.rstrip('/')}/DONE"
    if marker.startswith("gs://"):
        return gcloud("storage", "objects", "describe", marker, "--format=value(name)").returncode == 0
    return Path(marker).is_file()


class Slice:
    """One TPU VM slice, or a queued resource of --num-slices slices, through gcloud."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.zone = ["--zone", a.zone]
        self.queued = a.queued or a.num_slices > 1
        self.nodes = ([f"{a.name}-{i}" for i in range(a.num_slices)] if a.num_slices > 1
                      else [a.name])

    def state(self) -> str:
        kind = ["queued-resources"] if self.queued else ["tpu-vm"]
        p = gcloud("compute", "tpus", *kind, "describe", self.a.name, *self.zone, "--format=json")
        if p.returncode:
            return "NOT_FOUND" if "NOT_FOUND" in p.stderr or "not found" in p.stderr.lower() else "UNKNOWN"
        info = json.loads(p.stdout)
        if self.queued:
            return info.get("state", {}).get("state", "UNKNOWN")
        health = info.get("health", "HEALTHY")
        state = info.get("state", "UNKNOWN")
        return "UNHEALTHY" if state == "READY" and health not in ("HEALTHY", "") else state

    def create(self) -> None:
        a = self.a
        tier = ["--spot"] if a.spot else ["--best-effort"] if a.best_effort else []
        if self.queued:
            nodes = (["--node-count", str(a.num_slices), "--node-prefix", a.name]
                     if a.num_slices > 1 else ["--node-id", a.name])
            gcloud("compute", "tpus", "queued-resources", "create", a.name, *self.zone, *nodes,
                   "--accelerator-type", a.accelerator, "--runtime-version", a.version, *tier,
                   check=True)
        else:
            gcloud("compute", "tpus", "tpu-vm", "create", a.name, *self.zone,
                   "--accelerator-type", a.accelerator, "--version", a.version, *tier, check=True)

    def delete(self) -> None:
        if self.queued:
            gcloud("compute", "tpus", "queued-resources", "delete", self.a.name, *self.zone,
                   "--force", "--quiet")
        else:
            gcloud("compute", "tpus", "tpu-vm", "delete", self.a.name, *self.zone, "--quiet")

    def on_all(self, command: str) -> list[subprocess.CompletedProcess]:
        return [gcloud("compute", "tpus", "tpu-vm", "ssh", node, *self.zone, "--worker=all",
                       "--command", command) for node in self.nodes]

    def scp_all(self, local: str, remote: str) -> None:
        for node in self.nodes:
            gcloud("compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", *self.zone,
                   "--worker=all", check=True)


def setup(s: Slice) -> None:
    """The committed tree of this checkout + jax[tpu] on every worker (as tpu_vm.sh setup)."""
    with tempfile.TemporaryDirectory() as tmp:
        tarball = f"{tmp}/nanojaxgpt.tar.gz"
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", tarball, "HEAD"],
                       check=True)
        s.scp_all(tarball, "nanojaxgpt.tar.gz")
    for p in s.on_all("set -e; rm -rf nanojaxgpt && mkdir nanojaxgpt && "
                      "tar -xzf nanojaxgpt.tar.gz -C nanojaxgpt && cd nanojaxgpt && "
                      "pip install -q -e . && pip install -q "
                      "\"jax[tpu]==$(pip show jax | sed -n 's/^Version: //p')\""):
        if p.returncode:
            raise RuntimeError(f"setup failed ({p.returncode}): {p.stderr.strip()[-500:]}")


def train_command(train_args: list[str], num_slices: int) -> str:
    args = list(train_args) + ([f"--{SLICES_KEY}={num_slices}"] if num_slices > 1 else [])
    run = f"python -m nanojaxgpt.train {shlex.join(args)}; echo $? > ~/{RC_FILE}"
    # setsid + nohup: training outlives the ssh session; the exit status lands in RC_FILE.
    return (f"pkill -TERM -f nanojaxgpt.train; rm -f ~/{RC_FILE}; cd nanojaxgpt && "
            f"setsid nohup bash -c {shlex.quote(run)} > ~/{LOG_FILE} 2>&1 < /dev/null &")


def training_status(s: Slice) -> str:
    """'running', 'exited 0' (every worker) or 'exited N' (the first non-zero); 'unreachable'."""
    codes = []
    for p in s.on_all(f"echo rc=$(cat ~/{RC_FILE} 2>/dev/null || echo running)"):
        if p.returncode:
            return "unreachable"
        codes += [line[3:].strip() for line in p.stdout.splitlines() if line.startswith("rc=")]
    if not codes or "running" in codes:
        return "running"
    bad = [c for c in codes if c != "0"]
    return f"exited {bad[0]}" if bad else "exited 0"


def wait_up(s: Slice, a: argparse.Namespace) -> str:
    """Poll until the slice is up; the state it ended in (up or lost)."""
    deadline = time.monotonic() + a.create_timeout
    while True:
        state = s.state()
        if state in UP or state in LOST - {"NOT_FOUND"} or time.monotonic() > deadline:
            return state
        time.sleep(a.poll)


def attempt(s: Slice, a: argparse.Namespace, out_dir: str) -> str:
    """Bring the slice up, set it up, run training and watch it: why this attempt ended."""
    state = s.state()
    if state not in UP:
        if state != "NOT_FOUND":
            log(f"slice {a.name} is {state}: deleting it")
            s.delete()
        log(f"creating {'queued resource' if s.queued else 'slice'} {a.name} "
            f"({a.num_slices} x {a.accelerator})")
        s.create()
        state = wait_up(s, a)
        if state not in UP:
            return f"slice {a.name} did not come up (state {state})"
        log(f"slice {a.name} is {state}")
    log("setting up every worker")
    setup(s)
    log(f"starting on every worker: python -m nanojaxgpt.train {shlex.join(a.train_args)}")
    for p in s.on_all(train_command(a.train_args, a.num_slices)):
        if p.returncode:
            return f"could not start training ({p.returncode}): {p.stderr.strip()[-300:]}"
    unreachable = 0  # polls in a row on which some worker did not answer
    while True:
        time.sleep(a.poll)
        if is_complete(out_dir):
            return "complete"
        state = s.state()
        if state not in UP:
            return f"slice {a.name} is {state}"
        status = training_status(s)
        unreachable = unreachable + 1 if status == "unreachable" else 0
        if unreachable >= UNREACHABLE_POLLS:
            return f"workers of {a.name} unreachable on {unreachable} polls in a row"
        if status in ("running", "unreachable"):
            continue
        if is_complete(out_dir):
            return "complete"
        return f"training {status} without marking {out_dir} complete"


def supervise(a: argparse.Namespace) -> int:
    out_dir = out_dir_of(a.train_args)
    s = Slice(a)
    failures = restarts = 0
    try:
        while True:
            if is_complete(out_dir):
                raise Stop(0, f"{out_dir}/DONE exists: the run is complete")
            try:
                why = attempt(s, a, out_dir)
            except RuntimeError as e:
                why = str(e)
            if why == "complete":
                raise Stop(0, f"{out_dir}/DONE exists: the run is complete")
            failures += 1
            log(f"attempt ended: {why} (failure {failures} of at most {a.max_retries})")
            if failures > a.max_retries:
                raise Stop(1, f"gave up after {failures} failures; last: {why}")
            delay = min(a.backoff * 2 ** (failures - 1), a.max_backoff)
            log(f"retrying in {delay:g} s")
            time.sleep(delay)
            restarts += 1
    except Stop as stop:
        log(f"stopped after {restarts} restarts: {stop}")
        if stop.code == 0 and a.delete_when_done:
            log(f"deleting {a.name}")
            s.delete()
        return stop.code


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/supervise.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", default="v4-32", help="accelerator type of each slice")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU runtime version")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="a spot (preemptible) slice")
    tier.add_argument("--best-effort", action="store_true", help="a best-effort queued resource")
    p.add_argument("--queued", action="store_true", help="create a queued resource")
    p.add_argument("--num-slices", type=int, default=1,
                   help=f"slices over DCN (a queued resource; sets --{SLICES_KEY})")
    p.add_argument("--max-retries", type=int, default=20, help="failures before giving up")
    p.add_argument("--backoff", type=float, default=60, help="seconds before the first retry")
    p.add_argument("--max-backoff", type=float, default=1800, help="longest wait between retries")
    p.add_argument("--poll", type=float, default=60, help="seconds between state checks")
    p.add_argument("--create-timeout", type=float, default=6 * 3600,
                   help="seconds to wait for a slice (queued resources can wait long)")
    p.add_argument("--log-file", help="append the log to this file too")
    p.add_argument("--delete-when-done", action="store_true", help="delete the slice at the end")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- CONFIG [--key=value ...]: the training command's arguments")
    a = p.parse_args(argv)
    if a.train_args[:1] == ["--"]:
        a.train_args = a.train_args[1:]
    if not a.train_args:
        p.error("give the training command after --: -- CONFIG --out_dir=gs://... [--key=value ...]")
    if out_dir_of(a.train_args) is None:
        p.error("the training command needs --out_dir=... (where the run marks itself complete)")
    if a.num_slices < 1:
        p.error("--num-slices must be at least 1")
    if a.max_retries < 0 or a.backoff < 0 or a.poll < 0:
        p.error("--max-retries, --backoff and --poll must not be negative")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.log_file:
        LOG_TO.append(open(a.log_file, "a"))
    log(f"supervising {a.name} in {a.zone}: {a.num_slices} x {a.accelerator}"
        f"{' spot' if a.spot else ' best-effort' if a.best_effort else ''}"
        f"{' queued' if a.queued or a.num_slices > 1 else ''}; out_dir {out_dir_of(a.train_args)}")
    return supervise(a)


if __name__ == "__main__":
    sys.exit(main())
