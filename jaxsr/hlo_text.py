"""Reading XLA's optimized HLO text (`compiled.as_text()`): the while loops a program runs, the collectives and the
HBM traffic of a loop body, and the custom calls XLA's cost analysis leaves out. jaxsr.plan_compile reads its
compiled programs with it.

XLA's `cost_analysis` counts a while body once whatever its trip count, gives a custom call no FLOPs (and a
negative time), and its "bytes accessed" counts every operand and result whatever memory it is in: on TPU a
weight prefetched into on-chip memory (an async copy or slice into memory space S(1)) is counted when copied and
again when the matmul reads the copy. `loop_hbm_bytes` counts what moves to and from HBM instead.
"""

from __future__ import annotations

import collections
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_ARRAY = r"\b(f32|s32|u32|bf16|f16|s8|u8|pred|f64|s64)\[([\d,]*)\]"
_ARRAY_IN = _ARRAY + r"(\{[^}]*\})?"  # with its layout, which names a memory space other than HBM as S(n)
# Custom calls that are annotations, buffer bookkeeping or the halves of async collectives (whose time XLA's cost
# analysis leaves out like every collective's), not work with FLOPs it fails to count.
_BOOKKEEPING = {"AllocateBuffer", "AssumeGatherIndicesInBound", "Sharding", "SPMDFullToShardShape",
                "SPMDShardToFullShape", "AsyncCollectiveStart", "AsyncCollectiveDone"}


def computations(hlo: str) -> dict[str, list[str]]:
    """Optimized HLO text -> {computation name: its instruction lines}."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m[1]
            comps[name] = []
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _entry(hlo: str, comps: dict) -> str | None:
    m = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M)
    return m[1] if m and m[1] in comps else None


def _callees(line: str) -> list[str]:
    out = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        out += [x.strip().lstrip("%") for x in group.split(",")]
    return out


def array_bytes(type_str: str) -> int:
    """Bytes of every array in an HLO type string (a tuple's elements summed)."""
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(_ARRAY, type_str))


def _reachable(comps: dict, roots: list[str]) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            stack += _callees(line)
    return seen


def while_loops(hlo: str) -> dict:
    """The while loops of a program: `count` (all of them, nested ones included) and `top` (those of the entry
    computation), each one whose body XLA's cost analysis counts once."""
    comps = computations(hlo)
    top = sum(" while(" in line for line in comps.get(_entry(hlo, comps), []))
    return {"count": sum(" while(" in line for lines in comps.values() for line in lines), "top": top}


def custom_calls(hlo: str) -> dict[str, int]:
    """Custom-call targets of a program and how often each occurs, bookkeeping ones left out: XLA's cost analysis
    counts none of their FLOPs and gives each a negative time."""
    targets = re.findall(r' custom-call\(.*?custom_call_target="([^"]+)"', hlo)
    return dict(collections.Counter(t for t in targets if t not in _BOOKKEEPING))


def loop_collectives(hlo: str) -> dict:
    """Collectives reachable from the bodies of the entry computation's while loops (the decode loop), by kind,
    with the bytes their results hold per execution of the body (async `-start` ops counted once); `all_gathers`:
    the element count of each all-gather's result; `nested_while_loops`: loops inside those bodies (whose bodies
    XLA's cost analysis would count once per step too)."""
    comps = computations(hlo)
    entry = _entry(hlo, comps)
    bodies = [b for line in comps.get(entry, []) for b in re.findall(r"body=%?([\w.\-]+)", line)]
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    gathers, nested = [], 0
    for c in _reachable(comps, bodies):
        for line in comps[c]:
            nested += " while(" in line
            m = re.search(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
                          r"(-start)?\(", line)
            if m:
                # An async -start returns (operands, result): its last array is what the collective makes.
                shapes = re.findall(r"\b(?:f32|s32|u32|bf16|f16|s8|u8|pred|f64|s64)\[[\d,]*\]", m[1])
                result = shapes[-1] if m[3] and shapes else m[1]
                out[m[2]]["count"] += 1
                out[m[2]]["bytes"] += array_bytes(result)
                if m[2] == "all-gather":
                    gathers += [math.prod(int(d) for d in dims.split(",") if d)
                                for _, dims in re.findall(_ARRAY, result)]
    return {"while_loops": len(bodies), "nested_while_loops": nested, **out, "all_gathers": gathers}


def _hbm(type_str: str) -> int:
    """Bytes of the arrays of an HLO type string that live in HBM (memory space 0: no S(n) in their layout)."""
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims, layout in re.findall(_ARRAY_IN, type_str) if not re.search(r"S\(\d+\)", layout or ""))


