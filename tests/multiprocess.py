"""Launch N real Python processes that join one jax.distributed job on 127.0.0.1, for tests.

Each child runs the given code with its own JAX_PROCESS_ID, the same JAX_COORDINATOR_ADDRESS and
JAX_NUM_PROCESSES, `local_device_count` fake CPU devices and the repository on its path. Output goes
to one file per process (never a pipe: a pipe nobody reads stalls the child once it fills).

    with multiprocess.launch(CODE, n_processes=2) as job:
        job.wait_for_text("ready", timeout=30)
        job.send_signal(1, signal.SIGTERM)
        results = job.wait(timeout=30)   # one Result per process, in process order
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from tools.gcs_server import free_port

REPO = Path(__file__).resolve().parents[1]

# Variables that would make a child join some other cluster than the one the test describes.
_INHERITED_PREFIXES = ("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "XLA_FLAGS")


def isolated_env() -> dict[str, str]:
    """This process's environment without the variables above (a test on a SLURM or TPU node)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
    if "NANOJAXGPT_TEST_COMPILATION_CACHE" in os.environ:  # the suite's (tests/conftest.py)
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["NANOJAXGPT_TEST_COMPILATION_CACHE"]
    return env


@dataclass(frozen=True)
class Result:
    process_id: int
    returncode: int  # negative: killed by that signal (-6 = SIGABRT, jax's fatal-error exit)
    output: str  # stdout and stderr together
    elapsed_s: float  # from launch to exit


class Job:
    """Running child processes; a context manager that kills whatever is left on exit."""

    def __init__(self, code: str, n_processes: int, *, local_device_count: int,
                 env: dict[str, str | None] | None,
                 env_per_process: list[dict[str, str | None]] | None,
                 port: int | None) -> None:
        self.port = port or free_port()
        self.coordinator_address = f"127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="nanojaxgpt-mp-")
        script = Path(self._dir.name) / "child.py"
        script.write_text(textwrap.dedent(code))
        base = isolated_env()
        base.update({
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_device_count}",
            "JAX_COORDINATOR_ADDRESS": self.coordinator_address,
            "JAX_NUM_PROCESSES": str(n_processes),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        })
        base.update(env or {})
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self._start = time.monotonic()
        self._ended: dict[int, float] = {}
        for i in range(n_processes):
            child_env = dict(base, JAX_PROCESS_ID=str(i))
            child_env.update((env_per_process or [{}] * n_processes)[i])
            child_env = {k: v for k, v in child_env.items() if v is not None}
            log = Path(self._dir.name) / f"process{i}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.procs.append(subprocess.Popen([sys.executable, str(script)], cwd=REPO,
                                                   env=child_env, stdout=out,
                                                   stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def send_signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def wait_for_text(self, text: str, timeout: float, processes: list[int] | None = None) -> None:
        """Block until every listed process has printed `text`; fail if one exits first."""
        deadline = time.monotonic() + timeout
        for i in processes if processes is not None else range(len(self.procs)):
            while text not in self.output(i):
                if self.procs[i].poll() is not None:
                    raise AssertionError(f"process {i} exited ({self.procs[i].returncode}) before "
                                         f"printing {text!r}:\n{self.output(i)[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"process {i} did not print {text!r} within {timeout} s:"
                                         f"\n{self.output(i)[-4000:]}")
                time.sleep(0.05)

    def wait(self, timeout: float, processes: list[int] | None = None) -> list[Result]:
        """Wait for the listed processes (default all) to exit; kill all and fail on timeout."""
        deadline = time.monotonic() + timeout
        chosen = processes if processes is not None else list(range(len(self.procs)))
        while True:
            for i in chosen:
                if i not in self._ended and self.procs[i].poll() is not None:
                    self._ended[i] = time.monotonic() - self._start
            if all(i in self._ended for i in chosen):
                break
            if time.monotonic() > deadline:
                outputs = "\n".join(f"--- process {i} ---\n{self.output(i)[-3000:]}" for i in chosen)
                self.kill()
                raise AssertionError(f"processes still running after {timeout} s:\n{outputs}")
            time.sleep(0.05)
        return [Result(i, self.procs[i].returncode, self.output(i), self._ended[i]) for i in chosen]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a stopped process cannot die of SIGKILL until resumed
                p.kill()
                p.wait()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._dir.cleanup()


def launch(code: str, n_processes: int = 2, *, local_device_count: int = 2,
           env: dict[str, str | None] | None = None,
           env_per_process: list[dict[str, str | None]] | None = None,
           port: int | None = None) -> Job:
    """Start `n_processes` children running `code` as one jax.distributed job on loopback.

    `env` is added to every child's environment and `env_per_process[i]` to child i's (a value of
    None removes that variable, e.g. to test a missing JAX_NUM_PROCESSES).
    """
    return Job(code, n_processes, local_device_count=local_device_count, env=env,
               env_per_process=env_per_process, port=port)
