"""Compile a run's real train step for a slice that is not there, and say what it would cost.

program.build(cfg, mesh) on compile-only devices (nanojaxgpt.topology) -> lower -> compile with
the real XLA:TPU (or XLA:GPU) compiler. An HBM overflow is the compiler's own RESOURCE_EXHAUSTED,
as on hardware. The compiled per-device HLO then gives what each chip executes (nanojaxgpt.hlo),
and a roofline turns that into a step time: the slowest of compute, HBM traffic and collectives,
assuming they overlap perfectly (a bound, not a prediction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import re
import time
from dataclasses import asdict, dataclass

from jax.sharding import Mesh

from nanojaxgpt import hlo, program, sharding, topology
from nanojaxgpt import model as gpt
from nanojaxgpt.config import Config

LIBTPU_LOCK = "/tmp/libtpu.lock"  # one process at a time may open libtpu on a machine
LIBTPU_OWN_LOCK = "/tmp/libtpu_lockfile"
GIB = 2**30


class OutOfMemory(RuntimeError):
    """The step does not fit the chip's HBM; the message says what to change."""

    exit_code = 3

    def __init__(self, message: str, needed_gib: float | None, hbm_gib: float):
        super().__init__(message)
        self.needed_gib, self.hbm_gib = needed_gib, hbm_gib

    def to_json(self, topology_name: str) -> dict:
        return {"topology": topology_name, "fits": False, "per_chip_gib": self.needed_gib,
                "hbm_gib": self.hbm_gib, "error": str(self)}


