"""Throughput, MFU and ETA of a run, and its console line."""

import time

import jax
import pytest

from nanojaxgpt import progress


def test_console_line_has_values_and_eta():
    line = progress.console_line(
        100, 1000, {"train/loss": 2.345678, "val/loss": 2.5, "train/lr": 6e-4,
                    "train/grad_norm": 0.51234, "perf/tokens_per_sec": 45678.9, "perf/mfu": None,
                    "perf/step_time_ms": 123.45}, elapsed_s=50.0, steps_done_this_run=50)
    assert line == ("step 100/1000 | loss 2.3457 | val loss 2.5000 | lr 6.00e-04 | grad_norm 0.5123 | "
                    "45,679 tok/s | 123.5 ms/step | eta 15m00s")  # 1 s/step * 900 steps to go
    assert "eta" not in progress.console_line(1000, 1000, {}, 10.0, 10)
    assert progress.console_line(5, 10, {"perf/mfu": 0.25}, 0.0, 0) == "step 5/10 | mfu 25.0%"


def test_peak_flops_and_mfu():
    assert progress.peak_flops_per_device(jax.devices()[0]) is None  # CPU
    cases = {("tpu", "TPU v4"): 275e12, ("tpu", "TPU v5 lite"): 197e12, ("tpu", "TPU v5"): 459e12,
             ("tpu", "TPU v6 lite"): 918e12, ("gpu", "NVIDIA H100 80GB HBM3"): 989e12,
             ("gpu", "NVIDIA H100 PCIe"): 756e12, ("gpu", "NVIDIA A100-SXM4-40GB"): 312e12,
             ("gpu", "NVIDIA GH200 480GB"): 989e12, ("gpu", "NVIDIA L4"): 121e12,
             ("gpu", "NVIDIA L40"): None, ("tpu", "TPU v9"): None}
    for (platform, kind), peak in cases.items():
        assert progress._peak_for(platform, kind) == peak, kind
    # GPT-2 124M: ~6 * 124e6 FLOPs per token; 100k tokens/s on 4 v4 chips
    assert progress.mfu(6 * 124e6, 1e5, 4, 275e12) == pytest.approx(6 * 124e6 * 1e5 / (4 * 275e12))
    assert progress.mfu(6 * 124e6, 1e5, 4, None) is None


def test_progress_values_follow_the_steps_since_the_last_log_step(monkeypatch):
    clock = iter([100.0, 101.0, 103.0, 103.0, 105.0, 105.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    p = progress.Progress(start=10, max_iters=30, tokens_per_step=1000, flops_per_token=6.0,
                          n_devices=2, peak=1e3)  # created at t=100
    v = p.values(10, {"loss": 3.0, "lr": 1e-3, "grad_norm": 1.0})  # t=101: step 10 done, 1 step
    assert v["perf/step_time_ms"] == pytest.approx(1000.0) and v["perf/tokens_per_sec"] == 1000
    assert v["perf/mfu"] == pytest.approx(6.0 * 1000 / (2 * 1e3))
    v = p.values(14, {"loss": 2.0, "lr": 1e-3, "grad_norm": 1.0})  # t=103: steps 11-14, 4 steps
    assert v["perf/step_time_ms"] == pytest.approx(500.0) and v["train/loss"] == 2.0
    # ETA from this run's pace after its first step: 2 s for 4 steps, 16 steps to go.
    assert p.line(14, v).endswith("eta 8s")
