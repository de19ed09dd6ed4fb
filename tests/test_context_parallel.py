"""Context parallelism (``parallel.cp``): every window's tokens split over the CP ranks.

The composition math against the sequential recurrence (one process, float64), then torchrun
with gloo: CP=2, CP=4 and TP=2 x CP=2 give the logits, loss and gradients of one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sleeptrain.model.kernels import (
    chunk_transition,
    compose_chunk_states,
    recurrent_gated_delta_rule,
)
from sleeptrain.parallel.context import ContextParallel, chunk_bounds
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


# --- the composition math, one process ------------------------------------------------------


def _rule_inputs(b: int, t: int, h: int, hv: int, dk: int, dv: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64, "generator": gen}
    q = torch.randn(b, t, h, dk, **f64)
    k = torch.nn.functional.normalize(torch.randn(b, t, h, dk, **f64), dim=-1)
    v = torch.randn(b, t, hv, dv, **f64)
    g = -torch.rand(b, t, hv, **f64)
    beta = torch.rand(b, t, hv, **f64)
    s0 = torch.randn(b, hv, dk, dv, **f64)
    return [x.requires_grad_(True) for x in (q, k, v, g, beta, s0)]


def _chunked_window(q, k, v, g, beta, s0, bounds, backend="chunked"):
    """The window's outputs and final state the CP way: every chunk's (M, E), composed from
    s0, then each chunk run from its composed incoming state."""
    pieces = [(a, e) for a, e in zip(bounds[:-1], bounds[1:], strict=True)]
    maps = [chunk_transition(q[:, a:e], k[:, a:e], v[:, a:e], g[:, a:e], beta[:, a:e],
                             backend=backend, chunk_size=2) for a, e in pieces]
    m = torch.stack([x[0] for x in maps])
    e_ = torch.stack([x[1] for x in maps])
    states = compose_chunk_states(m, e_, s0)
    outs = [recurrent_gated_delta_rule(q[:, a:e], k[:, a:e], v[:, a:e], g[:, a:e], beta[:, a:e],
                                       initial_state=states[r])[0]
            for r, (a, e) in enumerate(pieces)]
    return torch.cat(outs, dim=1), states[-1]


@pytest.mark.parametrize("bounds", [(0, 4, 8, 13), (0, 1, 2, 3, 4, 13), (0, 13)],
                         ids=["three-uneven", "short-chunks", "one-chunk"])
def test_composed_chunks_equal_the_recurrence(bounds):
    """float64: outputs and final state of chunks composed from an incoming state equal the
    token-by-token recurrence over the whole window, and so do the gradients of every input
    (the incoming state included) for a random cotangent."""
    inputs = _rule_inputs(2, 13, 2, 4, 8, 4)
    o_ref, s_ref = recurrent_gated_delta_rule(*inputs[:5], initial_state=inputs[5])
    o, s = _chunked_window(*inputs, bounds)
    assert (o - o_ref).abs().max().item() < 1e-12
    assert (s - s_ref).abs().max().item() < 1e-12
    gen = torch.Generator().manual_seed(3)
    w_o = torch.randn(o.shape, dtype=o.dtype, generator=gen)
    w_s = torch.randn(s.shape, dtype=s.dtype, generator=gen)
    ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), inputs)
    got = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "s0"], ref, got, strict=True):
        assert (a - b).abs().max().item() < 1e-11, name


def test_chunk_transition_gradcheck():
    """torch.autograd.gradcheck of the composed final state (maps of two chunks and the
    incoming state) in float64."""
    q, k, v, g, beta, s0 = _rule_inputs(1, 5, 1, 2, 3, 2, seed=1)

    def final(q, k, v, g, beta, s0):
        return _chunked_window(q, k, v, g, beta, s0, (0, 2, 5))[1]

    assert torch.autograd.gradcheck(final, (q, k, v, g, beta, s0))


def test_chunk_transition_is_the_product_of_token_maps():
    """M is prod_t exp(g_t) (I - beta_t k_t k_t^T), latest factor leftmost (FLA's [d_k, d_v]
    state layout: S_t = A_t S_{t-1} + beta_t k_t v_t^T), and E the state from zero."""
    q, k, v, g, beta, _ = (x.detach() for x in _rule_inputs(1, 4, 1, 1, 3, 2, seed=2))
    m, e = chunk_transition(q, k, v, g, beta, backend="recurrent")
    want = torch.eye(3, dtype=torch.float64)
    for t in range(4):
        kt = k[0, t, 0]
        a = g[0, t, 0].exp() * (torch.eye(3, dtype=torch.float64)
                                - beta[0, t, 0] * torch.outer(kt, kt))
        want = a @ want
    assert (m[0, 0] - want).abs().max().item() < 1e-14
    assert (e - recurrent_gated_delta_rule(q, k, v, g, beta)[1]).abs().max().item() < 1e-14


def test_chunk_bounds_and_window_split():
    assert chunk_bounds(7, 2) == (0, 4, 7)
    assert chunk_bounds(7, 4) == (0, 2, 4, 6, 7)
    assert chunk_bounds(8, 4) == (0, 2, 4, 6, 8)
    cp = ContextParallel(None, 3, 4)
    w = cp.split(7)
    assert (w.start, w.end, w.lengths) == (6, 7, [2, 2, 2, 1])
    assert cp.split(3) is None  # shorter than the group: run whole on every rank
    assert ContextParallel(None, 0, 1).split(5) is None


# --- the model over torchrun ----------------------------------------------------------------

BASE = [*TINY, "model.params_dtype=float32", "model.gdn_chunk_size=2", "sleep.window_len=7",
        "sleep.checkpoint=true", "parallel.backend=gloo"]
LOOP = ["model.loop_start=1", "model.loop_end=3"]  # of AGAG's 4 blocks
CASES = {
    "hard-N1": ["sleep.eviction=hard", "sleep.passes=1"],
    "sliding-N1": ["sleep.eviction=sliding", "sleep.passes=1"],
    "hard-N3": ["sleep.eviction=hard", "sleep.passes=3"],
    "sliding-N3": ["sleep.eviction=sliding", "sleep.passes=3"],
    "hard-N3-loop-docs": ["sleep.eviction=hard", "sleep.passes=3", *LOOP, "doc_resets"],
    "sliding-N3-loop-docs": ["sleep.eviction=sliding", "sleep.passes=3", *LOOP, "doc_resets"],
    "sliding-N3-no-ckpt": ["sleep.eviction=sliding", "sleep.passes=3", "sleep.checkpoint=false"],
    "truncated": ["sleep.eviction=sliding", "sleep.passes=3", "sleep.grad_mode=truncated",
                  "sleep.grad_passes=1", *LOOP],
    "neumann": ["sleep.eviction=sliding", "sleep.passes=3", "sleep.grad_mode=implicit",
                "sleep.implicit_method=neumann", "sleep.neumann_terms=2", "doc_resets"],
    "phantom": ["sleep.eviction=hard", "sleep.passes=3", "sleep.grad_mode=implicit",
                "sleep.implicit_method=phantom", "sleep.grad_passes=1"],
    "fp64-sliding-N3-loop-docs": ["model.params_dtype=float64", "sleep.eviction=sliding",
                                  "sleep.passes=3", *LOOP, "doc_resets"],
    "sp-sliding-N3-loop-docs": ["parallel.sequence_parallel=true", "sleep.eviction=sliding",
                                "sleep.passes=3", *LOOP, "doc_resets"],
}
# (tp, cp, processes, cases)
LAYOUTS = {
    "cp2": (1, 2, 2, [c for c in CASES if not c.startswith("sp-")]),
    "cp4": (1, 4, 4, ["hard-N1", "sliding-N3", "hard-N3-loop-docs", "sliding-N3-loop-docs",
                      "fp64-sliding-N3-loop-docs"]),
    "tp2-cp2": (2, 2, 4, ["sliding-N1", "hard-N3-loop-docs", "sliding-N3-loop-docs",
                          "sp-sliding-N3-loop-docs"]),
}
_RUNS: dict[str, dict] = {}
_REFS: dict[str, dict] = {}


def _layout_results(layout: str, tmp_path_factory) -> dict:
    """The torchrun results of every case of ``layout`` (one launch per layout)."""
    if layout not in _RUNS:
        tp, cp, nproc, names = LAYOUTS[layout]
        out = tmp_path_factory.mktemp(layout) / "res.pt"
        cases = {n: [*BASE, *CASES[n]] for n in names}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", "tests/_cp_worker.py", str(out),
                               str(tp), str(cp), json.dumps(cases)], capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        _RUNS[layout] = torch.load(out)
    return _RUNS[layout]


def _reference(case: str) -> dict:
    from tests._cp_worker import run_case

    if case not in _REFS:
        over = [o for o in CASES[case] if o != "parallel.sequence_parallel=true"]
        _REFS[case] = run_case(1, 1, [*BASE, *over])
    return _REFS[case]


def _params() -> list:
    out = []
    for layout, (_, _, nproc, names) in LAYOUTS.items():
        marks = [pytest.mark.slow] if nproc > 2 else []
        out += [pytest.param(layout, n, id=f"{layout}-{n}", marks=marks) for n in names]
    return out


@pytest.mark.parametrize(("layout", "case"), _params())
def test_context_parallel_equals_one_process(tmp_path_factory, layout, case):
    """Logits of every window (gathered over CP and TP), the loss (summed over CP) and every
    gradient (summed over CP, gathered over TP) equal one process's. Windows of 7 tokens split
    unevenly (4+3, 2+2+2+1: chunks shorter than the conv's K-1 = 3 inputs), a short last
    window of 3 tokens (run whole on every rank at CP=4). float32: the CP form composes the
    state through the chunks' maps and gathers keys in another summation order, so values
    agree to float32 rounding amplified by the recurrence: loss and logits to 1e-5, gradients
    to 1e-4 of each tensor's largest entry (measured: <= 2.4e-5). The float64 case pins
    exactness: 1e-10."""
    got, ref = _layout_results(layout, tmp_path_factory)[case], _reference(case)
    fp64 = "model.params_dtype=float64" in CASES[case]
    tol = 1e-10 if fp64 else 1e-5
    gtol = 1e-10 if fp64 else 1e-4
    assert got["n_tokens"] == ref["n_tokens"]
    assert abs(got["loss"].item() - ref["loss"].item()) <= tol * (1 + abs(ref["loss"].item()))
    assert len(got["logits"]) == len(ref["logits"]) == 4
    for w, (a, b) in enumerate(zip(got["logits"], ref["logits"], strict=True)):
        assert a.shape == b.shape, w
        assert (a - b).abs().max().item() <= tol * (1 + b.abs().max().item()), w
    assert set(got["grads"]) == set(ref["grads"])
    for name, g1 in ref["grads"].items():
        g2 = got["grads"][name]
        assert (g1 - g2).abs().max().item() <= gtol * (1e-3 + g1.abs().max().item()), name


# --- training: a checkpoint saved at CP=2 resumes at CP=1 -------------------------------------

TRAIN = [
    "model.vocab_size=64", "model.d_model=32", "model.pattern=AGAG", "model.n_heads=2",
    "model.gdn_heads=2", "model.gdn_head_dim=16", "model.ffn_hidden=64",
    "sleep.window_len=8", "sleep.passes=2", "sleep.eviction=sliding",
    "data.source=shards", "data.seq_len=29", "data.batch_size=2", "data.eval_batch_size=4",
    "data.workers=1", "data.shuffle_buffer=8", "optim.use_muon=false",
    "optim.warmup_steps=2", "train.steps=6", "train.ckpt_every=2", "train.eval_every=3",
    "train.eval_examples=8", "train.device=cpu", "log.every=1", "log.progress=false",
    "parallel.backend=gloo",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    from tests.test_trainer_shards import _write

    root = tmp_path_factory.mktemp("cp-data")
    return _write(root / "train", 60, 15, seed=0), _write(root / "eval", 16, 8, seed=1)


def _train_args(run: Path, shards: tuple[Path, Path]) -> list[str]:
    return [*TRAIN, f"data.shards=[{shards[0]}]", f"data.eval_shards=[{shards[1]}]",
            f"train.run_dir={run}"]


def _logits_of(ckpt: Path, args: list[str]) -> torch.Tensor:
    """Full logits of a fixed batch (one process, CP=1) from the weights of ``ckpt``."""
    import sleeptrain
    from sleeptrain.train.dist_ckpt import load_model_weights

    cfg = sleeptrain.load_config(None, args)
    model = sleeptrain.build_model(cfg, device="cpu")
    load_model_weights(ckpt, model)
    tokens = torch.randint(2, 62, (2, 29), generator=torch.Generator().manual_seed(5))
    state = model.init_state(2)
    out = []
    for s in range(0, 28, 8):
        logits, state = model.step_window(tokens[:, s : s + 8], state)
        out.append(logits)
    return torch.cat(out, dim=1).detach()


@pytest.mark.slow
def test_checkpoint_saved_at_cp2_resumes_at_cp1(tmp_path, shards):
    """Packed shards (document resets, 2 sliding windows that sleep and a short last one of 4
    inputs), AdamW, clipping, eval every 3 steps. Four steps at CP=2 (torchrun: the eval at
    step 3 runs whole on both ranks), saved; two more at CP=1 from that checkpoint (model,
    optimizer moments, data position). Compared with one process training the 6 steps
    uninterrupted: every step's loss and gradient norm and the step-3/6 eval losses agree to
    float32 rounding (rel 1e-5), and the logits of the step-4 checkpoint written at CP=2 and
    of the final model equal the uninterrupted run's (1e-5)."""
    from sleeptrain.config import load_config
    from sleeptrain.train.logging import read_metrics
    from sleeptrain.train.trainer import train

    ref = tmp_path / "ref"
    train(load_config(None, _train_args(ref, shards)))
    run = tmp_path / "run"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "sleeptrain.cli", "train", str(empty),
                           *_train_args(run, shards), "parallel.cp=2", "--max-steps", "4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "layout TP1 x CP2 x DP1" in proc.stdout
    assert train(load_config(None, _train_args(run, shards)))["step"] == 6

    def view(r: Path) -> list[tuple]:
        return [(m["step"], m.get("loss"), m.get("grad_norm"), m.get("eval_loss"))
                for m in read_metrics(r)]

    got, want = view(run), view(ref)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert sum(g[3] is not None for g in got) == 2
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g[1:], w[1:], strict=True):
            assert (a is None) == (b is None), (g, w)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-5), (g, w)
    args = _train_args(tmp_path / "unused", shards)
    for step in (4, 6):
        name = f"checkpoints/step_{step:08d}"
        a, b = _logits_of(run / name, args), _logits_of(ref / name, args)
        assert (a - b).abs().max().item() <= 1e-5 * (1 + b.abs().max().item()), step


