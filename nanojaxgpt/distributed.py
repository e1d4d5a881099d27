"""Join the jax.distributed job this process belongs to, before anything asks JAX for devices.

How a process learns its place, checked in this order:
  1. JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID, optional
     JAX_LOCAL_DEVICE_IDS (e.g. "0,1"): GPU/CPU nodes started by any launcher. All three are
     required together (inside SLURM/Open MPI the missing ones come from the scheduler).
  2. A SLURM step (srun) or an Open MPI job (mpirun) with more than one task: jax's own cluster
     detection (jax/_src/clusters/slurm_cluster.py, ompi_cluster.py) derives the coordinator
     (first node of SLURM_STEP_NODELIST), SLURM_NTASKS and SLURM_PROCID; on GPUs it gives each
     task the one device numbered SLURM_LOCALID, so launch one task per GPU.
  3. A Cloud TPU VM: `import jax` sets jax._src.cloud_tpu_init.running_in_cloud_tpu_vm when libtpu
     is installed and TPU chips are on the PCI bus (it reads /sys, no backend starts). That flag is
     what jax's TPU cluster detection itself requires; environment variables alone do not tell a
     GCE TPU VM (its worker list comes from the metadata server), and TPU_WORKER_HOSTNAMES (GKE)
     is ignored by jax without the flag. There jax.distributed.initialize() runs with no arguments.
  4. None of these: one process, nothing to join (initialize is a no-op).

Failure behaviour (jax 0.10.2, measured on CPU with gloo collectives, see tests):
  - a peer that dies (SIGKILL) or hangs (SIGSTOP): the survivors' coordination-service client
    terminates the process (SIGABRT, "Terminating process because the JAX distributed service
    detected fatal errors") within about heartbeat_timeout_s; a collective in flight on a socket
    the dead peer closed raises first.
  - the coordinator unreachable: we probe its port first and raise DistributedError naming it.
  - not every process joining in time: jax would abort after ~2x the timeout with a misleading
    "another task died"; a watchdog here exits with a clear message at initialization_timeout_s.
  - hosts started with different JAX_NUM_PROCESSES: every host raises the same DistributedError.
  - a Python exception on one host: alone, its peers would wait in their next collective until
    jax's shutdown barrier gives up (300 s); train.py reports it through failfast.py, and every
    host exits within seconds naming it.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import jax
import numpy as np

from nanojaxgpt.config import DistributedConfig

log = logging.getLogger(__name__)

# jax's own init timeout is set this much beyond ours, so that our watchdog, with its clear
# message, fires before jax aborts with a generic one.
_JAX_TIMEOUT_GRACE_S = 30


class DistributedError(RuntimeError):
    """This process cannot join its job as configured; the message says what to change."""


@dataclass(frozen=True)
class Topology:
    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    platform: str  # "cpu", "gpu" or "tpu"

    def __str__(self) -> str:
        return (f"process {self.process_index} of {self.process_count}, "
                f"{self.local_device_count} local of {self.global_device_count} {self.platform} devices")


@dataclass(frozen=True)
class Launch:
    """What the environment says about this process's job (read before JAX starts a backend)."""

    kind: Literal["single", "env", "cluster", "tpu"]
    coordinator_address: str | None = None
    num_processes: int | None = None  # what this process was told, to check against the job
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    count_source: str = "JAX_NUM_PROCESSES"  # the variable num_processes came from


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env[name]
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedError(f"{name}={value} must be >= {minimum}")
    return value


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port, "
                               "e.g. 10.0.0.1:1234 (process 0's address and a free port)")
    return address


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A scheduler's task-count variable -> its task-id variable.
_ID_VARIABLE = {"SLURM_NTASKS": "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK"}


