"""CPU smoke test of tools/bench_infer.py: a tiny model at two batch sizes, the rates it
reports and the RULER-table estimate computed from them; bad arguments are named."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_infer.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("one_process", [False, True])
def test_bench_infer_reports_rates_and_the_ruler_estimate(tmp_path, one_process):
    # each point in a fresh process, or (--one-process) all on one model in the tool's own
    out = tmp_path / "bench.json"
    contexts = "80,48" if one_process else "80"  # the order of points: checked once
    proc = _run("--preset", "tiny", "--contexts", contexts, "--batches", "1,3", "--window", "32",
                "--decode", "3", "--decode-warmup", "1", "--json", str(out),
                *(["--one-process"] if one_process else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    # batch by batch, each batch's contexts in the order given
    assert [(r["context"], r["batch"]) for r in rows] == (
        [(80, 1), (48, 1), (80, 3), (48, 3)] if one_process else [(80, 1), (80, 3)])
    rows = [r for r in rows if r["context"] == 80]
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_ms_median"] > 0 and r["decode_ms_mean"] > 0
        assert ("rss_growth_mib" in r) == (not one_process)  # a process-wide peak: fresh only
        # 80 tokens = 2 full windows + 16: both full windows sleep in prefill; the last one's
        # 16 + 1 warm-up + 3 decode tokens stay in it (no sleep in decode)
        assert r["windows_slept"] == 2 * r["batch"] and not r["cuda_graph"]
    for e, r in zip(res["estimate"], rows, strict=True):
        n = 13 * 100
        want = (n * 1048576 / r["prefill_tok_s"]
                + math.ceil(n / r["batch"]) * 128 * r["decode_ms_mean"] / 1e3) / 3600
        assert e["batch"] == r["batch"] and math.isclose(e["1048576"], want, rel_tol=1e-9)
        assert 0 < e["131072"] < e["1048576"]
    assert "RULER table estimate, CPU-hours" in proc.stdout


def test_bench_infer_names_bad_arguments():
    proc = _run("--batches", "1,0")
    assert proc.returncode != 0 and "--batches '1,0': every value must be >= 1" in proc.stderr
    proc = _run("--contexts", "4k")
    assert proc.returncode != 0 and "--contexts '4k': a comma list of integers" in proc.stderr
    proc = _run("--window", "0")
    assert proc.returncode != 0 and "--window must be >= 1, got 0" in proc.stderr