# --- configuration, plan and the paths that refuse CP ----------------------------------------


def test_config_and_layout_checks_name_parallel_cp():
    from sleeptrain.config import ConfigError, load_config
    from sleeptrain.parallel import init_parallel

    with pytest.raises(ConfigError, match=r"parallel\.cp.*must be >= 1"):
        load_config(None, ["parallel.cp=0"])
    with pytest.raises(ConfigError, match=r"parallel\.cp.*sleep\.window_len=4"):
        load_config(None, ["parallel.cp=8", "sleep.window_len=4"])
    assert load_config(None, ["parallel.cp=4"]).parallel.cp == 4
    with pytest.raises(ValueError, match=r"parallel\.tp=1 x parallel\.cp=2 does not divide the "
                                         r"world size 1"):
        init_parallel(tp=1, backend="gloo", device="cpu", cp=2)


def test_plan_prints_the_cp_layout_and_chunk_tokens(capsys):
    from sleeptrain.cli import main
    from sleeptrain.config import ConfigError, load_config
    from sleeptrain.plan import check_layout, memory_estimate

    yaml = str(ROOT / "configs" / "7b_sleep.yaml")
    assert main(["plan", yaml, "--gpus", "16", "parallel.cp=2"]) == 0
    out = capsys.readouterr().out
    assert "TP 2 x CP 2 x DP 4" in out and "(2048 tokens per context-parallel rank)" in out
    cfg = load_config(yaml, ["parallel.tp=1", "parallel.cp=3"])
    assert check_layout(cfg, 12) == (1, 4)
    with pytest.raises(ConfigError, match=r"parallel\.tp=1 x parallel\.cp=3 does not divide "
                                          r"the 16 GPUs"):
        check_layout(cfg, 16)
    one = memory_estimate(load_config(yaml, ["parallel.tp=1"]), 1)
    three = memory_estimate(cfg, 1)
    assert three["weights"] == one["weights"] and three["grads"] == one["grads"]
    assert three["activations"] < one["activations"] / 2.9


