"""GPU: CUDA-graph replays of micro-batch steps equal the eager steps (sleeptrain.train.step)."""

from __future__ import annotations

import json

import pytest
import torch

import sleeptrain
from sleeptrain.model.kernels import linear as fused_linear
from sleeptrain.sleep.runner import window_heads
from sleeptrain.train.logging import read_metrics
from sleeptrain.train.step import MicroBatchGraphs, forward_backward

pytestmark = pytest.mark.gpu

SMALL = ["model.d_model=256", "model.pattern=AGGA", "model.n_heads=4", "model.n_kv_heads=2",
         "model.gdn_heads=2", "model.gdn_v_heads=4", "model.gdn_head_dim=64",
         "model.vocab_size=256", "sleep.window_len=64", "train.device=cuda"]

CASES = {
    "hard-full-ckpt": ["sleep.passes=3", "sleep.checkpoint=true"],
    "sliding-docs": ["sleep.passes=2", "sleep.eviction=sliding"],
    "truncated": ["sleep.passes=4", "sleep.grad_mode=truncated", "sleep.grad_passes=1",
                  "sleep.checkpoint=true"],
    "neumann": ["sleep.passes=3", "sleep.grad_mode=implicit", "sleep.implicit_method=neumann",
                "sleep.neumann_terms=2"],
}


def _batch(seed: int, doc: bool):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (2, 201), generator=g).cuda()  # 200 inputs: short last window
    mask = (torch.rand(2, 201, generator=g) < 0.7).long().cuda()
    starts = None
    if doc:  # sequence 1 starts a new document at window 2
        starts = torch.zeros(2, 4, dtype=torch.bool)
        starts[1, 2] = True
        starts = starts.cuda()
    return tokens, mask, starts


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("autocast", [False, True])
def test_graph_replay_equals_eager(case, autocast):
    # Same weights, same batches: three micro-batches accumulated per step (two eager warm-ups,
    # then capture and replays), two steps. The replay runs the kernels the eager step runs,
    # with the same inputs; FLA's backward accumulates with atomics in places, so the check
    # allows float rounding: 1e-5 (fp32) / 1e-3 (bf16) of each tensor's largest entry.
    _replay_vs_eager(case, autocast)


def test_graph_replay_with_compiled_chains_equals_eager():
    # The same with the layers' elementwise chains compiled (train.compile): Inductor's
    # kernels are compiled in the eager warm-ups and captured like any other kernel. The
    # chains are static-shape (one kernel per window length), so the eager model's first
    # micro-batch runs the kernels every later call runs: no warm-up of the eager model is
    # needed for the comparison (with dynamic shapes it was: the first call's fixed-length
    # kernel rounded differently from the later symbolic one, 1% of the largest embedding
    # gradient on an H200).
    _replay_vs_eager("hard-full-ckpt", True, compile=True)


@pytest.mark.parametrize("kernels", [["model.gdn_inputs=triton", "model.fla_chunk_size=0"],
                                     ["model.gdn_backend=short"]], ids=["inputs-chunks", "short"])
@pytest.mark.parametrize("case", ["hard-full-ckpt", "sliding-docs"])
def test_graph_replay_with_triton_kernel_options_equals_eager(case, kernels):
    # model.gdn_inputs=triton with model.fla_chunk_size=0, and model.gdn_backend=short: the
    # Triton kernels (and FLA's 16/32/64-row chunks) are compiled in the eager warm-ups and
    # captured like any other kernel (no host sync, no allocation outside the graph's pool);
    # sliding eviction sends the conv state with its gradient through the input kernels.
    _replay_vs_eager(case, True, extra=kernels)


@pytest.mark.parametrize("case", ["hard-full-ckpt", "neumann"])
def test_graph_replay_with_fused_linears_equals_eager(case):
    # train.grad_accum_fusion: bf16 weight copies refreshed inside the graph, weight gradients
    # added into .grad by the captured GEMMs (the Neumann backward's plain weight gradients
    # included).
    _replay_vs_eager(case, True, fused_linears=True)


