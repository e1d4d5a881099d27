"""launch/supervise.py against a fake gcloud that plays a slice's life; the launch scripts' syntax."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = ["--poll=0", "--backoff=0.01", "--max-backoff=0.02", "--create-timeout=30"]
TRAIN = ["configs/gpt2_124m.toml", "--data_dir=gs://b/owt", "--out_dir=gs://b/runs/x",
         "--learning_rate=3e-4"]


def supervise(tmp_path: Path, scenario: dict, *flags: str, train=TRAIN) -> tuple[int, str, list]:
    """Run the launcher with the fake gcloud first on PATH: (exit status, log, gcloud calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "gcloud"
    shutil.copy(REPO / "tests" / "fake_gcloud.py", fake)
    fake.chmod(0o755)
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "supervise.py"), *flags, *FAST,
                           "--", *train], env=env, capture_output=True, text=True, timeout=120)
    calls_file = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    return proc.returncode, proc.stderr, calls


def starts(calls: list) -> list[str]:
    return [c[c.index("--command") + 1] for c in calls if "--command" in c and "setsid" in c[-1]]


def verbs(calls: list, verb: str) -> list:
    return [c for c in calls if c[:1] == ["compute"] and len(c) > 3 and c[3] == verb]


def test_spot_slice_preempted_twice_and_deleted_once_comes_back_until_done(tmp_path):
    runs = [{"after": 2, "then": "preempt"}, {"after": 1, "then": "delete"},
            {"after": 3, "then": "preempt"}, {"after": 2, "then": "done"}]
    code, log, calls = supervise(tmp_path, {"boot": 2, "runs": runs}, "--name=gpt2",
                                 "--zone=us-central2-b", "--accelerator=v4-32", "--spot",
                                 f"--log-file={tmp_path / 'supervise.log'}")
    assert code == 0, log
    assert (tmp_path / "supervise.log").read_text() == log
    creates = verbs(calls, "create")
    assert len(creates) == 4  # the first slice and one after each loss
    assert all(c[:4] == ["compute", "tpus", "tpu-vm", "create"] and "--spot" in c for c in creates)
    assert len(verbs(calls, "delete")) == 2  # the preempted ones; the deleted one is gone already
    commands = starts(calls)
    assert len(commands) == 4 and len(set(commands)) == 1  # the same command every time
    assert "python -m nanojaxgpt.train configs/gpt2_124m.toml --data_dir=gs://b/owt " \
           "--out_dir=gs://b/runs/x --learning_rate=3e-4;" in commands[0]
    assert len([c for c in calls if c[3:4] == ["scp"]]) == 4  # set up on every new slice
    lines = log.strip().splitlines()
    assert all(line[:4].isdigit() and line[19] == "Z" for line in lines)  # every line has a UTC timestamp
    assert "slice gpt2 is PREEMPTED" in log and "slice gpt2 is NOT_FOUND" in log
    assert lines[-1].endswith(
        "stopped after 3 restarts: gs://b/runs/x/DONE exists: the run is complete")


def test_an_unhealthy_slice_is_replaced(tmp_path):
    """READY with a health other than HEALTHY (a host under maintenance): the slice is deleted and
    created again, and the same command resumes on it."""
    runs = [{"after": 1, "then": "unhealthy"}, {"after": 1, "then": "done"}]
    code, log, calls = supervise(tmp_path, {"runs": runs}, "--name=gpt2", "--zone=z")
    assert code == 0, log
    assert "slice gpt2 is UNHEALTHY" in log
    assert len(verbs(calls, "delete")) == 1 and len(verbs(calls, "create")) == 2
    commands = starts(calls)
    assert len(commands) == 2 and len(set(commands)) == 1


def test_training_that_keeps_failing_gives_up_after_the_retry_limit(tmp_path):
    runs = [{"after": 1, "then": "exit 1"}] * 10
    code, log, calls = supervise(tmp_path, {"runs": runs}, "--name=gpt2", "--zone=z",
                                 "--max-retries=2")
    assert code == 1, log
    assert len(starts(calls)) == 3  # the first try and two retries
    assert len(verbs(calls, "create")) == 1  # a healthy slice is reused, only training restarts
    assert "training exited 1 without marking gs://b/runs/x complete" in log
    assert log.strip().splitlines()[-1].split(" ", 1)[1].startswith("stopped after 2 restarts: gave up after 3 failures")


