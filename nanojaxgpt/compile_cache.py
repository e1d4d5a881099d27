"""JAX's persistent compilation cache, so a restart on the same topology loads its compiled steps
instead of compiling them again (the main start-up cost after a preemption).

    train.compilation_cache_dir = ""      # out_dir/compile_cache: on gs:// every host shares it
    train.compilation_cache_dir = "off"   # compile every time

JAX_COMPILATION_CACHE_DIR in the environment, where set, is used instead of the default. An entry
is keyed by the program, the compiler options and the devices, so a different mesh or topology
compiles again and adds its own entries.
"""

from __future__ import annotations

import logging
import threading

import jax
from jax import monitoring

from nanojaxgpt import storage

log = logging.getLogger("nanojaxgpt.compile_cache")

SUBDIR = "compile_cache"
OFF = "off"
_HITS = "/jax/compilation_cache/cache_hits"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"

_counts: dict[str, float] = {_HITS: 0, _SAVED: 0.0}
_lock = threading.Lock()
_listening = False


def _count(event: str, **_: object) -> None:
    if event == _HITS:
        with _lock:
            _counts[event] += 1


def _add(event: str, seconds: float, **_: object) -> None:
    if event == _SAVED:
        with _lock:
            _counts[event] += seconds


def directory(setting: str, out_dir: str) -> str | None:
    """Where the cache is for this run, or None when it is off."""
    if setting == OFF:
        return None
    if setting:
        return setting
    return jax.config.jax_compilation_cache_dir or storage.join(out_dir, SUBDIR)


def enable(setting: str, out_dir: str) -> str | None:
    """Point JAX at the run's cache (before anything compiles) and count what it serves."""
    global _listening
    path = directory(setting, out_dir)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None and not _listening:
        monitoring.register_event_listener(_count)
        monitoring.register_event_duration_secs_listener(_add)
        _listening = True
    return path


def served() -> tuple[int, float]:
    """(compiles loaded from the cache, seconds of compiling that saved) in this process so far.
    JAX caches only compiles that took over a second (jax_persistent_cache_min_compile_time_secs)."""
    with _lock:
        return int(_counts[_HITS]), _counts[_SAVED]
