"""Seconds from process start to the first finished training step, for 1, 2 and 4 processes:
a cold start, and a restart of the same command on the same out_dir (it resumes from the
checkpoint and loads its compiled steps from out_dir/compile_cache).

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
         "--eval_iters=4", "--log_interval=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step_seconds(n: int, data_dir: str, work: Path, restart: bool) -> float:
    """A run of max_iters=1 into a fresh out_dir, or (restart) of max_iters=2 into the same one."""
    port, devices = free_port(), 8 // n
    logs = [work / f"p{n}-{i}-{'restart' if restart else 'cold'}.log" for i in range(n)]
    max_iters, first = (2, "step 1/2") if restart else (1, "step 0/1")
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env.update(JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        if n > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                       JAX_PROCESS_ID=str(i))
        cmd = [sys.executable, "-m", "nanojaxgpt.train", str(REPO / "configs/shakespeare_char.toml"),
               *MODEL, f"--max_iters={max_iters}", f"--data_dir={data_dir}",
               f"--out_dir={work / f'out-{n}'}"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=open(logs[i], "w")))
    seen = None
    while seen is None:
        if first in logs[0].read_text():
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
    print(f"{'processes':>9} {'devices each':>12} {'cold start':>11} {'restart':>8}   "
          f"(seconds from start to the first step; {os.cpu_count()} cores)")
    for n in args.processes:
        cold = first_step_seconds(n, args.data_dir, work, restart=False)
        again = first_step_seconds(n, args.data_dir, work, restart=True)
        print(f"{n:>9} {8 // n:>12} {cold:>10.1f}s {again:>7.1f}s", flush=True)


if __name__ == "__main__":
    main()
