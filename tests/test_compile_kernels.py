"""sleeptrain's Triton kernels compile for Hopper (sm_90) on this CPU machine
(tools/compile_kernels.py): what the Triton interpreter of the CPU kernel tests does not
check -- constexpr loop bounds, tl.dot's rules -- failed on an H100 once (2026-12-07) after
the interpreter tests had passed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compile_kernels.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compile_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@triton.jit
def _bound_in_kernel(x, A: tl.constexpr, B: tl.constexpr):
    # the bug the interpreter let through: a loop bound computed in the kernel is not a
    # constexpr for tl.static_range
    n = 2 * A + B
    acc = 0.0
    for i in tl.static_range(0, n, 4):
        acc += tl.load(x + i)
    tl.store(x, acc)


@triton.jit
def _bound_constexpr(x, N: tl.constexpr):
    acc = 0.0
    for i in tl.static_range(0, N, 4):
        acc += tl.load(x + i)
    tl.store(x, acc)


def test_compile_check_reports_what_the_compiler_refuses():
    compile_launch = _tool().compile_launch
    bad = compile_launch({"kernel": f"{__name__}:_bound_in_kernel",
                          "args": {"x": {"tensor": "float32"}, "A": {"value": 4},
                                   "B": {"value": 8}}, "options": {}})
    assert "not a constexpr" in bad["error"]
    good = compile_launch({"kernel": f"{__name__}:_bound_constexpr",
                           "args": {"x": {"tensor": "float32"}, "N": {"value": 16}},
                           "options": {"num_warps": 1}})
    assert "error" not in good and good["num_warps"] == 1 and good["shared_bytes"] >= 0


@pytest.mark.slow  # ~55 s on 2 cores with an empty Triton cache
def test_sleeptrain_kernels_compile_for_hopper(tmp_path):
    # the Rule 110 paper model's GDN shapes at its 24-token windows: both directions of the
    # input kernels and the short rule, with and without incoming states, bf16 and fp32
    # tensors (TF32 resp. IEEE products in the short rule)
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--config", "configs/rule110_paper.yaml",
                           "--tokens", "24", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"].split(".")[-1] for r in rows}
    assert kernels == {"gdn_inputs:_fwd", "gdn_inputs:_bwd_pre", "gdn_inputs:_bwd_conv",
                       "gdn_short:_fwd", "gdn_short:_bwd"}
    assert {r["constexprs"]["PREC"] for r in rows if "PREC" in r["constexprs"]} == \
        {"tf32", "ieee"}
    assert len(rows) == 20 and not any("error" in r for r in rows)
