"""distributed.py: real multi-process JAX jobs on 127.0.0.1 (2 processes x 2 fake CPU devices)."""

from __future__ import annotations

import re
import signal
import time

import jax
import pytest

from nanojaxgpt import distributed
from nanojaxgpt.config import DistributedConfig
from nanojaxgpt.distributed import DistributedError, Launch, detect_launch
from tests import multiprocess

INIT = """
import logging, sys, time
from nanojaxgpt import distributed
from nanojaxgpt.config import DistributedConfig
topology = distributed.initialize(DistributedConfig(initialization_timeout_s={init}, heartbeat_timeout_s={heartbeat}))
distributed.setup_logging(topology)
"""

# A training-like loop of cross-process collectives: a jitted sum over a global array.
COLLECTIVES = INIT + """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones(2, np.float32))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
for i in range(10**9):
    assert float(total(x)) == 4.0
    if i == 20:
        print("ready", flush=True)
"""


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS='127.0.0.1' must be host:port"),
    ({"JAX_LOCAL_DEVICE_IDS": "0,a"}, "JAX_LOCAL_DEVICE_IDS='0,a' must be comma-separated"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "x", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, "SLURM_NTASKS='x' is not an integer"),
    # jax would silently ignore a lone JAX_NUM_PROCESSES inside SLURM: refuse it
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0", "JAX_NUM_PROCESSES": "4"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"),
])
def test_bad_environment_names_the_variable(env, message):
    with pytest.raises(DistributedError, match=re.escape(message)):
        detect_launch(env, on_cloud_tpu=False)


def test_detect_launch_kinds():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert detect_launch(env, on_cloud_tpu=False) == Launch("env", "10.0.0.1:1234", 4, 3, (0, 1))
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert detect_launch(slurm, on_cloud_tpu=False) == Launch(
        "cluster", None, 16, 5, count_source="SLURM_NTASKS")
    # a batch script's single task (or `srun -n1`) is one process: nothing to join
    assert detect_launch(dict(slurm, SLURM_NTASKS="1"), on_cloud_tpu=False).kind == "single"
    # inside SLURM a coordinator address alone overrides jax's choice; the rest comes from SLURM
    partial = dict(slurm, JAX_COORDINATOR_ADDRESS="n1:5000")
    assert detect_launch(partial, on_cloud_tpu=False).coordinator_address == "n1:5000"
    assert detect_launch({}, on_cloud_tpu=True).kind == "tpu"
    assert detect_launch({}, on_cloud_tpu=False).kind == "single"


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    topology = distributed.initialize(DistributedConfig())
    assert topology == distributed.Topology(0, 1, 8, 8, "cpu")  # conftest's 8 fake devices
    assert not jax.distributed.is_initialized()


def test_two_processes_see_four_devices():
    code = INIT.format(init=20, heartbeat=10) + """
import jax
distributed.setup_logging()  # again, topology from jax: replaces the handler, no duplicate lines
logging.info("info from %d", topology.process_index)
logging.warning("warning from %d", topology.process_index)
print("TOPOLOGY", topology.process_index, topology.process_count, topology.local_device_count,
      topology.global_device_count, topology.platform, jax.device_count())
from nanojaxgpt import sharding
from nanojaxgpt.config import ConfigError, MeshConfig
mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, slices=2))  # a host per slice
print("SLICES", dict(mesh.shape), [sorted({d.process_index for d in row.flat}) for row in mesh.devices])
try:
    sharding.make_mesh(MeshConfig(data=1, fsdp=-1, slices=2))
except ConfigError as e:
    print("ERROR", e)
"""
    with multiprocess.launch(code, 2) as job:
        results = job.wait(timeout=60)
    for r in results:
        assert r.returncode == 0, r.output
        assert f"TOPOLOGY {r.process_id} 2 2 4 cpu 4" in r.output
        assert r.output.count(f"WARNING warning from {r.process_id}") == 1, r.output
        assert f"[process {r.process_id}/2]" in r.output
        # mesh.slices=2: the data axis is the outer one, one host's devices on each of its rows
        assert "SLICES {'data': 2, 'fsdp': 2, 'tensor': 1} [[0], [1]]" in r.output, r.output
        assert ("ERROR mesh.slices=2: mesh.data=1 must be a multiple of it (data parallelism "
                "crosses hosts); e.g. --mesh.data=2 --mesh.fsdp=-1") in r.output, r.output
    assert "info from 0" in results[0].output
    assert "info from 1" not in results[1].output  # only process 0 logs INFO


def test_mismatched_process_count_fails_fast_on_every_host():
    """Process 1 is told 3 processes, process 0 (the coordinator) 2: both stop, same message."""
    with multiprocess.launch(INIT.format(init=20, heartbeat=10), 2,
                             env_per_process=[{}, {"JAX_NUM_PROCESSES": "3"}]) as job:
        results = job.wait(timeout=60)
    for r in results:
        assert r.returncode == 1, r.output
        assert "process 1 was started with JAX_NUM_PROCESSES=3, but 2 processes joined" in r.output
        assert r.elapsed_s < 20  # well before the 20 s init timeout: not a timeout


def test_uneven_device_counts_fail_on_every_host():
    """A host that lost an accelerator (here: 1 fake device instead of 2) must not train."""
    one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    with multiprocess.launch(INIT.format(init=20, heartbeat=10), 2,
                             env_per_process=[{}, one_device]) as job:
        results = job.wait(timeout=60)
    for r in results:
        assert r.returncode == 1, r.output
        assert "processes see different numbers of devices (process: devices = {0: 2, 1: 1})" in r.output


def test_unreachable_coordinator_fails_within_timeout():
    with multiprocess.launch(INIT.format(init=3, heartbeat=10), 1, env={"JAX_NUM_PROCESSES": "2"},
                             env_per_process=[{"JAX_PROCESS_ID": "1"}]) as job:
        (r,) = job.wait(timeout=60)
    assert r.returncode == 1, r.output
    assert f"could not reach the JAX coordinator at {job.coordinator_address} within 3 s" in r.output
    assert r.elapsed_s < 3 + 10  # python and jax start-up on a busy machine


def test_missing_peer_fails_within_timeout_with_clear_message():
    """Process 0 waits for a process 1 that never starts: our watchdog, not jax's abort."""
    with multiprocess.launch(INIT.format(init=3, heartbeat=10), 1,
                             env={"JAX_NUM_PROCESSES": "2"}) as job:
        (r,) = job.wait(timeout=60)
    assert r.returncode == 1, r.output
    assert f"not all 2 processes joined the JAX coordinator at {job.coordinator_address}" in r.output
    assert r.elapsed_s < 3 + 10


@pytest.mark.parametrize("victim, sig", [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)],
                         ids=["worker-killed", "worker-hung", "coordinator-killed"])
def test_dead_peer_makes_survivor_exit_in_bounded_time(victim, sig):
    heartbeat = 5
    with multiprocess.launch(COLLECTIVES.format(init=20, heartbeat=heartbeat), 2) as job:
        job.wait_for_text("ready", timeout=60)
        job.send_signal(victim, sig)
        killed_at = time.monotonic()
        (survivor,) = job.wait(timeout=heartbeat + 30, processes=[1 - victim])
        took = time.monotonic() - killed_at
    print(f"survivor exited {survivor.returncode} {took:.1f} s after {sig.name} of process {victim}")
    assert survivor.returncode != 0
    assert "detected fatal errors" in survivor.output  # jax: "...another task died"
    assert took < heartbeat + 8, survivor.output[-3000:]
