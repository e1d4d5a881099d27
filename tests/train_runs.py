"""Run `python -m nanojaxgpt.train` as a user would, and read its TensorBoard curves back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.multiprocess import isolated_env

REPO = Path(__file__).resolve().parents[1]

# A tiny character model: every run below takes seconds.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--dropout=0.1", "--eval_iters=4", "--eval_interval=10", "--log_interval=1",
        "--checkpoint_interval=5", "--keep_checkpoints=10", "--warmup_iters=5",
        "--lr_decay_iters=40"]


def env_for(devices: int, extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The run's environment: `devices` fake CPU devices; an `extra` value of None removes it."""
    env = isolated_env()
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def cached_env(devices: int, cache_dir: str) -> dict[str, str]:
    """env_for(devices) with a compilation cache of its own that keeps every compile, however
    short: the runs sharing it compile each program once."""
    return env_for(devices, {"JAX_COMPILATION_CACHE_DIR": cache_dir,
                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})


def command(data_dir: str, out_dir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "nanojaxgpt.train", str(REPO / "configs/shakespeare_char.toml"),
            *TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *overrides]


def run(data_dir: str, out_dir: str, *overrides: str, devices: int = 8, timeout: float = 240,
        env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(data_dir, out_dir, *overrides), env=env_for(devices, env),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def start(data_dir: str, out_dir: str, *overrides: str, devices: int = 8,
          log: Path) -> subprocess.Popen:
    return subprocess.Popen(command(data_dir, out_dir, *overrides), env=env_for(devices),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"run ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {text!r} within {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=120)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGSTOP `proc` and wait until every one of its threads has stopped: the signal is delivered
    asynchronously, and a thread on another core can go on writing for a moment after kill()."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.time() + timeout
    while not all(_thread_state(t) in ("T", "t", None) for t in Path(f"/proc/{proc.pid}/task").iterdir()):
        assert time.time() < deadline, f"pid {proc.pid} did not stop within {timeout}s"
        time.sleep(0.01)


def _thread_state(task: Path) -> str | None:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # the thread ended
        return None


def curve(log_dir: str | Path, tag: str) -> dict[int, float]:
    """{step: value} as TensorBoard shows it; a step seen twice is a failure."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {sorted(steps)}"
    return {e.step: e.value for e in events}
