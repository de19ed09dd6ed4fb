"""Compile sleeptrain's Triton kernels for a GPU architecture on a machine without a GPU.

The Triton interpreter, which runs these kernels in the CPU tests, does not check what only
the compiler does: that loop bounds are constexprs, ``tl.dot``'s shape and dtype rules, the
register file. This tool runs the kernels' host code (``model.gdn_inputs=triton``'s
``kernels.gdn_inputs``, ``model.gdn_backend=short``'s ``kernels.gdn_short``; forward and
backward) at a config's GDN shapes with every kernel launch recorded instead of run (under
the interpreter, in a subprocess), then compiles each distinct launch with Triton's compiler
and its bundled ptxas for ``--arch`` (default 90: H100/H200) and prints registers, spills and
shared memory per launch. Exit status 1 if any launch fails to compile.
tests/test_compile_kernels.py runs it in CI.

    python tools/compile_kernels.py --config configs/rule110_paper.yaml
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs under TRITON_INTERPRET=1 (the kernels must be defined under it): the host code of each
# kernel option at the given shapes, forward and backward, with launches recorded, not run.
_RECORD = r"""
import inspect, json, sys
import torch
from triton.runtime.interpreter import InterpretedFunction

shapes = json.loads(sys.argv[1])
launches = []

def record(self, *args, grid, warmup, **kwargs):
    names = list(inspect.signature(self.fn).parameters)
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    args = {n: {"tensor": str(v.dtype).removeprefix("torch.")} if isinstance(v, torch.Tensor)
            else {"value": v} for n, v in vals.items()}
    launches.append({"kernel": f"{self.fn.__module__}:{self.fn.__name__}", "args": args,
                     "options": {k: v for k, v in kwargs.items() if k not in names}})

InterpretedFunction.run = record
from sleeptrain.model.kernels.gdn_inputs import gdn_inputs
from sleeptrain.model.kernels.gdn_short import MAX_T, short_gated_delta_rule

h, hv, dk, dv, km = (shapes[k] for k in ("h", "hv", "dk", "dv", "conv_kernel"))
r, cg = hv // h, 2 * dk + (hv // h) * dv

def backward(outs, leaves):
    outs = [o for o in outs if o.requires_grad]
    torch.autograd.grad(outs, leaves, [torch.zeros_like(o) for o in outs], allow_unused=True)

for t in shapes["tokens"]:
    for with_state in (True, False):
        for dtype in (torch.bfloat16, torch.float32):  # the projection's: autocast or fp32
            y = torch.zeros(1, t, h, cg + r * dv + 2 * r, dtype=dtype, requires_grad=True)
            st = (torch.zeros(1, h * cg, km - 1, dtype=dtype, requires_grad=True)
                  if with_state else None)
            w = torch.zeros(h * cg, km, requires_grad=True)
            a_log, dt = torch.zeros(hv, requires_grad=True), torch.zeros(hv, requires_grad=True)
            leaves = [x for x in (y, st, w, a_log, dt) if x is not None]
            for bt in shapes.get("input_blocks") or [None]:
                blk = {} if bt is None else {"block_t": bt}
                backward(gdn_inputs(y, st, w, a_log, dt, dk, r, dv, **blk)[:6], leaves)
        if t > MAX_T:
            continue
        for dtype in (torch.bfloat16, torch.float32):
            q, k = (torch.zeros(1, t, h, dk, dtype=dtype, requires_grad=True) for _ in "qk")
            v = torch.zeros(1, t, hv, dv, dtype=dtype, requires_grad=True)
            g, beta = (torch.zeros(1, t, hv, requires_grad=True) for _ in "gb")
            s0 = torch.zeros(1, hv, dk, dv, requires_grad=True) if with_state else None
            leaves = [x for x in (q, k, v, g, beta, s0) if x is not None]
            backward(short_gated_delta_rule(q, k, v, g, beta, None, s0), leaves)
