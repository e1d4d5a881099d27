"""Time joining a jax.distributed job and the per-step cost of Preemption.should_stop.

On real hosts, run it on every host with the environment a training run would get
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or SLURM / a TPU VM):

    python tools/bench_startup.py

On one machine, `--local N` starts N processes with 2 fake CPU devices each on 127.0.0.1:

    python tools/bench_startup.py --local 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def bench(steps: int, work_ms: float) -> None:
    t0 = time.perf_counter()
    from nanojaxgpt import distributed
    from nanojaxgpt.config import DistributedConfig
    from nanojaxgpt.preemption import Preemption

    t_import = time.perf_counter() - t0
    topology = distributed.initialize(DistributedConfig(initialization_timeout_s=60))
    t_init = time.perf_counter() - t0 - t_import
    preemption = Preemption()
    t_preemption = time.perf_counter() - t0 - t_import - t_init

    def per_call(work_s: float) -> float:
        spent = 0.0
        for step in range(steps):
            time.sleep(work_s)  # stands in for the host's part of a training step
            start = time.perf_counter()
            preemption.should_stop(step)
            spent += time.perf_counter() - start
        return spent / steps * 1e3

    tight, overlapped = per_call(0.0), per_call(work_ms / 1e3)
    if topology.process_index == 0:
        print(f"{topology}\n"
              f"import {t_import:.2f} s, initialize {t_init:.2f} s, Preemption() {t_preemption:.2f} s\n"
              f"should_stop: {tight:.3f} ms/step back to back, {overlapped:.3f} ms/step with "
              f"{work_ms:g} ms of host work per step (over {steps} steps)", flush=True)
    preemption.close()


def local(n: int, args: list[str]) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(n), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, *args], env=dict(env, JAX_PROCESS_ID=str(i)),
                              stderr=subprocess.DEVNULL if i else None) for i in range(n)]
    return max(p.wait() for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", type=int, default=0, help="start this many processes here")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work_ms", type=float, default=5.0)
    ns = parser.parse_args()
    if ns.local:
        sys.exit(local(ns.local, [f"--steps={ns.steps}", f"--work_ms={ns.work_ms}"]))
    bench(ns.steps, ns.work_ms)


if __name__ == "__main__":
    main()
