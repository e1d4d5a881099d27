"""Run `python -m nanojaxgpt.train` as an N-process jax.distributed job on 127.0.0.1, and read
back what it wrote to gs:// (TensorBoard curves, checkpoint markers) and which batches it read.

Each child runs the train module as `__main__` through runpy, exactly what `python -m` does,
after wrapping `nanojaxgpt.batches.Batches.read` with a pass-through recorder: every call appends
{split, seed, step, rows, crc32 of each row} to reads-<process>.jsonl. The training code and its
reads are untouched (the real windows are returned); the record lets a test check which rows of
which step every process read, and that the bytes equal another run's.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests import multiprocess, train_runs

# Runs inside each child. Reads of the train split with the run's seed are the training batches;
# evaluation sets use seed + 1 (nanojaxgpt/train.py).
_CHILD = """
import json, os, runpy, sys, zlib
from nanojaxgpt import batches

_read = batches.Batches.read
_name = "reads-%s.jsonl" % os.environ.get("JAX_PROCESS_ID", "0")
_log = open(os.path.join({reads_dir!r}, _name), "a", buffering=1)  # a line per write

def _recorded(self, step, rows):
    out = _read(self, step, rows)
    _log.write(json.dumps({{"split": self.split, "seed": self.seed, "step": int(step),
                           "rows": [int(r) for r in rows],
                           "crc": [zlib.crc32(r.tobytes()) for r in out]}}) + "\\n")
    return out

batches.Batches.read = _recorded
sys.argv = ["nanojaxgpt.train", *{argv!r}]
runpy.run_module("nanojaxgpt.train", run_name="__main__", alter_sys=True)
"""

# The same tiny model as tests/train_runs.py, run for 20 steps: checkpoints at 5, 10, 15, 20.
MAX_ITERS = 20
SEED = 1337  # the default train.seed (configs/shakespeare_char.toml does not set one)
BATCH = 8  # --batch_size in train_runs.TINY


def train_argv(data_dir: str, out_dir: str, *overrides: str) -> list[str]:
    return train_runs.command(data_dir, out_dir, f"--max_iters={MAX_ITERS}", *overrides)[3:]


def launch(data_dir: str, out_dir: str, *overrides: str, processes: int, devices: int,
           reads_dir: Path, env: dict[str, str], per_process: list[dict] | None = None,
           ) -> multiprocess.Job:
    """Start `processes` x `devices` training processes (processes=1: a plain single-host run)."""
    code = _CHILD.format(reads_dir=str(reads_dir), argv=train_argv(data_dir, out_dir, *overrides))
    reads_dir.mkdir(parents=True, exist_ok=True)
    if processes == 1 and per_process is None:
        # One process needs no coordinator: run it as a user would on one machine.
        env = {**env, "JAX_COORDINATOR_ADDRESS": None, "JAX_NUM_PROCESSES": None}
        per_process = [{"JAX_PROCESS_ID": None}]
    return multiprocess.launch(code, processes, local_device_count=devices, env=env,
                               env_per_process=per_process)


@dataclass(frozen=True)
class Read:
    process: int
    step: int
    rows: tuple[int, ...]
    crc: tuple[int, ...]


def train_reads(reads_dir: Path) -> list[Read]:
    """The training-batch reads of every process of a run, in the order each process made them."""
    out = []
    for path in sorted(reads_dir.glob("reads-*.jsonl")):
        process = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["split"] == "train" and r["seed"] == SEED:
                out.append(Read(process, r["step"], tuple(r["rows"]), tuple(r["crc"])))
    return out


def rows_by_step(reads: list[Read]) -> dict[int, dict[int, list[int]]]:
    """{step: {process: rows it read for that step}} (a row read twice appears twice)."""
    table: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in reads:
        table[r.step][r.process].extend(r.rows)
    return table


def crc_by_row(reads: list[Read]) -> dict[tuple[int, int], int]:
    """{(step, row): crc32 of the tokens read}."""
    return {(r.step, row): c for r in reads for row, c in zip(r.rows, r.crc)}


def _bucket(gs_dir: str):
    from google.cloud import storage

    bucket, _, prefix = gs_dir[len("gs://"):].partition("/")
    return storage.Client().bucket(bucket), prefix.strip("/") + "/"


def complete_steps(gs_out: str) -> list[int]:
    """Checkpoint steps whose Orbax commit marker exists on gs:// (written last by a save)."""
    bucket, prefix = _bucket(gs_out)
    names = [b.name for b in bucket.client.list_blobs(bucket, prefix=prefix + "checkpoints/")]
    return sorted(int(n.split("/")[-2]) for n in names
                  if n.endswith("/commit_success.txt") and n.split("/")[-2].isdigit())


def copy_tree(src: str, dst: str) -> int:
    """Server-side copy of every object under gs://src/ to gs://dst/; returns the object count."""
    bucket, src_prefix = _bucket(src)
    _, dst_prefix = _bucket(dst)
    blobs = list(bucket.client.list_blobs(bucket, prefix=src_prefix))
    for b in blobs:
        bucket.copy_blob(b, bucket, dst_prefix + b.name[len(src_prefix):])
    return len(blobs)


def download_text(url: str) -> str:
    bucket, name = _bucket(url)
    return bucket.blob(name.rstrip("/")).download_as_text()


def gcs_curve(gs_out: str, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard tag as TensorBoard's own reader shows the gs:// log dir."""
    bucket, prefix = _bucket(gs_out)
    with tempfile.TemporaryDirectory(prefix="nanojaxgpt-tb-") as tmp:
        n = 0
        for b in bucket.client.list_blobs(bucket, prefix=prefix, delimiter="/"):
            if ".tfevents." in b.name:
                b.download_to_filename(str(Path(tmp) / b.name[len(prefix):]))
                n += 1
        assert n, f"no TensorBoard event files in {gs_out}"
        return train_runs.curve(tmp, tag)


def wait_until(predicate, timeout: float, what: str, job: multiprocess.Job) -> None:
    """Poll `predicate()` until true; fail (with the logs) if a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        ended = [i for i, p in enumerate(job.procs) if p.poll() is not None]
        assert not ended, f"process {ended} exited before {what}:\n{job.output(ended[0])[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{job.output(0)[-3000:]}"
        time.sleep(0.1)