@contextlib.contextmanager
def libtpu_lock(topo: topology.Topology):
    """Hold LIBTPU_LOCK for a TPU compile: a second process opening libtpu fails outright."""
    if topo.platform != "tpu":
        yield
        return
    with open(LIBTPU_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {LIBTPU_LOCK} (another process is using libtpu)", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        # A process that opened libtpu without LIBTPU_LOCK holds a lock on libtpu's own lock
        # file (which stays behind when it exits): opening libtpu then fails, so wait for it.
        if _locked(LIBTPU_OWN_LOCK):
            print(f"waiting for the process that has {LIBTPU_OWN_LOCK} locked", flush=True)
            while _locked(LIBTPU_OWN_LOCK):
                time.sleep(2)
        yield


def _locked(path: str) -> bool:
    """Some process holds a lock (flock or fcntl) on `path`, as /proc/locks lists them."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            return any(line.split()[5].endswith(f":{inode}") for line in f if len(line.split()) > 5)
    except (OSError, IndexError):
        return False


def make_mesh(cfg: Config, topo: topology.Topology, devices: list) -> Mesh:
    """The run's mesh on the topology's devices; a multislice topology sets mesh.slices, so the
    data axis spans its slices (the data-centre network) as in the run."""
    mesh = cfg.mesh
    if mesh.slices == 1 and topo.num_slices > 1:
        mesh = dataclasses.replace(mesh, slices=topo.num_slices)
    return sharding.make_mesh(mesh, devices)


@dataclass(frozen=True)
class Report:
    topology: str
    chip: str
    chips: int
    mesh: dict
    seq_per_chip: float  # sequences per chip per micro-step
    tokens_per_step: int
    argument_gib: float
    temp_gib: float
    output_gib: float
    per_chip_gib: float  # arguments + outputs not aliased to them + temporaries
    hbm_gib: float
    fits: bool
    headroom: float  # 1 - per_chip / hbm
    collective_gib: dict  # executed per chip per step, by kind
    slices: int
    cross_slice_gib: dict  # the part of it between slices, over the data-centre network
    flops_per_chip: float  # matmul FLOPs executed per chip per step (compiled HLO, loops counted)
    model_flops_per_chip: float  # 6N + 12LET per token, the MFU numerator
    hbm_traffic_gib: float
    compute_s: float
    memory_s: float
    collective_s: float
    roofline_s: float
    mfu: float
    compile_s: float
    notes: list

    def to_json(self) -> dict:
        return asdict(self)


def _oom_message(cfg: Config, topo: topology.Topology, seq: float, detail: str) -> str:
    t, m = cfg.train, cfg.model
    fixes = ["lower --batch_size and raise --gradient_accumulation_steps by the same factor "
             "(the same tokens per step)"]
    if m.remat != "full":
        fixes.append("--remat=full")
    if cfg.mesh.fsdp != -1:
        fixes.append("shard the state over every chip with --mesh.fsdp=-1 --mesh.data=1")
    return (f"{topo.name}: the train step does not fit in {topo.chip.hbm_gib} GiB per chip "
            f"({detail}) at {seq:g} sequences per chip (batch_size={t.batch_size}, "
            f"gradient_accumulation_steps={t.gradient_accumulation_steps}, remat={m.remat}, "
            f"mesh data={cfg.mesh.data} fsdp={cfg.mesh.fsdp} tensor={cfg.mesh.tensor}); "
            + "; or ".join(fixes))


def compile_step(cfg: Config, topo: topology.Topology):
    """(compiled train step, mesh, seconds to compile); raises OutOfMemory."""
    devices = topology.devices(topo)
    mesh = make_mesh(cfg, topo, devices)
    prog = program.build(cfg, mesh)
    seq = cfg.train.batch_size / program.batch_shards(mesh)
    t0 = time.perf_counter()
    try:
        compiled = prog.steps.train.lower(prog.abstract, prog.batch).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises its own JaxRuntimeError
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        # "the total memory required for HLO temporaries (36.81G) exceeds available HBM (30.75G)"
        need = re.search(r"\(([\d.]+)([GM])\) exceeds available HBM", text)
        needed = float(need.group(1)) / (1024 if need.group(2) == "M" else 1) if need else None
        detail = (f"the compiler needs {needed:.2f} GiB of temporaries" if needed is not None
                  else text.splitlines()[0][:200])
        raise OutOfMemory(_oom_message(cfg, topo, seq, detail), needed, topo.chip.hbm_gib) from None
    return compiled, mesh, time.perf_counter() - t0


def report(cfg: Config, topo: topology.Topology, hlo_file: str | None = None) -> Report:
    """Compile the train step of cfg for topo and measure it; raises OutOfMemory.
    hlo_file: where to write the compiled per-device HLO text (to read it yourself)."""
    with libtpu_lock(topo):
        compiled, mesh, seconds = compile_step(cfg, topo)
        mem = compiled.memory_analysis()
        text = compiled.as_text()
    if hlo_file:
        with open(hlo_file, "w") as f:
            f.write(text)
    chips = mesh.devices.size
    seq = cfg.train.batch_size / program.batch_shards(mesh)
    run = hlo.analyze(text)
    arg, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    out = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated state: updated in place
    total = (arg + out + temp) / GIB
    tokens = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.model.block_size
    chip = topo.chip
    model_flops = gpt.flops_per_token(cfg.model) * tokens / chips
    coll = {k: v / GIB for k, v in sorted(run.collective_bytes.items())}
    cross = {k: v / GIB for k, v in sorted(run.cross_slice_bytes.items())}

    def wire(by_kind: dict[str, float]) -> float:
        # A ring all-reduce moves each byte twice (reduce-scatter, then all-gather); others once.
        return sum(b * (2 if k == "all-reduce" else 1) for k, b in by_kind.items())

    compute_s, memory_s = run.flops / chip.peak_flops, run.hbm_bytes / chip.hbm_bytes_per_s
    dcn = wire(run.cross_slice_bytes)
    collective_s = ((wire(run.collective_bytes) - dcn) / chip.ici_bytes_per_s
                    + dcn / topo.dcn_bytes_per_s)
    roofline = max(compute_s, memory_s, collective_s)
    notes = []
    if run.unknown_loops:
        notes.append(f"{len(run.unknown_loops)} loops of unknown trip count counted once")
    if run.custom_calls:
        notes.append("FLOPs of custom kernels not counted: " + ", ".join(run.custom_calls))
    if topo.num_slices > 1:
        notes.append(f"collectives across slices timed at the DCN's {topo.dcn_bytes_per_s / 1e9:g} "
                     "GB/s per chip, the rest at ICI speed")
    if topo.platform == "cuda":
        notes.append("XLA:GPU compile-only reports no HBM overflow: fits = total <= HBM")
    return Report(
        topology=topo.name, chip=chip.name, chips=chips, mesh=dict(mesh.shape), seq_per_chip=seq,
        tokens_per_step=tokens, argument_gib=arg / GIB, temp_gib=temp / GIB, output_gib=out / GIB,
        per_chip_gib=total, hbm_gib=chip.hbm_gib, fits=total <= chip.hbm_gib,
        headroom=1 - total / chip.hbm_gib, collective_gib=coll, slices=topo.num_slices,
        cross_slice_gib=cross,
        flops_per_chip=run.flops,
        model_flops_per_chip=model_flops, hbm_traffic_gib=run.hbm_bytes / GIB,
        compute_s=compute_s, memory_s=memory_s, collective_s=collective_s, roofline_s=roofline,
        mfu=model_flops / (roofline * chip.peak_flops) if roofline > 0 else math.nan,
        compile_s=seconds, notes=notes)


def format_report(r: Report) -> str:
    coll = ", ".join(f"{k} {v:.2f}" for k, v in r.collective_gib.items()) or "none"
    lines = [
        f"{r.topology}: {r.chips} x {r.chip}, mesh {r.mesh}, compiled in {r.compile_s:.0f} s",
        f"  per chip: {r.seq_per_chip:g} sequences per micro-step; {r.tokens_per_step:,} tokens per step in all",
        f"  memory per chip: arguments {r.argument_gib:.2f} GiB + temporaries {r.temp_gib:.2f} + "
        f"outputs {r.output_gib:.2f} = {r.per_chip_gib:.2f} of {r.hbm_gib} GiB HBM "
        f"({'fits' if r.fits else 'DOES NOT FIT'}, {100 * r.headroom:.0f}% headroom)",
        f"  collectives per chip per step (GiB): {coll}",
        *([f"  of which between the {r.slices} slices (DCN): "
           + (", ".join(f"{k} {v:.2f}" for k, v in r.cross_slice_gib.items()) or "none")]
          if r.slices > 1 else []),
        f"  FLOPs per chip per step: {r.flops_per_chip:.3e} executed (matmuls), "
        f"{r.model_flops_per_chip:.3e} model (6N + 12LET)",
        f"  roofline step: {1e3 * r.roofline_s:.1f} ms = max(compute {1e3 * r.compute_s:.1f}, "
        f"HBM {1e3 * r.memory_s:.1f} for {r.hbm_traffic_gib:.0f} GiB, collectives "
        f"{1e3 * r.collective_s:.1f}); implied MFU {100 * r.mfu:.0f}%",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)