def _scheduler(env: Mapping[str, str]) -> str | None:
    """The task-count variable of a SLURM step or Open MPI job jax can detect, if > 1 task."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and _int_env(env, "SLURM_NTASKS", 1) > 1:
        return "SLURM_NTASKS"
    if ("OMPI_MCA_orte_hnp_uri" in env and "OMPI_COMM_WORLD_SIZE" in env
            and _int_env(env, "OMPI_COMM_WORLD_SIZE", 1) > 1):
        return "OMPI_COMM_WORLD_SIZE"
    return None


def _on_cloud_tpu() -> bool:
    from jax._src import cloud_tpu_init  # set at `import jax`; see the module docstring

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_launch(env: Mapping[str, str] | None = None, on_cloud_tpu: bool | None = None) -> Launch:
    """Read how this process joins its job from the environment; clear errors for bad values."""
    env = os.environ if env is None else env
    explicit = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = [v for v in explicit if env.get(v)]
    scheduler = _scheduler(env)
    local_ids = None
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        try:
            local_ids = tuple(int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(","))
        except ValueError:
            raise DistributedError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r} must be "
                                   "comma-separated integers, e.g. 0,1,2,3") from None
    # Under a scheduler the coordinator address alone may be given (jax takes the rest from it).
    if given and not (scheduler and given == ["JAX_COORDINATOR_ADDRESS"]):
        missing = [v for v in explicit if v not in given]
        if missing:
            raise DistributedError(
                f"{', '.join(given)} set but {', '.join(missing)} missing: a multi-process run needs "
                "all of JAX_COORDINATOR_ADDRESS (process 0's host:port), JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID (0..JAX_NUM_PROCESSES-1); unset them all to run one process")
        n = _int_env(env, "JAX_NUM_PROCESSES", 1)
        pid = _int_env(env, "JAX_PROCESS_ID", 0)
        if pid >= n:
            raise DistributedError(f"JAX_PROCESS_ID={pid} must be below JAX_NUM_PROCESSES={n}")
        return Launch("env", _check_address(env["JAX_COORDINATOR_ADDRESS"]), n, pid, local_ids)
    if scheduler is not None:
        count_var, id_var = scheduler, _ID_VARIABLE[scheduler]
        address = env.get("JAX_COORDINATOR_ADDRESS")
        return Launch("cluster", _check_address(address) if address else None,
                      _int_env(env, count_var, 1),
                      _int_env(env, id_var, 0) if id_var in env else None, local_ids,
                      count_source=count_var)
    if on_cloud_tpu if on_cloud_tpu is not None else _on_cloud_tpu():
        return Launch("tpu", local_device_ids=local_ids)
    return Launch("single", local_device_ids=local_ids)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Poll the coordinator's TCP port until it accepts a connection (process 0 may start late)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() + 0.5 > deadline:
                raise DistributedError(
                    f"could not reach the JAX coordinator at {address} within {timeout_s:g} s "
                    f"({e}): start process 0 (JAX_PROCESS_ID=0) on that host, check "
                    "JAX_COORDINATOR_ADDRESS and that the port is open between the hosts") from None
            time.sleep(0.5)


def _give_up(launch: Launch, timeout_s: float) -> None:
    """Watchdog: jax.distributed.initialize is still waiting for processes to join."""
    from jax._src import distributed as jax_distributed

    address = launch.coordinator_address or getattr(jax_distributed.global_state,
                                                    "coordinator_address", None)
    n = f"{launch.num_processes} " if launch.num_processes else ""
    hint = {"env": "start every host with the same JAX_NUM_PROCESSES and a distinct JAX_PROCESS_ID",
            "cluster": f"check that all {launch.count_source} tasks started",
            "tpu": "run the program on every worker of the slice (gcloud ... ssh --worker=all)"}
    msg = (f"nanojaxgpt.distributed: not all {n}processes joined the JAX coordinator at {address} "
           f"within {timeout_s:g} s ({launch.kind} launch, process id {launch.process_id}): "
           f"{hint.get(launch.kind, '')}; raise distributed.initialization_timeout_s if hosts "
           "start slowly")
    log.critical(msg)  # with no handler configured, logging's last resort prints it to stderr
    os._exit(1)  # jax's connect() is blocked in C++; there is no exception to raise into it


def _join(launch: Launch, cfg: DistributedConfig) -> None:
    timeout = cfg.initialization_timeout_s
    start = time.monotonic()
    if launch.coordinator_address and launch.process_id not in (None, 0):
        _wait_for_coordinator(launch.coordinator_address, timeout)
    remaining = max(1.0, timeout - (time.monotonic() - start))
    kwargs: dict = {"initialization_timeout": int(remaining) + _JAX_TIMEOUT_GRACE_S,
                    "heartbeat_timeout_seconds": cfg.heartbeat_timeout_s}
    if launch.kind == "env":  # the environment is authoritative: no scheduler guessing
        kwargs.update(coordinator_address=launch.coordinator_address,
                      num_processes=launch.num_processes, process_id=launch.process_id,
                      cluster_detection_method="deactivate")
    elif launch.coordinator_address:
        kwargs["coordinator_address"] = launch.coordinator_address
    if launch.local_device_ids is not None:
        kwargs["local_device_ids"] = list(launch.local_device_ids)
    if launch.coordinator_address and _is_loopback(launch.coordinator_address):
        kwargs["coordinator_bind_address"] = launch.coordinator_address  # else jax binds all interfaces
    watchdog = threading.Timer(remaining, _give_up, (launch, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:
        raise DistributedError(f"jax.distributed.initialize failed ({launch.kind} launch, "
                               f"coordinator {launch.coordinator_address or 'auto-detected'}): {e}") from e
    finally:
        watchdog.cancel()


def _check(launch: Launch, topo: Topology) -> None:
    """Fail loudly, on every host alike, when the job is not the one this process was told of."""
    per_process = collections.Counter(d.process_index for d in jax.devices())
    # Equal counts everywhere also make global_device_count == process_count * local_device_count.
    if len(per_process) != topo.process_count or set(per_process.values()) != {topo.local_device_count}:
        raise DistributedError(
            f"processes see different numbers of devices (process: devices = "
            f"{dict(sorted(per_process.items()))}): every host must expose the same number of "
            "accelerators; check JAX_LOCAL_DEVICE_IDS / CUDA_VISIBLE_DEVICES and the hardware")
    if topo.process_count == 1:
        if launch.num_processes not in (None, 1):
            raise DistributedError(f"{launch.count_source}={launch.num_processes} but this process "
                                   "runs alone")
        return
    from jax.experimental import multihost_utils

    # One tiny collective: every host sees what every other was told, so all raise together
    # (and a broken cross-host network shows up here, not in the first training step).
    told = np.array([topo.process_index, launch.num_processes or -1], np.int32)
    for index, n in np.asarray(multihost_utils.process_allgather(told)).reshape(-1, 2):
        if n not in (-1, topo.process_count):
            raise DistributedError(
                f"process {index} was started with {launch.count_source}={n}, but "
                f"{topo.process_count} processes joined the coordinator at "
                f"{launch.coordinator_address or 'auto-detected'}: give every host the same "
                f"{launch.count_source} (the number of processes in the job)")


def initialize(cfg: DistributedConfig) -> Topology:
    """Join the job described by the environment (or do nothing for one process); check it."""
    launch = detect_launch()
    if launch.kind != "single":
        _join(launch, cfg)
    devices = jax.devices()
    topo = Topology(process_index=jax.process_index(), process_count=jax.process_count(),
                    local_device_count=jax.local_device_count(), global_device_count=len(devices),
                    platform=devices[0].platform)
    _check(launch, topo)
    log.info("%s launch: %s", launch.kind, topo)
    return topo


def setup_logging(topology: Topology | None = None, level: int = logging.INFO) -> None:
    """Process 0 logs `level` and up; the others WARNING and up; "[process i/n]" when n > 1.

    Call after initialize() (without a topology it asks jax for the process index and count).
    """
    index, count = ((topology.process_index, topology.process_count) if topology
                    else (jax.process_index(), jax.process_count()))
    root = logging.getLogger()
    for handler in list(root.handlers):  # absl's and any basicConfig handler would print twice
        root.removeHandler(handler)
    prefix = f"[process {index}/{count}] " if count > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(prefix + "%(asctime)s %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if index == 0 else max(level, logging.WARNING))
    # jax's, Orbax's (absl) and gcsfs's (fsspec) INFO records would drown the progress lines.
    for name in ("jax", "absl", "fsspec"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
