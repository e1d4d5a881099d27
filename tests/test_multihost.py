"""Multi-host training end to end on 127.0.0.1: real processes joined by jax.distributed, the
data, checkpoints and TensorBoard logs on gs:// (a fake-gcs-server bucket), `python -m
nanojaxgpt.train` as the command. A SIGKILL of one process, a SIGTERM of all, a restart on
another topology, and misconfigurations that must fail fast with a clear message.

"No step's batch is read twice or skipped" is checked from the reads themselves: every child
records each training-batch read (step, global rows, CRC32 of each row's tokens; see
tests/multihost_runs.py). Per step the processes' rows must partition the global batch, every
step of the run's lineage (killed run up to its checkpoint, then the resumed run) must appear
exactly once, and each row's bytes must equal the uninterrupted run's.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass

import numpy as np
import pytest

from nanojaxgpt import checkpoint, config, prepare, train
from tests import multihost_runs as mr
from tools.gcs_server import GCSServer
from tools.latency_proxy import LatencyProxy
from tests.conftest import shakespeare

TOLERANCE = dict(rtol=2e-5, atol=2e-5)  # float32: another mesh sums in another order
HEARTBEAT_S = 5  # a dead peer makes the others exit within about this (--heartbeat_timeout_s)
RUN_TIMEOUT_S = 200  # one training run, start-up and compilation included, on a busy 2-core box


@pytest.fixture(scope="module")
def gcs_env(gcs_server, tmp_path_factory):
    """Emulator variables for this process and the children, plus a shared compilation cache.

    The cache (JAX's persistent one, keyed by program and device assignment) lets the many
    2-process runs below compile each program once instead of once per run and process; what
    runs is the same program, only who compiled it changes.
    """
    env = {**gcs_server.env(),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in gcs_server.env().items():
            mp.setenv(k, v)
        yield env


@pytest.fixture(scope="module")
def bucket(gcs_server, gcs_env) -> str:
    return gcs_server.create_bucket("multihost")


@pytest.fixture(scope="module")
def data_dir(bucket) -> str:
    out = f"{bucket}/shakespeare_char"
    prepare.prepare_char(shakespeare(), out)
    return out


@dataclass(frozen=True)
class Run:
    out: str
    results: list  # multiprocess.Result per process
    reads: list[mr.Read]


def _run(data_dir, out, *overrides, processes, devices, reads_dir, env) -> Run:
    with mr.launch(data_dir, out, *overrides, processes=processes, devices=devices,
                   reads_dir=reads_dir, env=env) as job:
        results = job.wait(timeout=RUN_TIMEOUT_S)
    for r in results:
        assert r.returncode == 0, f"process {r.process_id} failed:\n{r.output[-4000:]}"
    return Run(out, results, mr.train_reads(reads_dir))


@pytest.fixture(scope="module")
def reference(data_dir, bucket, gcs_env, tmp_path_factory) -> Run:
    """The uninterrupted run: 2 processes x 2 devices."""
    return _run(data_dir, f"{bucket}/reference", processes=2, devices=2,
                reads_dir=tmp_path_factory.mktemp("reference-reads"), env=gcs_env)


@dataclass(frozen=True)
class Killed:
    out: str
    complete_at_kill: list[int]  # checkpoints committed when the victim was killed
    victim: mr.multiprocess.Result
    survivor: mr.multiprocess.Result
    survivor_exit_s: float  # from the SIGKILL to the survivor's exit
    reads: list[mr.Read]


@pytest.fixture(scope="module")
def killed(data_dir, bucket, gcs_env, tmp_path_factory) -> Killed:
    """A 2 x 2 run whose coordinator (process 0) is SIGKILLed once a checkpoint is complete."""
    out = f"{bucket}/killed"
    reads_dir = tmp_path_factory.mktemp("killed-reads")
    with mr.launch(data_dir, out, f"--heartbeat_timeout_s={HEARTBEAT_S}", processes=2, devices=2,
                   reads_dir=reads_dir, env=gcs_env) as job:
        mr.wait_until(lambda: mr.complete_steps(out), RUN_TIMEOUT_S, "a complete checkpoint", job)
        job.send_signal(0, signal.SIGKILL)
        killed_at = time.monotonic()
        complete = mr.complete_steps(out)
        (survivor,) = job.wait(timeout=HEARTBEAT_S + 60, processes=[1])
        survivor_exit_s = time.monotonic() - killed_at
        (victim,) = job.wait(timeout=10, processes=[0])
    return Killed(out, complete, victim, survivor, survivor_exit_s, mr.train_reads(reads_dir))


def _assert_rows_partition_each_step(reads: list[mr.Read], steps: range, processes: int) -> None:
    """Each listed step read exactly once per process, the processes' rows disjoint and together
    the whole global batch: no host reads another host's rows."""
    table = mr.rows_by_step(reads)
    assert sorted(table) == list(steps), f"steps read: {sorted(table)}"
    for step in steps:
        per_process = table[step]
        assert sorted(per_process) == list(range(processes)), (step, dict(per_process))
        rows = sorted(r for p in per_process.values() for r in p)
        assert rows == list(range(mr.BATCH)), f"step {step}: rows {dict(per_process)}"
        assert all(len(p) == mr.BATCH // processes for p in per_process.values())


def _assert_same_bytes(reads: list[mr.Read], reference: Run) -> None:
    ref = mr.crc_by_row(reference.reads)
    for key, crc in mr.crc_by_row(reads).items():
        assert ref[key] == crc, f"(step, row) {key} read other tokens than the reference run"


def _assert_same_curves(out: str, reference: Run) -> None:
    """The TensorBoard curves equal the uninterrupted run's, each step exactly once.

    To float32 tolerance even on the same topology: each process compiles the step itself and
    two fresh compilations on the CPU backend were seen to differ by one ulp (4.8e-7 in the loss).
    """
    for tag in ("train/loss", "val/loss"):
        ours, ref = mr.gcs_curve(out, tag), mr.gcs_curve(reference.out, tag)
        assert sorted(ours) == sorted(ref), tag  # none missing, none extra
        np.testing.assert_allclose([ours[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)],
                                   err_msg=tag, **TOLERANCE)


def _resumed_from(output: str) -> int:
    m = re.search(r"resumed from step (\d+) ", output)
    assert m, f"no 'resumed from step N' in the log:\n{output[-3000:]}"
    return int(m.group(1))


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_reference_run_on_gcs(reference):
    loss = mr.gcs_curve(reference.out, "train/loss")
    assert sorted(loss) == list(range(mr.MAX_ITERS))
    assert loss[19] < loss[0] - 0.3  # it learns: ln(65) = 4.17 at the start
    assert sorted(mr.gcs_curve(reference.out, "val/loss")) == [0, 10, 20]
    assert mr.complete_steps(reference.out) == [5, 10, 15, 20]
    _assert_rows_partition_each_step(reference.reads, range(mr.MAX_ITERS), processes=2)
    assert "[process 0/2]" in reference.results[0].output
    assert "2 processes, 4 devices" in reference.results[0].output


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_sigkill_of_one_process_stops_the_other(killed):
    assert killed.victim.returncode == -signal.SIGKILL
    assert killed.survivor.returncode != 0, killed.survivor.output[-3000:]
    assert "detected fatal errors" in killed.survivor.output  # jax: another task died
    assert killed.survivor_exit_s < HEARTBEAT_S + 15, killed.survivor.output[-3000:]
    assert killed.complete_at_kill and max(killed.complete_at_kill) < mr.MAX_ITERS


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("processes,devices", [(4, 1), (1, 4)], ids=["4x1", "1x4"])
def test_restart_on_another_topology_continues_the_curve(killed, reference, data_dir, bucket,
                                                         gcs_env, tmp_path, processes, devices):
    out = f"{bucket}/restart-{processes}x{devices}"
    assert mr.copy_tree(killed.out, out)  # each topology resumes its own copy of the killed run
    resumed = _run(data_dir, out, processes=processes, devices=devices,
                   reads_dir=tmp_path / "reads", env=gcs_env)
    n = _resumed_from(resumed.results[0].output)
    # The latest checkpoint complete on gs:// when the run died (a later, half-written one is not).
    assert n == max(mr.complete_steps(killed.out)) and n in killed.complete_at_kill
    _assert_same_curves(out, reference)
    # Lineage of the final state: the killed run's steps before n, then the resumed run's.
    _assert_rows_partition_each_step([r for r in killed.reads if r.step < n], range(n), 2)
    _assert_rows_partition_each_step(resumed.reads, range(n, mr.MAX_ITERS), processes)
    _assert_same_bytes(killed.reads + resumed.reads, reference)


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_sigterm_to_all_saves_a_checkpoint_and_the_same_command_resumes(
        data_dir, reference, bucket, gcs_env, tmp_path):
    out = f"{bucket}/preempted"
    with mr.launch(data_dir, out, processes=2, devices=2, reads_dir=tmp_path / "reads1",
                   env=gcs_env) as job:
        mr.wait_until(lambda: mr.complete_steps(out), RUN_TIMEOUT_S, "a complete checkpoint", job)
        for i in range(2):
            job.send_signal(i, signal.SIGTERM)
        results = job.wait(timeout=60)
    stops = set()
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
        m = re.search(r"preempted: saved a complete checkpoint of step (\d+) in (\S+);", r.output)
        assert m and m.group(2) == out, r.output[-3000:]
        stops.add(int(m.group(1)))
    (n,) = stops  # every host stopped at the same step
    assert 5 <= n < mr.MAX_ITERS
    cfg = config.load(mr.train_runs.REPO / "configs/shakespeare_char.toml",
                      mr.train_argv(data_dir, out)[1:])
    with checkpoint.Checkpointer(out, cfg.checkpoint) as ckpt:
        assert ckpt.latest_step() == n
    preempted_reads = mr.train_reads(tmp_path / "reads1")
    # Reads run ahead of training by at most the feed's depth. What was read from step n on was
    # never trained on (the state of step n is saved): the rerun reads it again, the same bytes.
    assert n <= max(r.step for r in preempted_reads) <= n + train.REMOTE_FEED_DEPTH

    again = _run(data_dir, out, processes=2, devices=2, reads_dir=tmp_path / "reads2",
                 env=gcs_env)
    assert _resumed_from(again.results[0].output) == n
    _assert_same_curves(out, reference)
    _assert_rows_partition_each_step([r for r in preempted_reads if r.step < n], range(n), 2)
    _assert_rows_partition_each_step(again.reads, range(n, mr.MAX_ITERS), 2)
    _assert_same_bytes(preempted_reads + again.reads, reference)


@dataclass(frozen=True)
class Misconfigured:
    flags: list[str]
    launch: dict  # processes, devices, per_process environment
    message: str  # every process prints it; {coordinator} and {timeout} are filled in


INIT_TIMEOUT_S = 3  # --initialization_timeout_s of the two cases that wait for the coordinator
PER_PROCESS_3 = [{"JAX_NUM_PROCESSES": "3"}] * 2
MISCONFIGURED = {
    # Both hosts told 3 processes, 2 started: they wait for the third, then give up clearly.
    "process-count": Misconfigured(
        [f"--initialization_timeout_s={INIT_TIMEOUT_S}"],
        dict(processes=2, devices=2, per_process=PER_PROCESS_3),
        "not all 3 processes joined the JAX coordinator at {coordinator} within {timeout} s"),
    # Process 1 of 2 started alone: nobody listens at the coordinator address.
    "unreachable-coordinator": Misconfigured(
        [f"--initialization_timeout_s={INIT_TIMEOUT_S}"],
        dict(processes=1, devices=2,
             per_process=[{"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}]),
        "error: could not reach the JAX coordinator at {coordinator} within {timeout} s"),
    "mesh": Misconfigured(
        ["--mesh.data=3"], dict(processes=2, devices=2),
        "error: mesh data=3 fsdp=-1 tensor=1: 4 devices cannot be split"),
    "data-bucket": Misconfigured(
        ["--data_dir=gs://no-such-data-bucket/shakespeare_char"], dict(processes=2, devices=2),
        "error: no prepared data in gs://no-such-data-bucket/shakespeare_char"),
    "out-bucket": Misconfigured(
        ["--out_dir=gs://no-such-out-bucket/run"], dict(processes=2, devices=2),
        "error: out_dir gs://no-such-out-bucket/run: bucket gs://no-such-out-bucket does not "
        "exist"),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(MISCONFIGURED))
def test_misconfiguration_fails_fast_with_a_clear_message(case, data_dir, bucket, gcs_env,
                                                          tmp_path):
    bad = MISCONFIGURED[case]
    with mr.launch(data_dir, f"{bucket}/misconfigured-{case}", *bad.flags, reads_dir=tmp_path,
                   env=gcs_env, **bad.launch) as job:
        results = job.wait(timeout=60)
    expected = bad.message.format(coordinator=job.coordinator_address, timeout=INIT_TIMEOUT_S)
    for r in results:
        assert r.returncode != 0, r.output[-3000:]
        assert expected in r.output, r.output[-3000:]
        # Start-up (Python, JAX, the first gs:// reads) takes seconds on a busy machine; a hang
        # would take jax's own timeouts (30 s to 5 min).
        assert r.elapsed_s < INIT_TIMEOUT_S + 25, f"{case}: exited after {r.elapsed_s:.1f} s"
    assert not mr.train_reads(tmp_path)  # stopped before reading any training batch


@pytest.mark.timeout(150)
def test_an_error_on_one_host_stops_every_host_within_seconds(data_dir, bucket, gcs_env, tmp_path):
    """Process 1 talks to another storage server, whose bucket of the same name has no data: only it
    fails (a data error one host sees), with no test hook in the product. Process 0 read its data
    and waits for process 1 in a collective; it stops within seconds, naming process 1's error,
    not after the heartbeat timeout (100 s) or JAX's shutdown barrier (300 s)."""
    other = GCSServer()
    try:
        other.create_bucket(bucket.removeprefix("gs://"))
        with mr.launch(data_dir, f"{bucket}/one-host-fails", reads_dir=tmp_path, env=gcs_env,
                       processes=2, devices=2, per_process=[{}, other.env()]) as job:
            results = job.wait(timeout=120)
    finally:
        other.stop()
    _only_process_1_failed(results, f"error: no prepared data in {data_dir}: ")


def _only_process_1_failed(results: list, error: str) -> None:
    """Process 1 exited 2 with `error`, no traceback; process 0 exited 1 within 15 s of it, with
    process 1's error and its index."""
    failing, waiting = results[1], results[0]
    assert failing.returncode == 2 and error in failing.output, failing.output[-3000:]
    assert "Traceback" not in failing.output
    assert waiting.returncode == 1, waiting.output[-3000:]
    assert error in waiting.output, waiting.output[-3000:]
    assert "(process 1 failed first; process 0 stops too)" in waiting.output, waiting.output[-3000:]
    assert waiting.elapsed_s - failing.elapsed_s < 15, (waiting.elapsed_s, failing.elapsed_s)


@pytest.mark.timeout(150)
def test_a_host_whose_data_endpoint_stalls_stops_every_host(data_dir, bucket, gcs_server, gcs_env,
                                                            tmp_path):
    """Process 1 reaches its record data (array_record's GCS client) through a proxy that holds
    every request for 10 minutes: storage that answers nothing. Its first record read (of the
    evaluation set) is an error after data.read_timeout_s, naming the shard; process 0 then stops
    too, naming it."""
    stalled = LatencyProxy(target_port=gcs_server.port, delay_s=600)
    try:
        with mr.launch(data_dir, f"{bucket}/one-host-stalls", "--data.read_timeout_s=5",
                       reads_dir=tmp_path, env=gcs_env, processes=2, devices=2,
                       per_process=[{}, {"CLOUD_STORAGE_EMULATOR_ENDPOINT": stalled.url}]) as job:
            results = job.wait(timeout=120)
    finally:
        stalled.stop()
    _only_process_1_failed(
        results, f"error: reading shard {data_dir}/train-00000-of-00001.array_record took more "
                 "than 5 s (data.read_timeout_s)")