def test_queued_best_effort_two_slices(tmp_path):
    runs = [{"after": 1, "then": "preempt"}, {"after": 1, "then": "done"}]
    code, log, calls = supervise(tmp_path, {"runs": runs}, "--name=big", "--zone=z",
                                 "--accelerator=v5litepod-16", "--best-effort", "--num-slices=2")
    assert code == 0, log
    creates = verbs(calls, "create")
    assert len(creates) == 2
    assert all(c[:3] == ["compute", "tpus", "queued-resources"] and "--best-effort" in c
               and c[c.index("--node-count") + 1] == "2" for c in creates)
    assert "slice big is SUSPENDED" in log
    nodes = {c[4] for c in calls if c[3:4] == ["ssh"] and "setsid" in c[-1]}
    assert nodes == {"big-0", "big-1"}  # the command runs on every worker of both slices
    assert all("--mesh.slices=2" in c for c in starts(calls))


def test_a_complete_run_creates_nothing(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"exists": False, "state": "", "creating": 0,
                                                     "run": -1, "polls": 0, "rc": None, "done": True}))
    code, log, calls = supervise(tmp_path, {"runs": []}, "--name=gpt2", "--zone=z")
    assert code == 0, log
    assert not verbs(calls, "create") and "the run is complete" in log


def test_local_out_dir_completion(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "DONE").write_text('{"step": 1}\n')
    code, log, calls = supervise(tmp_path, {"runs": []}, "--name=gpt2", "--zone=z",
                                 train=["c.toml", f"--out_dir={out}"])
    assert code == 0 and not calls, log


@pytest.mark.parametrize("args,message", [
    (["--zone=z", "--", "c.toml", "--out_dir=gs://b/r"], "--name"),
    (["--name=n", "--zone=z", "--", "c.toml"], "needs --out_dir"),
    (["--name=n", "--zone=z"], "give the training command"),
    (["--name=n", "--zone=z", "--spot", "--best-effort", "--", "c.toml", "--out_dir=o"], "not allowed"),
    (["--name=n", "--zone=z", "--num-slices=0", "--", "c.toml", "--out_dir=o"], "at least 1"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "supervise.py"), *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_node.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)


SRUN = """#!/usr/bin/env bash
# fake srun: one task per node of a 2-node job, SLURM_PROCID each; SIGTERM goes on to the tasks.
echo "srun $*" >> "$CALLS"
while [[ $1 == --* ]]; do shift; done
pids=() got=0
trap 'got=1; kill -TERM "${pids[@]}"' TERM
for i in 0 1; do SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do
  wait $p; r=$?
  while [ $got -eq 1 ] && [ $r -gt 128 ]; do wait $p; r=$?; [ $r -eq 127 ] && r=0 && break; done
  [ $r -ne 0 ] && rc=$r
done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$CALLS"
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a\\ngpu-b\\n'
exit 0
"""
PYTHON = """#!/usr/bin/env bash
# fake python: records how it was started, then behaves as $FAKE_TRAIN says.
echo "python $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*" >> "$CALLS"
case $FAKE_TRAIN in
  fail) [ "$JAX_PROCESS_ID" = 1 ] && exit 1; exit 0 ;;
  wait) sleep 30 > /dev/null & s=$!; trap 'kill $s; exit 0' TERM
        touch "$CALLS.started.$JAX_PROCESS_ID"; wait ;;
esac
exit 0
"""


def sbatch(tmp_path: Path, train: str, restarts: int = 0, signal_after_start: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("fakepython", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "FAKE_TRAIN": train, "PYTHON": "fakepython", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_RESTART_COUNT": str(restarts), "MAX_RESTARTS": "3"}
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "slurm_gpu.sbatch"), "configs/gpt2_124m.toml",
                             "--out_dir=gs://b/r x"], env=env, stdout=subprocess.PIPE, text=True)
    if signal_after_start:
        deadline = time.time() + 20
        while not all(Path(f"{calls}.started.{i}").exists() for i in (0, 1)):
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, calls.read_text().splitlines()