def test_mixed_dtype_gradient_accumulation_on_cuda():
    # grad (fp32) += a @ b with bf16 a, b in one GEMM (addmm with out_dtype=float32): exact
    # products of bf16 numbers summed in fp32 -- against fp64: |err| <= 1e-5 * (1 + max|ref|).
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(384, 1000, device="cuda", generator=g).bfloat16()
    b = torch.randn(1000, 256, device="cuda", generator=g).bfloat16()
    grad = torch.randn(384, 256, device="cuda", generator=g)
    ref = grad.double() + a.double() @ b.double()
    ptr = grad.data_ptr()
    fused_linear._accumulate(grad, a, b)
    assert grad.data_ptr() == ptr and grad.dtype == torch.float32
    assert (grad.double() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_fused_linears_bf16_gradients_are_as_close_to_fp64():
    # bf16 autocast with and without fused linears, both against the same model in fp64 (no
    # autocast): the fused path keeps fp32 weight-gradient sums where the plain one rounds
    # each window's weight gradient to bf16, so its error may be smaller, never much larger:
    # err_fused <= 1.5 * err_plain + 1e-4 * max|g| per parameter.
    cfg = sleeptrain.load_config(None, [*SMALL, *CASES["hard-full-ckpt"]])
    c64 = sleeptrain.load_config(None, [*SMALL, *CASES["hard-full-ckpt"],
                                        "model.params_dtype=float64"])
    tokens, mask, _ = _batch(0, False)
    heads = window_heads(mask, cfg.sleep.window_len)

    weights = sleeptrain.build_model(cfg, seed=3).state_dict()

    def grads(c, autocast, fusion):
        # the same weights in every run (a float64 build draws other initial values)
        m = sleeptrain.build_model(c, seed=3)
        m.load_state_dict({k: v.to(m.dtype) if torch.is_tensor(v) and v.is_floating_point()
                           else v for k, v in weights.items()})
        forward_backward(m, tokens, mask, None, c.sleep, 500.0, autocast, heads,
                         fused_linears=fusion)
        return {n: p.grad.double() for n, p in m.named_parameters()}

    ref, plain, fusedg = (grads(c64, False, False), grads(cfg, True, False),
                          grads(cfg, True, True))
    worst = max((plain[n] - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
                for n, r in ref.items())
    assert worst < 0.1  # bf16 rounding, not different models: the comparison means something
    for n, r in ref.items():
        scale = r.abs().max().item()
        e_plain = (plain[n] - r).abs().max().item()
        e_fused = (fusedg[n] - r).abs().max().item()
        assert e_fused <= 1.5 * e_plain + 1e-4 * scale, (n, e_fused, e_plain)


def _replay_vs_eager(case, autocast, compile=False, fused_linears=False, extra=()):
    cfg = sleeptrain.load_config(None, [*SMALL, *CASES[case], *extra])
    doc = case == "sliding-docs"
    tol = 1e-3 if autocast else 1e-5
    m_e = sleeptrain.build_model(cfg, seed=3)
    m_g = sleeptrain.build_model(cfg, seed=3)
    for m in (m_e, m_g):
        m.set_kernels(compile=compile)
    graphs = MicroBatchGraphs(m_g, warmup=2, verbose=False, fused_linears=fused_linears)
    for step in range(2):
        for m in (m_e, m_g):
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        for micro in range(3):
            tokens, mask, starts = _batch(10 * step + micro, doc)
            heads = window_heads(mask, cfg.sleep.window_len)
            le, ce = forward_backward(m_e, tokens, mask, starts, cfg.sleep, 500.0, autocast,
                                      heads, fused_linears=fused_linears)
            lg, cg = graphs.step(tokens, mask, starts, cfg.sleep, 500.0, autocast, heads)
            assert abs(le.item() - lg.item()) <= tol * abs(le.item()), (step, micro)
            assert int(ce) == int(cg)
        for (n, pe), pg in zip(m_e.named_parameters(), m_g.parameters(), strict=True):
            scale = max(pe.grad.abs().max().item(), 1e-8)
            assert (pe.grad - pg.grad).abs().max().item() <= tol * scale, (case, n)
    assert graphs.disabled is None, graphs.disabled
    assert graphs.captures == 1 and graphs.replays == 4  # steps x micro-batches - 2 warm-ups


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_graphed_training_follows_eager_for_20_steps(tmp_path):
    # The trainer with train.cuda_graphs on vs off (train.compile off in both,
    # train.grad_accum_fusion at its default, on for CUDA): same config,
    # seed and data (the Rule 110 task, hard eviction, N=2 with window x pass checkpointing,
    # 2 micro-batches per step, Muon + AdamW, bf16 autocast). The loss curves agree to 2e-3
    # relative per step: bf16 activations and FLA's atomics give run-to-run differences of
    # that order that the optimizer carries forward (two eager runs are compared too, to
    # show the scale).
    base = ["model.d_model=128", "model.pattern=AGAG", "model.n_heads=4",
            "model.n_kv_heads=2", "model.gdn_heads=2", "model.gdn_head_dim=64",
            "model.vocab_size=16", "sleep.window_len=24", "sleep.passes=2",
            "sleep.checkpoint=true", "data.task=rule110", "data.batch_size=16",
            "train.grad_accum=2", "train.steps=20", "train.device=cuda", "log.every=1",
            "log.progress=false", "train.eval_every=1000", "train.save_at_end=false",
            "train.ckpt_every=1000", "optim.warmup_steps=2"]
    from sleeptrain.train.trainer import train

    curves = {}
    for name, mode in (("eager", "off"), ("eager2", "off"), ("graphs", "on")):
        cfg = sleeptrain.load_config(None, [*base, f"train.cuda_graphs={mode}",
                                            "train.compile=off", "train.optimizer_graph=auto",
                                            f"train.run_dir={tmp_path / name}"])
        train(cfg)
        curves[name] = _losses(tmp_path / name)
        if mode == "on":
            perf = [r for r in (json.loads(x) for x in (tmp_path / name / "perf.jsonl")
                                .read_text().splitlines()) if "step_s" in r]  # step lines
            assert perf[-1]["graph_replays"] == 2 * 20 - 2  # all but the two warm-ups
            # the optimizer step too: two eager warm-ups, then one graph replayed each step
            assert perf[-1]["optimizer_replays"] == 20 - 2
    assert len(curves["graphs"]) == 20

    def diff(a, b):
        return max(abs(x - y) / abs(x) for x, y in zip(curves[a], curves[b], strict=True))

    print(f"loss curves, max relative difference: eager vs eager {diff('eager', 'eager2'):.2e}, "
          f"eager vs graphs {diff('eager', 'graphs'):.2e}")
    assert diff("eager", "graphs") <= 2e-3, (curves["eager"], curves["graphs"])
