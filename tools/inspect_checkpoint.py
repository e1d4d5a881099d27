"""List the checkpoints of a run (local or gs://): step, size, complete or not, key config values.

    python tools/inspect_checkpoint.py out/shakespeare_char
    python tools/inspect_checkpoint.py gs://my-bucket/gpt2-124m --config 5000
    python tools/inspect_checkpoint.py out/shakespeare_char --verify

Half-written checkpoints (a process killed mid-save) are listed too and marked INCOMPLETE, by
Orbax's own rule: locally a `<step>.orbax-checkpoint-tmp` directory, on gs:// a step directory
without `commit_success.txt`. Training ignores them and removes them when it starts again.

A finished checkpoint that training could not use is DAMAGED, with the reason below the table:
its state missing, its metadata or config unreadable or changed since the save (their CRC-32C);
these checks read only the small JSON items. `--verify` also reads every array and checks it
against the digest saved with it and for NaN or inf, as a resume does: it reads the whole state.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import fsspec
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nanojaxgpt import integrity
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
    damaged: str | None = None  # why training cannot use this complete checkpoint


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


def _read_json(item: epath.Path) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON item of a checkpoint, or None and why it cannot be read."""
    what = {"meta": "metadata"}.get(item.name, item.name)
    try:
        return dict(ocp.JsonCheckpointHandler().restore(item)), None
    except FileNotFoundError:
        return None, f"its {what} is missing"
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        return None, f"its {what} is not readable JSON ({type(e).__name__})"


def _check_arrays(state: epath.Path, rec: dict[str, Any]) -> str | None:
    """Read every array of a state (as numpy, no model code needed) and check its digest."""
    try:
        handler = ocp.PyTreeCheckpointHandler()
        is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            handler.metadata(state).tree, is_leaf=is_leaf)
        arrays = handler.restore(state, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # noqa: BLE001 - any failure to read is damage to report
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"its arrays cannot be read ({type(e).__name__}: {first})"
    return integrity.check_arrays(rec, integrity.compute(arrays))


def check(step_dir: epath.Path, verify: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """The saved config of a complete checkpoint, and why it is damaged (None when it is not)."""
    config, config_error = _read_json(step_dir / "config")
    if not (step_dir / "state" / "_METADATA").exists():
        return config, "its state is missing"
    meta, meta_error = _read_json(step_dir / "meta")
    if meta_error or config_error:
        return config, meta_error or config_error
    rec = meta.pop(integrity.KEY, None)
    if rec is None:  # written before digests were recorded: nothing to check against
        return config, None
    reason = integrity.check_json(rec, meta, config)
    if reason is None and verify:
        reason = _check_arrays(step_dir / "state", rec)
    return config, reason


def list_checkpoints(run_dir: str, verify: bool = False) -> list[Entry]:
    root = checkpoints_root(run_dir)
    entries = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        fs, fs_path = fsspec.core.url_to_fs(str(p))
        complete = ocp.path.step.is_path_finalized(p)
        config, damaged = check(p, verify) if complete else (_read_json(p / "config")[0], None)
        entries.append(Entry(step=int(m.group(1)), path=str(p), complete=complete,
                             size_bytes=int(fs.du(fs_path, total=True)), config=config,
                             damaged=damaged))
    if not entries:
        raise InspectError(f"{run_dir} holds no checkpoints ({root} has no step directories)")
    return sorted(entries, key=lambda e: (e.step, e.complete))


def status(e: Entry) -> str:
    return "INCOMPLETE" if not e.complete else "DAMAGED" if e.damaged else "complete"


def format_table(entries: list[Entry]) -> str:
    header = ("step", "status", "bytes", "size", "n_layer", "n_head", "n_embd", "block_size",
              "mesh data,fsdp,tensor")
    rows = [header]
    for e in entries:
        c = e.config or {}
        model, mesh = c.get("model", {}), c.get("mesh", {})
        rows.append((str(e.step), status(e), f"{e.size_bytes:,}",
                     human_bytes(e.size_bytes),
                     *(str(model.get(k, "?")) for k in ("n_layer", "n_head", "n_embd", "block_size")),
                     ",".join(str(mesh.get(k, "?")) for k in ("data", "fsdp", "tensor"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) if i != 1 else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="A complete checkpoint that fails a check is DAMAGED, its reason below the table. "
               "Without --verify only the small JSON items are read (state present, metadata and "
               "config readable and unchanged); --verify reads every array too (the whole state, "
               "as a resume does) and checks its digest and that it is finite. Exit code 0: every "
               "complete checkpoint passed; 1: one is damaged, or the run cannot be listed.")
    parser.add_argument("run_dir", help="run directory (train.out_dir), local or gs://")
    parser.add_argument("--config", type=int, metavar="STEP",
                        help="print the full resolved config JSON saved with checkpoint STEP")
    parser.add_argument("--verify", action="store_true",
                        help="also read every array and check it against its saved digest")
    args = parser.parse_args(argv)
    try:
        entries = list_checkpoints(args.run_dir, verify=args.verify and args.config is None)
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.config is None:
        checked = " (every array read and checked)" if args.verify else ""
        print(f"checkpoints in {checkpoints_root(args.run_dir)}{checked}")
        print(format_table(entries))
        damaged = [e for e in entries if e.damaged]
        if damaged:
            print()
        for e in damaged:
            print(f"step {e.step} is DAMAGED ({e.path}): {e.damaged}")
        return 1 if damaged else 0
    found = [e for e in entries if e.step == args.config and e.config is not None]
    if not found:
        print(f"error: no checkpoint of step {args.config} with a saved config in {args.run_dir}; "
              f"steps: {', '.join(str(e.step) for e in entries)}", file=sys.stderr)
        return 1
    print(json.dumps(found[-1].config, indent=2, sort_keys=True))  # the complete one, if any
    return 0


if __name__ == "__main__":
    sys.exit(main())
