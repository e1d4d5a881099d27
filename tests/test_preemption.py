"""preemption.py: a signal on one host stops every host at the same step, cleanly."""

from __future__ import annotations

import os
import re
import signal

import pytest

from nanojaxgpt.preemption import Preemption
from tests import multiprocess


def test_single_process_stops_at_the_step_after_the_signal():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:
        assert not preemption.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
        assert preemption.requested
        assert preemption.should_stop(1) and preemption.should_stop(2)
        assert preemption.stop_step == 1
    assert signal.getsignal(signal.SIGTERM) is before  # handlers put back


def test_second_ctrl_c_interrupts_at_once():
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.requested and preemption.should_stop(0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # give the handler bytecodes to run between
                pass


LOOP = """
import sys, time
from nanojaxgpt import distributed
from nanojaxgpt.config import DistributedConfig
from nanojaxgpt.preemption import Preemption
topology = distributed.initialize(DistributedConfig(initialization_timeout_s=20, heartbeat_timeout_s=10))
distributed.setup_logging(topology)
preemption = Preemption()
for step in range(10**9):
    if step == 50:
        print("ready", flush=True)
    if preemption.should_stop(step):
        # the training loop saves the checkpoint of `step` here, waits for it, and exits 0
        print(f"stopped at step {step} signal={preemption.requested}", flush=True)
        break
    time.sleep(0.01 * (1 + topology.process_index))  # hosts at different paces, like real ones
preemption.close()
sys.exit(0)
"""


def test_sigterm_to_one_host_stops_all_at_the_same_step():
    with multiprocess.launch(LOOP, 2) as job:
        job.wait_for_text("ready", timeout=60)
        job.send_signal(1, signal.SIGTERM)
        results = job.wait(timeout=60)
    steps = []
    for r in results:
        assert r.returncode == 0, r.output
        (stop,) = re.findall(r"stopped at step (\d+) signal=(\w+)", r.output)
        steps.append(int(stop[0]))
        assert stop[1] == str(r.process_id == 1)  # only process 1 got the signal
    print(f"both processes stopped at step {steps}")
    assert steps[0] == steps[1] >= 50
    assert "received SIGTERM" in results[1].output