print("RESULT" + json.dumps(launches))
"""

_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
          "int64": "i64", "int32": "i32", "bool": "i1"}


def record_launches(shapes: dict) -> list[dict]:
    """Every kernel launch of the options' host code at ``shapes`` (dict: h, hv, dk, dv,
    conv_kernel, tokens: a list of call lengths; optional input_blocks: the input kernels'
    tokens per program, default theirs), in launch order."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.run([sys.executable, "-c", _RECORD, json.dumps(shapes)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"compile_kernels: recording the launches failed:\n"
                           f"{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _signature(launch: dict) -> tuple:
    """The launch's kernel (the JIT function), its signature and constexprs."""
    module, name = launch["kernel"].split(":")
    fn, args = getattr(importlib.import_module(module), name), launch["args"]
    sig, consts = {}, {}
    for p in fn.params:
        a = args[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", a["value"]
        elif "tensor" in a:
            sig[p.name] = "*" + _TYPES[a["tensor"]]
        elif isinstance(a["value"], bool):
            sig[p.name] = "i1"
        elif isinstance(a["value"], int):
            sig[p.name] = "i32" if -2**31 <= a["value"] < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    return fn, sig, consts


def distinct(launches: list[dict]) -> list[dict]:
    """One launch per compiled kernel: launches that differ only in runtime values (lengths,
    strides) compile to the same binary."""
    seen: dict[str, dict] = {}
    for x in launches:
        _, sig, consts = _signature(x)
        key = json.dumps([x["kernel"], sig, consts, x["options"]], sort_keys=True)
        seen.setdefault(key, x)
    return list(seen.values())


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread from ``ptxas -v``, run with the ptxas Triton
    itself picks for ``arch`` (its bundled ones differ in register allocation); empty if
    that ptxas cannot be found or fails."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # another Triton layout: no report rather than a wrong one
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{arch}{'a' if arch >= 90 else ''}",
                               f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if proc.returncode != 0 or not regs:
        return {}
    return {"registers": int(regs.group(1)),
            "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else None}


def compile_launch(launch: dict, arch: int = 90) -> dict:
    """Compiles one recorded launch for ``sm_<arch>``: its registers, spill bytes (stores
    + loads), shared memory, or the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, consts = _signature(launch)
    options = {"num_warps": launch["options"].get("num_warps", 4)}
    if "num_stages" in launch["options"]:
        options["num_stages"] = launch["options"]["num_stages"]
    t0 = time.perf_counter()
    row = {"kernel": launch["kernel"], "constexprs": consts, "signature": sig, **options}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # the compiler's message is the report
        return {**row, "error": f"{type(e).__name__}: {str(e).strip()[-1500:]}"}
    return {**row, "shared_bytes": k.metadata.shared, **_ptxas_report(k.asm["ptx"], arch),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/rule110_paper.yaml")
    ap.add_argument("--tokens", default=None, help="comma list of call lengths (default: the "
                    "window length, 7 and 64: every row block of both kernels)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--warps", default=None, help="comma list: compile every launch at each "
                    "of these warp counts instead of the one the code launches with")
    ap.add_argument("--input-blocks", default=None, help="comma list: the Triton input "
                    "kernels' tokens per program (default: the code's, BLOCK_T)")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from sleeptrain.config import load_config

    cfg = load_config(a.config, a.overrides)
    m = cfg.model
    shapes = {"h": m.gdn_heads, "hv": m.gdn_v_heads or m.gdn_heads, "dk": m.gdn_head_dim,
              "dv": m.gdn_v_head_dim or m.gdn_head_dim, "conv_kernel": m.conv_kernel,
              "tokens": ([int(x) for x in a.tokens.split(",")] if a.tokens
                         else sorted({cfg.sleep.window_len, 7, 64})),
              "input_blocks": ([int(x) for x in a.input_blocks.split(",")]
                               if a.input_blocks else None)}
    launches = record_launches(shapes)
    if a.warps:
        launches = [{**x, "options": {**x["options"], "num_warps": int(w)}}
                    for x in launches for w in a.warps.split(",")]
    rows = [compile_launch(x, a.arch) for x in distinct(launches)]
    for r in rows:
        what = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                         if k in ("BT", "BC", "BK", "BV", "HAS_STATE", "HAS_S0", "PREC"))
        if "error" in r:
            print(f"FAILED {r['kernel']} [{what}] warps={r['num_warps']}: {r['error']}")
        else:
            print(f"ok     {r['kernel']} [{what}] warps={r['num_warps']}: "
                  f"{r.get('registers')} registers, {r.get('spill_bytes')} spill bytes, "
                  f"{r['shared_bytes']} shared bytes, {r['seconds']} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"arch": a.arch, "shapes": shapes, "rows": rows},
                                          indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