def _instructions(lines: list[str]) -> dict[str, tuple[str, str, list[str], str]]:
    """{name: (result type, opcode, operand names, line)} of a computation's instructions."""
    out = {}
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", line)
        if m:
            out[m[1]] = (m[2], m[3], re.findall(r"%([\w.\-]+)", m[4].split(")")[0]), line)
    return out


_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id",
               "replica-id", "iota"}
_SLICES = {"dynamic-slice", "slice", "gather"}


def _fusion_traffic(fused: list[str], operand_types: list[str], result_type: str) -> tuple[int, int]:
    """(HBM bytes read, written) by one fusion: each operand read whole, except one that only slices or gathers
    read (their results' bytes) or that is the base of an in-place dynamic-update-slice (nothing); the result
    written whole, except an in-place update (the update's bytes)."""
    ins = _instructions(fused)
    params = {int(re.search(r"parameter\((\d+)\)", v[3])[1]): k for k, v in ins.items() if v[1] == "parameter"}
    root = next((k for k, v in ins.items() if v[3].lstrip().startswith("ROOT")), None)
    outs = ins[root][2] if root and ins[root][1] == "tuple" else [root]
    users = collections.defaultdict(list)
    for k, (_, op, operands, _) in ins.items():
        for i, o in enumerate(operands):
            users[o].append((k, op, i))
    read = write = 0
    for i, t in enumerate(operand_types):
        uses = users.get(params.get(i), [])
        if uses and all(op in _SLICES and j == 0 for _, op, j in uses):
            read += sum(_hbm(t) and array_bytes(ins[k][0]) for k, _, _ in uses)
        elif not (uses and all(op == "dynamic-update-slice" and j == 0 and k in outs
                               and all(u == root for u, _, _ in users.get(k, [])) for k, op, j in uses)):
            read += _hbm(t)  # (a base updated in place and not read by the fusion otherwise is not read)
    for (dt, dims, layout), o in zip(re.findall(_ARRAY_IN, result_type), outs):
        if not re.search(r"S\(\d+\)", layout or ""):
            in_place = o in ins and ins[o][1] == "dynamic-update-slice"
            write += array_bytes(ins[ins[o][2][1]][0] if in_place else f"{dt}[{dims}]")
    return read, write


def loop_hbm_bytes(hlo: str) -> dict[str, int]:
    """{"read", "write"}: the bytes one iteration of the entry computation's while loop(s) (the decode step) reads
    from and writes to HBM (see `hbm_bytes`)."""
    comps = computations(hlo)
    return _hbm_traffic(comps, [b for line in comps.get(_entry(hlo, comps), [])
                                for b in re.findall(r"body=%?([\w.\-]+)", line)])


def hbm_bytes(hlo: str) -> dict[str, int]:
    """{"read", "write"}: the bytes a program reads from and writes to HBM, by the memory spaces XLA:TPU assigned:
    an async copy or slice counts its HBM side once, an op reading a copy in on-chip memory nothing more; slices and
    gathers count what they take, an in-place dynamic-update-slice what it writes. A while body is counted once, as
    `cost_analysis` counts it."""
    comps = computations(hlo)
    return _hbm_traffic(comps, [_entry(hlo, comps)])


def _hbm_traffic(comps: dict, roots: list[str]) -> dict[str, int]:
    read = write = 0
    seen, stack = set(), list(roots)
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        ins = _instructions(comps[c])
        done = {v[2][0]: v[0] for v in ins.values() if v[1].endswith("-done") and v[2]}  # start -> its result
        for name, (typ, op, operands, line) in ins.items():
            src = [ins[o][0] for o in operands if o in ins]
            r = w = 0
            if op in ("while", "conditional", "call"):
                stack += _callees(line)
            elif op == "fusion":
                r, w = _fusion_traffic(comps.get(re.search(r"calls=%?([\w.\-]+)", line)[1], []), src, typ)
            elif op.endswith("-start"):  # async copy / slice / collective: its source and its destination
                dst = done.get(name, "")
                r = (array_bytes(dst) if op == "slice-start" else array_bytes(src[0])) if src and _hbm(src[0]) else 0
                w = _hbm(dst)
            elif op == "dynamic-update-slice":
                r = w = _hbm(typ) and array_bytes(src[1])  # the update, written in place
            elif op in _SLICES:
                r, w = (array_bytes(typ) if src and _hbm(src[0]) else 0), _hbm(typ)
            elif not op.endswith("-done") and op not in _NO_TRAFFIC:
                r, w = sum(_hbm(t) for t in src), _hbm(typ)
            read, write = read + r, write + w
    return {"read": read, "write": write}


__all__ = ["COLLECTIVES", "array_bytes", "computations", "custom_calls", "hbm_bytes", "loop_collectives",
           "loop_hbm_bytes", "while_loops"]
