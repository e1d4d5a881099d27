"""List the checkpoints of a run (local or gs://): step, size, complete or not, key config values.

    python tools/inspect_checkpoint.py out/shakespeare_char
    python tools/inspect_checkpoint.py gs://my-bucket/gpt2-124m --config 5000

Half-written checkpoints (a process killed mid-save) are listed too and marked INCOMPLETE, by
Orbax's own rule: locally a `<step>.orbax-checkpoint-tmp` directory, on gs:// a step directory
without `commit_success.txt`. Training ignores them and removes them when it starts again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import fsspec
import orbax.checkpoint as ocp
from etils import epath

from nanojaxgpt.checkpoint import SUBDIR

_STEP_DIR = re.compile(r"^(\d+)(" + re.escape(ocp.path.step.TMP_DIR_SUFFIX) + r".*)?$")


class InspectError(Exception):
    """A run directory that cannot be listed; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    step: int
    path: str
    complete: bool
    size_bytes: int
    config: dict[str, Any] | None  # the saved resolved config; None where not (yet) written


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def checkpoints_root(run_dir: str) -> epath.Path:
    """RUN_DIR/checkpoints, or RUN_DIR itself when it is the checkpoints folder."""
    run = epath.Path(run_dir)
    if not run.exists():
        raise InspectError(f"run directory {run_dir} does not exist")
    root = run / SUBDIR
    if root.is_dir():
        return root
    if any(_STEP_DIR.match(p.name) for p in run.iterdir()):
        return run
    raise InspectError(f"{run_dir} holds no checkpoints (no {SUBDIR}/ folder with step directories)")


def _read_config(step_dir: epath.Path) -> dict[str, Any] | None:
    try:
        return dict(ocp.JsonCheckpointHandler().restore(step_dir / "config"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def list_checkpoints(run_dir: str) -> list[Entry]:
    root = checkpoints_root(run_dir)
    entries = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        fs, fs_path = fsspec.core.url_to_fs(str(p))
        entries.append(Entry(step=int(m.group(1)), path=str(p),
                             complete=ocp.path.step.is_path_finalized(p),
                             size_bytes=int(fs.du(fs_path, total=True)),
                             config=_read_config(p)))
    if not entries:
        raise InspectError(f"{run_dir} holds no checkpoints ({root} has no step directories)")
    return sorted(entries, key=lambda e: (e.step, e.complete))


def format_table(entries: list[Entry]) -> str:
    header = ("step", "status", "bytes", "size", "n_layer", "n_head", "n_embd", "block_size",
              "mesh data,fsdp,tensor")
    rows = [header]
    for e in entries:
        c = e.config or {}
        model, mesh = c.get("model", {}), c.get("mesh", {})
        rows.append((str(e.step), "complete" if e.complete else "INCOMPLETE", f"{e.size_bytes:,}",
                     human_bytes(e.size_bytes),
                     *(str(model.get(k, "?")) for k in ("n_layer", "n_head", "n_embd", "block_size")),
                     ",".join(str(mesh.get(k, "?")) for k in ("data", "fsdp", "tensor"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) if i != 1 else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="run directory (train.out_dir), local or gs://")
    parser.add_argument("--config", type=int, metavar="STEP",
                        help="print the full resolved config JSON saved with checkpoint STEP")
    args = parser.parse_args(argv)
    try:
        entries = list_checkpoints(args.run_dir)
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.config is None:
        print(f"checkpoints in {checkpoints_root(args.run_dir)}")
        print(format_table(entries))
        return 0
    found = [e for e in entries if e.step == args.config and e.config is not None]
    if not found:
        print(f"error: no checkpoint of step {args.config} with a saved config in {args.run_dir}; "
              f"steps: {', '.join(str(e.step) for e in entries)}", file=sys.stderr)
        return 1
    print(json.dumps(found[-1].config, indent=2, sort_keys=True))  # the complete one, if any
    return 0


if __name__ == "__main__":
    sys.exit(main())