def test_sbatch_runs_one_task_per_node_and_ends_when_training_finishes(tmp_path):
    code, out, calls = sbatch(tmp_path, "ok")
    assert code == 0, out
    started = sorted(c for c in calls if c.startswith("python"))
    train = "-m nanojaxgpt.train configs/gpt2_124m.toml --out_dir=gs://b/r x"
    assert started == [f"python gpu-a:24242 2 {rank} {train}" for rank in (0, 1)]
    assert not any("requeue" in c for c in calls) and "done" in out


def test_sbatch_requeues_after_a_failure_and_after_sigterm_but_not_past_the_limit(tmp_path):
    for d in "abc":
        (tmp_path / d).mkdir()
    code, out, calls = sbatch(tmp_path / "a", "fail")
    assert code == 0 and "scontrol requeue 4242" in calls, out
    code, out, calls = sbatch(tmp_path / "b", "wait", signal_after_start=True)
    assert code == 0 and "scontrol requeue 4242" in calls and "SIGTERM" in out, out
    assert "step ended with 0 (signaled=1)" in out  # the tasks saved and exited 0
    code, out, calls = sbatch(tmp_path / "c", "fail", restarts=3)
    assert code == 1 and not any("requeue" in c for c in calls) and "giving up" in out, out


DOCKER = """#!/usr/bin/env bash
echo "docker $*" >> "$CALLS"
[ "$1" = ps ] && [ -n "${RUNNING:-}" ] && echo abc123
exit 0
"""


def docker(tmp_path: Path, running: bool = False, **env_vars: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(DOCKER)
    (bin_dir / "docker").chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "HOME": str(tmp_path), **({"RUNNING": "1"} if running else {}), **env_vars}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_node.sh"), "configs/gpt2_124m.toml",
                           "--out_dir=runs/a"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    return proc, calls.read_text().splitlines()


def test_gpu_node_restarts_on_failure_only_and_follows_the_log(tmp_path):
    proc, calls = docker(tmp_path, NUM_NODES="2", NODE_RANK="1", COORDINATOR="10.0.0.2:1234")
    assert proc.returncode == 0, proc.stderr
    run = next(c for c in calls if c.startswith("docker run"))
    assert "-d --name nanojaxgpt-1 --restart on-failure:10 " in run and "--rm" not in run
    assert "-e JAX_COORDINATOR_ADDRESS=10.0.0.2:1234 -e JAX_NUM_PROCESSES=2 -e JAX_PROCESS_ID=1" in run
    assert run.endswith("nanojaxgpt configs/gpt2_124m.toml --out_dir=runs/a")
    assert calls[-1] == "docker logs -f nanojaxgpt-1"


def test_gpu_node_refuses_to_start_a_second_container_of_a_running_run(tmp_path):
    proc, calls = docker(tmp_path, running=True)
    assert proc.returncode == 2 and "already running" in proc.stderr
    assert not any(c.startswith(("docker run", "docker rm")) for c in calls)


def test_tpu_vm_sh_run_hands_over_to_the_supervisor(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"exists": False, "state": "", "creating": 0,
                                                     "run": -1, "polls": 0, "rc": None, "done": False}))
    runs = [{"after": 1, "then": "done"}]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(REPO / "tests" / "fake_gcloud.py", bin_dir / "gcloud")
    (bin_dir / "gcloud").chmod(0o755)
    (tmp_path / "scenario.json").write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path),
           "TPU_NAME": "t", "ZONE": "z", "ACCELERATOR": "v5litepod-16", "QUEUED": "1", "SPOT": "1",
           "SUPERVISE_ARGS": " ".join(FAST)}
    proc = subprocess.run(["bash", str(REPO / "launch" / "tpu_vm.sh"), "run", *TRAIN], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    create = verbs(calls, "create")[0]
    assert create[:3] == ["compute", "tpus", "queued-resources"] and "--spot" in create
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-16"