def test_one_call_path_graphs_and_gathered_outputs_refuse_cp():
    from sleeptrain.sleep.runner import parallel_applies, windowed_loss
    from sleeptrain.sleep.wrapper import SleepModel
    from sleeptrain.train.step import graphs_unavailable
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg("sleep.window_len=8")
    model = SleepModel(cfg.model, cfg.sleep, cp=ContextParallel(None, 0, 2))
    assert model.cp_size == 2 and model.window_chunks(8).lengths == [4, 4]
    assert not parallel_applies(model, cfg.sleep, 1, None)
    one = SleepModel(cfg.model, cfg.sleep, cp=ContextParallel(None, 0, 1))
    assert one.cp is None and parallel_applies(one, cfg.sleep, 1, None)
    tokens = torch.zeros(1, 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="not gathered over the CP group"):
        windowed_loss(model, tokens, torch.ones_like(tokens), cfg.sleep,
                      return_predictions=True, context_parallel=True)
    cuda = torch.device("cuda")
    assert "context parallelism" in graphs_unavailable(cuda, 1, "auto", cp=2)
    assert graphs_unavailable(cuda, 1, "on", cp=2) is None


@pytest.mark.slow
def test_cp2_dp2_with_sharded_optimizer_follows_one_process(tmp_path, tmp_path_factory):
    """Four processes, CP=2 x DP=2 with the optimizer state sharded over DP (ZeRO-1): the two
    data-parallel ranks read different halves of the batch, their CP peers the same ones
    (megatron-core's DP group excludes CP); gradients are summed over DP x CP. Four AdamW
    steps follow the one-process run with the whole batch (float64 weights: rel 1e-6)."""
    from tests.test_parallel import RUN, SHARDED, _losses, _one_process

    ref = _one_process(tmp_path_factory, False)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=4", "-m", "sleeptrain.cli", "train", str(empty),
                           *RUN, "optim.use_muon=false", "data.batch_size=2", "parallel.cp=2",
                           SHARDED, f"train.run_dir={run}"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "layout TP1 x CP2 x DP2" in proc.stdout
    got = _losses(run)
    assert len(got) == len(ref) == 4
    for (l2, g2), (l1, g1) in zip(got, ref, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-6)
        assert g2 == pytest.approx(g1, rel=1e-6)
