"""The README's code blocks run as written (those that run on a CPU).

Every fenced block in README.md is preceded by ``<!-- readme-test: run ... -->`` or
``<!-- readme-test: skip (why) -->``. Python blocks marked ``run`` are executed in order in
one process; bash blocks marked ``run`` are executed line by line with bash in a scratch
directory that holds the repository's README, docs, configs and tools, with ``python``,
``sleeptrain`` and ``torchrun`` on PATH. The only changes to the commands: placeholders
(``HF_DIR``) become real paths, and ``sleeptrain train`` lines get a step cap appended (the
README's full runs take minutes; their times are measured separately, docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme-test: (run|skip)[^\n]*-->\n)?```(\w*)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str | None, str, str]]:
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(
        (ROOT / "README.md").read_text())]


def _commands(body: str) -> list[str]:
    """Shell command lines of a block, backslash continuations joined, comments dropped."""
    lines, cur = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        cmd = cur.split("  #")[0].strip()
        if cmd and not cmd.startswith("#"):
            lines.append(cmd)
        cur = ""
    return lines


def test_every_code_block_says_whether_it_runs():
    blocks = _blocks()
    assert len(blocks) >= 8
    unmarked = [body.splitlines()[0] for mode, _, body in blocks if mode is None]
    assert not unmarked, f"README code blocks without a readme-test marker: {unmarked}"


def test_python_snippets_run(tmp_path):
    code = "\n".join(body for mode, lang, body in _blocks() if mode == "run" and lang == "python")
    assert "windowed_loss" in code and "generate(" in code
    script = tmp_path / "readme_snippets.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _workdir(tmp: Path, append: str) -> tuple[Path, dict[str, str]]:
    """A scratch directory with the repository's files and shims for the README's programs;
    ``append`` is added to every ``sleeptrain train`` command."""
    work = tmp / "work"
    work.mkdir()
    for name in ("README.md", "docs", "configs", "tools"):
        (work / name).symlink_to(ROOT / name)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    py = sys.executable
    shims = {
        "python": f'exec "{py}" "$@"',
        "sleeptrain": f'if [ "$1" = train ]; then exec "{py}" -m sleeptrain.cli "$@" {append}; '
                      f'fi\nexec "{py}" -m sleeptrain.cli "$@"',
        "torchrun": f'exec "{py}" -m torch.distributed.run "$@"',
    }
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return work, env


def _run_block(body: str, work: Path, env: dict[str, str], subs: dict[str, str]) -> None:
    for cmd in _commands(body):
        for word, value in subs.items():
            cmd = re.sub(rf"\b{word}\b", value, cmd)
        proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _block_with(text: str) -> str:
    found = [body for mode, lang, body in _blocks() if mode == "run" and lang == "bash"
             and text in body]
    assert len(found) == 1, f"one runnable bash block with {text!r} expected, got {len(found)}"
    return found[0]


@pytest.mark.slow
def test_shard_commands_run(tmp_path):
    work, env = _workdir(tmp_path, "train.steps=4")
    _run_block(_block_with("make_shards.py"), work, env, {})
    assert (work / "data" / "docs" / "manifest.json").is_file()
    assert (work / "runs" / "lm_tiny_shards" / "checkpoints" / "latest").is_file()


@pytest.mark.slow
def test_retrofit_commands_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=16, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf_llama"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(hf_dir)
    work, env = _workdir(tmp_path, "train.steps=2 data.seq_len=128 data.workers=0")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--text",
                    str(ROOT / "README.md"), "--split-blank", "--tokenizer", "byte",
                    "--max-samples", "8", "--out", str(work / "data" / "corpus")],
                   check=True, capture_output=True, env=env, timeout=300)
    _run_block(_block_with("import-hf"), work, env, {"HF_DIR": str(hf_dir)})
    assert (work / "hf_out" / "modeling_sleeptrain.py").is_file()
    assert (work / "runs" / "qwen_ft_tp2" / "checkpoints" / "latest").is_file()
