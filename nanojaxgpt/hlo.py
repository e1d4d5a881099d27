"""What one device executes per step, read from its compiled HLO text (compiled.as_text()).

XLA's cost analysis counts every while-loop body once: the layer scan, the accumulation scan and
the TPU's windowed-einsum loops run many times, so its FLOPs are ~15x low for a GPT-2 step. Here
each computation is weighted by how often it runs: a while body by its trip count (the constant
its condition compares the counter with, or XLA's known_trip_count) times its caller's count.

Per computation this sums: matmul FLOPs (dot, convolution, cuBLAS gemm calls), collective bytes
by kind, and HBM traffic (operands + results of every top-level instruction: a fusion reads
its inputs from HBM and writes its output there).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
          "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_NAME = re.compile(r"%[\w.\-]+")
_CALLED = re.compile(r"(calls|to_apply|body|condition|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%[\w.\-]+)")
# Custom calls that are compute kernels XLA cannot see into (Pallas/Mosaic, cuDNN, Triton);
# others (AllocateBuffer, sharding markers) compute nothing.
_KERNEL = re.compile(r"tpu_custom_call|cudnn|triton|mosaic", re.IGNORECASE)
# Multislice: XLA:TPU compiles one slice's program and sends what crosses slices to the host's
# DCN runtime, as `send` ops tagged with the collective they are part of.
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
# No data moves for these (or it is counted where it is used).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
               "iota", "add-dependency"}


@dataclass
class Instr:
    name: str
    type: str  # the result type text: "bf16[4,8]{1,0}" or a tuple "(f32[], ...)"
    op: str
    operands: list[str]
    args: str  # the text inside the parentheses (a constant's value)
    attrs: str


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    fused: bool = False  # the body of a fusion: its instructions never touch HBM on their own

    def shapes(self) -> dict[str, str]:
        return {i.name: i.type for i in self.instrs}


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a result type (one, or a tuple's elements)."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)]


def nbytes(type_text: str) -> float:
    return float(sum(_BYTES[dt] * math.prod(dims) for dt, dims in arrays(type_text)))


def _split_type(rest: str) -> tuple[str, str]:
    """'(a, (b)) op(...)' or 'f32[2]{0} op(...)' -> (type text, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _instr(line: str) -> Instr | None:
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    name, eq, rest = line.partition(" = ")
    if not eq or not name.startswith("%"):
        return None
    type_text, rest = _split_type(rest)
    op, paren, rest = rest.partition("(")
    if not paren:
        return None
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            end = i
            break
    return Instr(name, type_text, op.strip(), _NAME.findall(rest[:end]), rest[:end], rest[end + 1:])


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """Computations by name (in the order they appear: callees first) and the entry's name."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = re.match(r"(ENTRY )?(%[\w.\-]+) .*\{$", line)
            if m:
                current = Computation(m.group(2))
                comps[current.name] = current
                entry = current.name if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            ins = _instr(line)
            if ins is not None:
                current.instrs.append(ins)
    return comps, entry


def _trip_count(whl: Instr, comps: dict[str, Computation]) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', whl.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=(%[\w.\-]+)", whl.attrs)
    consts = [i for i in comps[cond.group(1)].instrs if i.op == "constant"] if cond else []
    values = {int(c.args) for c in consts if re.fullmatch(r"-?\d+", c.args.strip())}
    if len(values) != 1:
        return None
    limit = values.pop()
    counter = [i for i in comps[cond.group(1)].instrs if i.op == "get-tuple-element"]
    index = re.search(r"index=(\d+)", counter[0].attrs) if len(counter) == 1 else None
    step = _step(comps, re.search(r"body=(%[\w.\-]+)", whl.attrs), int(index.group(1))) if index else 1
    return -(-limit // step)  # the counter starts at 0 (XLA's own loops and scans)


def _step(comps: dict[str, Computation], body: re.Match | None, index: int) -> int:
    """How much the body adds to loop counter `index` per trip: 1 for scans, 2 for XLA:TPU's
    bidirectional windowed einsums (each trip does two shards' work)."""
    if body is None or body.group(1) not in comps:
        return 1
    by_name = {i.name: i for i in comps[body.group(1)].instrs}
    root = comps[body.group(1)].instrs[-1] if by_name else None
    if root is None or root.op != "tuple" or len(root.operands) <= index:
        return 1
    update = by_name.get(root.operands[index])
    if update is None or update.op != "add":
        return 1
    for a, b in (update.operands, update.operands[::-1]):
        old, inc = by_name.get(a), by_name.get(b)
        if (old is not None and inc is not None and old.op == "get-tuple-element"
                and re.search(rf"\bindex={index}\b", old.attrs) and inc.op == "constant"
                and re.fullmatch(r"\d+", inc.args.strip()) and int(inc.args) > 0):
            return int(inc.args)
    return 1


def multipliers(comps: dict[str, Computation], entry: str) -> tuple[dict[str, float], list[str]]:
    """How many times each computation runs per execution of the entry; loops without a known
    trip count count once (their names are returned, so the caller can say so)."""
    mult: dict[str, float] = defaultdict(float)
    mult[entry] = 1.0
    unknown = []
    for comp in reversed(list(comps.values())):  # callers appear after their callees
        m = mult.get(comp.name, 0.0)
        if not m:
            continue
        for ins in comp.instrs:
            trips = 1
            if ins.op == "while":
                trips = _trip_count(ins, comps)
                if trips is None:
                    unknown.append(ins.name)
                    trips = 1
            for key, names in _CALLED.findall(ins.attrs):
                for callee in _NAME.findall(names):
                    if callee in comps:
                        if key == "calls" and ins.op in ("fusion",):
                            comps[callee].fused = True
                        if key == "to_apply":  # a reduction's scalar combiner
                            continue
                        mult[callee] += m * (trips if key in ("body", "condition") else 1)
    return mult, unknown


def _window(attrs: str) -> dict[str, list[int]]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out: dict[str, list[int]] = {}
    for part in (m.group(1).split() if m else []):
        key, _, val = part.partition("=")
        if key == "pad":
            out["pad_lo"] = [int(p.split("_")[0]) for p in val.split("x")]
        else:
            out[key] = [int(v) for v in val.split("x")]
    return out


def _valid_pairs(out: int, win: int, inp: int, stride: int, pad_lo: int, lhs_dil: int,
                 rhs_dil: int) -> int:
    """(output position, window position) pairs of one spatial dim that land on a real input
    element (not padding, not a hole of an lhs dilation): XLA's own convolution FMA count."""
    o = np.arange(out)[:, None]
    w = np.arange(win)[None, :]
    p = o * stride + w * rhs_dil - pad_lo
    return int(np.count_nonzero((p >= 0) & (p <= (inp - 1) * lhs_dil) & (p % lhs_dil == 0)))


def conv_flops(ins: Instr, shapes: dict[str, str]) -> float:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not labels or len(ins.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    (_, lhs), (_, rhs), (_, out) = (arrays(shapes[ins.operands[0]])[0],
                                    arrays(shapes[ins.operands[1]])[0], arrays(ins.type)[0])
    win = _window(ins.attrs)
    n = len([c for c in out_l if c.isdigit()])
    pairs = 1
    for k in range(n):
        d = str(k)
        size = win.get("size", [1] * n)[k]
        pairs *= _valid_pairs(out[out_l.index(d)], size, lhs[lhs_l.index(d)],
                              win.get("stride", [1] * n)[k], win.get("pad_lo", [0] * n)[k],
                              win.get("lhs_dilate", [1] * n)[k], win.get("rhs_dilate", [1] * n)[k])
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs


def dot_flops(out_type: str, lhs_type: str, contracting: list[int]) -> float:
    (_, out), (_, lhs) = arrays(out_type)[0], arrays(lhs_type)[0]
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _flops(ins: Instr, shapes: dict[str, str]) -> float:
    if ins.op == "convolution":
        return conv_flops(ins, shapes)
    if ins.op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        dims = [int(d) for d in m.group(1).split(",") if d] if m else []
        return dot_flops(ins.type, shapes[ins.operands[0]], dims)
    if ins.op == "custom-call" and re.search(r'custom_call_target="__cublas\$(lt\$matmul|gemm)', ins.attrs):
        m = re.search(r"backend_config=(\{.*\})", ins.attrs)
        try:
            cfg = json.loads(m.group(1)) if m else {}
        except json.JSONDecodeError:
            cfg = {}
        dims = cfg.get("gemm_backend_config", cfg).get("dot_dimension_numbers", {})
        contracting = [int(d) for d in dims.get("lhs_contracting_dimensions", [])]
        return dot_flops(ins.type, shapes[ins.operands[0]], contracting)
    return 0.0


def _read(fused: Computation, name: str, comps: dict[str, Computation], depth: int = 0) -> float:
    """Bytes of value `name` that a fusion really reads: only the slices where every use is a
    dynamic-slice (also through bitcasts and nested fusions), else all of it."""
    full = nbytes(fused.shapes().get(name, ""))
    users = [i for i in fused.instrs if name in i.operands]
    if not users or depth > 8:
        return full
    total = 0.0
    for u in users:
        if u.op == "dynamic-slice" and u.operands[0] == name:
            total += nbytes(u.type)
        elif u.op == "bitcast":
            total += _read(fused, u.name, comps, depth + 1)
        elif u.op == "fusion" and (callee := re.search(r"calls=(%[\w.\-]+)", u.attrs)):
            inner = comps[callee.group(1)]
            params = {int(i.args): i.name for i in inner.instrs if i.op == "parameter"}
            total += sum(_read(inner, params[k], comps, depth + 1)
                         for k, o in enumerate(u.operands) if o == name and k in params)
        else:
            return full
    return min(total, full)


def _sliced_reads(fused: Computation, comps: dict[str, Computation]) -> tuple[dict[int, float], float | None]:
    """Inside a fusion: the bytes read of each parameter, and the bytes written when the fusion
    updates a buffer in place (a dynamic-update-slice root) instead of writing all of it."""
    params = {i.name: int(i.args) for i in fused.instrs if i.op == "parameter"}
    reads = {index: _read(fused, name, comps) for name, index in params.items()}
    by_name = {i.name: i for i in fused.instrs}
    root = fused.instrs[-1] if fused.instrs else None
    while root is not None and root.op == "bitcast" and root.operands[0] in by_name:
        root = by_name[root.operands[0]]
    written = None
    if root is not None and root.op == "dynamic-update-slice":
        written = nbytes(fused.shapes().get(root.operands[1], ""))
        if root.operands[0] in params:
            reads[params[root.operands[0]]] = 0.0  # the buffer is updated where it lies
    return reads, written


def _traffic(ins: Instr, shapes: dict[str, str], comps: dict[str, Computation]) -> float:
    """HBM bytes one top-level instruction moves: its operands read, its result written; a
    slice of a big buffer reads the slice, an in-place update writes the update."""
    operand = [nbytes(shapes.get(o, "")) for o in ins.operands]
    if ins.op in ("dynamic-slice", "dynamic-update-slice") and len(operand) < 2:
        return 0.0
    if ins.op == "dynamic-slice":
        return 2.0 * nbytes(ins.type)
    if ins.op == "dynamic-update-slice":
        return 2 * operand[1]
    written = nbytes(ins.type)
    if ins.op == "fusion":
        callee = re.search(r"calls=(%[\w.\-]+)", ins.attrs)
        if callee and callee.group(1) in comps:
            reads, upd = _sliced_reads(comps[callee.group(1)], comps)
            operand = [reads.get(k, b) for k, b in enumerate(operand)]
            written = written if upd is None else upd
    once = {o: b for o, b in zip(ins.operands, operand)}  # a value passed twice is read once
    return float(written + sum(once.values()))


def collective_kind(op: str) -> str | None:
    base = op.removesuffix("-start")
    return base if base in COLLECTIVES else None


@dataclass(frozen=True)
class Executed:
    """Per device, per execution of the entry computation."""
    flops: float  # matmul FLOPs (dots and convolutions), loops counted by their trips
    collective_bytes: dict[str, float]  # by kind: the larger of an op's input and output
    collective_counts: dict[str, float]
    cross_slice_bytes: dict[str, float]  # of collective_bytes, what goes between slices (DCN)
    hbm_bytes: float
    unknown_loops: list[str]  # while loops whose trip count could not be read (counted once)
    custom_calls: list[str]  # kernels whose FLOPs are not counted (Pallas, cuDNN)


def analyze(text: str) -> Executed:
    comps, entry = parse(text)
    mult, unknown = multipliers(comps, entry)
    flops, hbm = 0.0, 0.0
    coll_b: dict[str, float] = defaultdict(float)
    coll_n: dict[str, float] = defaultdict(float)
    cross: dict[str, float] = defaultdict(float)
    kernels = set()
    for comp in comps.values():
        m = mult.get(comp.name, 0.0)
        if not m:
            continue
        shapes = comp.shapes()
        for ins in comp.instrs:
            flops += m * _flops(ins, shapes)
            kind = collective_kind(ins.op)
            if kind:
                operand = sum(nbytes(shapes.get(o, "")) for o in ins.operands)
                result = max((_BYTES[dt] * math.prod(d) for dt, d in arrays(ins.type)), default=0)
                coll_b[kind] += m * max(operand, result)
                coll_n[kind] += m
            if ins.op == "send" and (dcn := _MEGASCALE.search(ins.attrs)):
                kind = dcn.group(1).lower().replace("_", "-")  # ALL_REDUCE -> all-reduce
                payload = next(iter(arrays(ins.type)), None)  # (data, context, token)
                sent = _BYTES[payload[0]] * math.prod(payload[1]) if payload else 0
                coll_b[kind] += m * sent
                coll_n[kind] += m
                cross[kind] += m * sent
            if ins.op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
                if target and _KERNEL.search(target.group(1)):
                    kernels.add(target.group(1))
            if not comp.fused and ins.op not in _NO_TRAFFIC and not ins.op.endswith("-done"):
                hbm += m * _traffic(ins, shapes, comps)
    return Executed(flops, dict(coll_b), dict(coll_n), dict(cross), hbm, unknown, sorted(kernels))
