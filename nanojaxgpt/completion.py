"""The completion marker: `out_dir/DONE`, written by process 0 once the final checkpoint is committed.

A launcher that keeps a run going (launch/supervise.py) stops when it sees this file, and a rerun of
a finished command exits 0 at once instead of restoring and evaluating again. The marker holds the
step it was written at, so raising --max_iters past it continues the run.
"""

from __future__ import annotations

import json

from nanojaxgpt import storage

MARKER = "DONE"


def path(out_dir: str) -> str:
    return storage.join(out_dir, MARKER)


def done_step(out_dir: str) -> int | None:
    """The step the run in out_dir finished at, or None when it has not finished."""
    try:
        return int(json.loads(storage.read_text(path(out_dir)))["step"])
    except FileNotFoundError:
        return None


def is_complete(out_dir: str, max_iters: int) -> bool:
    step = done_step(out_dir)
    return step is not None and step >= max_iters


def mark(out_dir: str, step: int) -> None:
    """Write the marker; call only after the checkpoint of `step` is complete."""
    storage.write_text(path(out_dir), json.dumps({"step": step}) + "\n")
