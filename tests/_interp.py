"""Helpers of the tests that run sleeptrain's Triton kernels on CPU under the Triton
interpreter (tests/test_gdn_inputs_kernel.py, tests/test_gdn_short.py): ``run_interpreted``
runs a script in a subprocess with ``TRITON_INTERPRET=1`` (it must be set before the kernels
are defined, so not in the test process); ``step_errors`` runs inside such a script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str) -> dict:
    """The JSON the script prints after ``RESULT`` (it fails the test if the script does)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def step_errors(overrides: list[str], key: str, base: str, fast: str) -> list[list[float]]:
    """A whole window-sequential step (N=2, windows of 5, the last one short) of a tiny fp32
    AG model with ``key=fast`` against ``key=base``, same weights and batch: for the loss and
    every parameter gradient, [0, the largest difference / the largest base entry]."""
    import torch

    import sleeptrain
    from sleeptrain.sleep.runner import windowed_loss
    from tests.conftest import TINY

    over = [*[x for x in TINY if "params_dtype" not in x], "model.params_dtype=float32",
            "model.pattern=AG", "sleep.window_len=5", "sleep.passes=2", *overrides]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.long)
    out = []
    for choice in (base, fast):
        cfg = sleeptrain.load_config(None, [*over, f"{key}={choice}"])
        model = sleeptrain.build_model(cfg, device="cpu", seed=0)
        loss = windowed_loss(model, tokens, mask, cfg.sleep).loss
        loss.backward()
        out.append([loss.detach().double()] + [p.grad.double() for p in model.parameters()])
    return [[0.0, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()]
            for a, b in zip(*out, strict=True)]
