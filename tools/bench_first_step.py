"""Seconds from process start to the first finished training step, for 1, 2 and 4 processes.

    python tools/bench_first_step.py --data_dir data/shakespeare_char [--processes 1 2 4]

Launches N copies of `python -m nanojaxgpt.train` on this machine (jax.distributed on 127.0.0.1,
N x (8/N) fake CPU devices, so the mesh is always 8 devices) and reports when process 0 logs
step 0: imports, distributed start-up, sharded init, the first evaluation, and compilation.
On one small machine the processes share its cores: read the numbers as an upper bound.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=16",
         "--max_iters=1", "--eval_iters=4", "--log_interval=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step_seconds(n: int, data_dir: str, work: Path) -> float:
    port, devices = free_port(), 8 // n
    logs = [work / f"p{n}-{i}.log" for i in range(n)]
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        if n > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                       JAX_PROCESS_ID=str(i))
        cmd = [sys.executable, "-m", "nanojaxgpt.train", str(REPO / "configs/shakespeare_char.toml"),
               *MODEL, f"--data_dir={data_dir}", f"--out_dir={work / f'out-{n}'}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=open(logs[i], "w")))
    seen = None
    while seen is None:
        if "step 0/1" in logs[0].read_text():
            seen = time.perf_counter() - t0
        elif procs[0].poll() is not None:
            sys.exit(f"process 0 ended without a step:\n{logs[0].read_text()[-3000:]}")
        time.sleep(0.02)
    for p in procs:
        p.wait(timeout=300)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-first-step-"))
    print(f"{'processes':>9} {'devices each':>12} {'start -> first step':>20}   ({os.cpu_count()} cores)")
    for n in args.processes:
        print(f"{n:>9} {8 // n:>12} {first_step_seconds(n, args.data_dir, work):>19.1f}s", flush=True)


if __name__ == "__main__":
    main()
