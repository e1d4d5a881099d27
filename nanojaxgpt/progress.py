"""Progress of a run: throughput, MFU and ETA from the metrics of its log steps; the console line.

    progress = Progress(start=..., max_iters=..., tokens_per_step=..., flops_per_token=...,
                        n_devices=..., peak=peak_flops_per_device(jax.devices()[0]))
    values = progress.values(step, {"loss": ..., "lr": ..., "grad_norm": ...})  # TensorBoard tags
    log.info(progress.line(step, values))
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import SupportsFloat

import jax


class Progress:
    """Tokens/s and ms/step over the steps since the previous log step; ETA from this run's pace."""

    def __init__(self, *, start: int, max_iters: int, tokens_per_step: int, flops_per_token: float,
                 n_devices: int, peak: float | None) -> None:
        self.start, self.max_iters = start, max_iters
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.n_devices, self.peak = n_devices, peak
        self._last_step, self._last_time = start, time.time()
        self._first_done: float | None = None  # the pace counts from after the first step (compile)

    def values(self, step: int, vals: Mapping[str, float]) -> dict[str, float | None]:
        """The TensorBoard scalars of log step `step`, whose metrics `vals` were just read."""
        now = time.time()
        done = step + 1
        dt = (now - self._last_time) / max(1, done - self._last_step)  # the first includes compiling
        self._last_step, self._last_time = done, now
        self._first_done = self._first_done or now
        tps = self.tokens_per_step / dt
        return {"train/loss": vals["loss"], "train/lr": vals["lr"],
                "train/grad_norm": vals["grad_norm"], "perf/tokens_per_sec": tps,
                "perf/step_time_ms": dt * 1e3,
                "perf/mfu": mfu(self.flops_per_token, tps, self.n_devices, self.peak)}

    def line(self, step: int, values: Mapping[str, SupportsFloat | None]) -> str:
        return console_line(step, self.max_iters, values, time.time() - (self._first_done or time.time()),
                            step - self.start)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _format(name: str, value: float) -> str:
    short = name.rsplit("/", 1)[-1]
    label = name.removeprefix("train/").removeprefix("perf/").replace("/", " ")
    if short == "tokens_per_sec":
        return f"{value:,.0f} tok/s"
    if short == "step_time_ms":
        return f"{value:.1f} ms/step"
    if short == "mfu":
        return f"mfu {100 * value:.1f}%"
    if short == "lr":
        return f"lr {value:.2e}"
    if short.endswith("loss"):
        return f"{label} {value:.4f}"
    return f"{label} {value:.4g}"


def console_line(step: int, max_iters: int, values: Mapping[str, SupportsFloat | None],
                 elapsed_s: float, steps_done_this_run: int) -> str:
    """`step 120/5000 | loss 2.3456 | lr 6.00e-04 | 45,000 tok/s | ... | eta 1h02m`.

    The ETA extrapolates this run's own pace (elapsed_s over steps_done_this_run), so time spent
    by an earlier run before a resume does not distort it.
    """
    parts = [f"step {step}/{max_iters}"]
    parts += [_format(k, float(v)) for k, v in values.items() if v is not None]
    if steps_done_this_run > 0 and step < max_iters:
        parts.append(f"eta {_duration(elapsed_s / steps_done_this_run * (max_iters - step))}")
    return " | ".join(parts)


# Dense bfloat16 peak FLOP/s of one chip (TPU, by jax device_kind) or one GPU (by CUDA name).
_TPU_PEAK = {"TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v4 lite": 138e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
             "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12}
_GPU_PEAK = [("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
             ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12)]


def peak_flops_per_device(device: jax.Device) -> float | None:
    """Dense bf16 peak of one device, or None when unknown (CPU, an unlisted accelerator)."""
    return _peak_for(device.platform, device.device_kind)


def _peak_for(platform: str, kind: str) -> float | None:
    if platform == "tpu":
        return _TPU_PEAK.get(kind)
    if platform == "gpu":
        for name, peak in _GPU_PEAK:
            # whole words only: "L4" must not match an "L40S", nor "H200" a "GH200"
            if re.search(rf"(?<![A-Z0-9]){re.escape(name)}(?![A-Z0-9])", kind.upper()):
                return peak
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, n_devices: int,
        peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
    if peak is None or peak <= 0 or n_devices <= 0 or not math.isfinite(tokens_per_sec):
        return None
    return flops_per_token * tokens_per_sec / (n_devices * peak)
