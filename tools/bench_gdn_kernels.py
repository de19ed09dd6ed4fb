"""Benchmark: the GDN layer's kernels at one window's shape, each option against its default.

For a task config (default: the Rule 110 paper model) this times, on one CUDA GPU, forward +
backward of

  * the input chain (``model.gdn_inputs``): ``fused.gdn_inputs`` compiled (``chain``, what
    ``train.compile`` runs) vs the Triton kernels (``triton``) at each ``--input-blocks``
    (tokens per program) x ``--input-warps``;
  * the delta rule (``model.gdn_backend`` / ``model.fla_chunk_size``): FLA with 64-row chunks
    (the default), FLA with chunks by length (``fla_chunk_size=0``), and ``short`` at each
    ``--warps``;

at the model's GDN shapes (B = data.batch_size, T = sleep.window_len, bf16 activations, an
fp32 incoming state and a bf16 conv state, as in a window after the first). Each variant is
captured in one CUDA graph (the trainer replays its step as one; launch overhead is left
out for every variant alike) and timed over ``--iters`` replays (mean per replay, the best
of ``--repeat`` rounds). A variant whose capture fails is timed eagerly instead (marked
``eager``: launch overhead included) and the capture's error reported beside it. All
variants run in one process, so the ratios are the numbers to compare. Each variant's
outputs and gradients are compared with the first variant of its group (the largest
difference relative to each tensor's largest entry, a sanity check; the accuracy tests are
tests/test_fused_gpu.py and tests/test_kernels.py).

    python tools/bench_gdn_kernels.py --config configs/rule110_paper.yaml --out gdn_kernels.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch


def _graphed(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _time_us(run: Callable[[], object], iters: int, repeat: int) -> float:
    rounds = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) * 1e3 / iters)
    return min(rounds)


def _fwd_bwd(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: list[torch.Tensor],
             seed: int) -> Callable[[], list[torch.Tensor]]:
    """One forward + backward of ``fn(*inputs)`` against fixed random output gradients
    (drawn at the first call, so that a variant's errors surface inside ``_group``);
    returns outputs then input gradients (a fresh list each call)."""
    leaves = [x for x in inputs if x.requires_grad]
    grads: list[torch.Tensor] = []

    def step() -> list[torch.Tensor]:
        out = [o for o in fn(*inputs) if o.is_floating_point()]
        if not grads:
            gen = torch.Generator(device=out[0].device).manual_seed(seed)
            grads.extend(torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
                         for o in out)
        return out + list(torch.autograd.grad(out, leaves, grads))

    return step


def _group(name: str, variants: dict[str, Callable[[], list[torch.Tensor]]], iters: int,
           repeat: int, only: list[str]) -> list[dict]:
    rows, first = [], None
    for i, (label, step) in enumerate(variants.items()):
        if i and only and not any(x in label for x in only):  # the first is the baseline
            continue
        capture_error, run = None, step
        try:
            try:
                graph = _graphed(step)
                run = graph.replay
            except Exception as e:  # timed eagerly below, the capture's error reported
                capture_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                torch.cuda.synchronize()
            ref = step()
        except Exception as e:  # one variant's failure is reported, the others still run
            rows.append({"group": name, "variant": label, "error": f"{type(e).__name__}: {e}"})
            print(f"{name:7s} {label:22s} FAILED {type(e).__name__}: {e}", flush=True)
            continue
        us = _time_us(run, iters, repeat)
        diff = 0.0 if first is None else max(  # relative to each tensor's largest entry
            ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
            for a, b in zip(ref, first[1], strict=True))
        if first is None:
            first = (us, ref)
        rows.append({"group": name, "variant": label, "us": us, "ratio": us / first[0],
                     "max_rel_diff_vs_first": diff, "eager": capture_error is not None,
                     **({"capture_error": capture_error} if capture_error else {})})
        print(f"{name:7s} {label:22s} {us:9.1f} us  x{us / first[0]:.3f}  "
              f"max rel diff {diff:.3g}"
              + (f"  EAGER (capture failed: {capture_error})" if capture_error else ""),
              flush=True)
        run = graph = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/rule110_paper.yaml")
    ap.add_argument("--batch", type=int, default=None, help="default: data.batch_size")
    ap.add_argument("--tokens", type=int, default=None, help="default: sleep.window_len")
    ap.add_argument("--warps", default="4,8", help="comma list: the short rule's launch widths")
    ap.add_argument("--input-blocks", default="32",
                    help="comma list: the Triton input kernels' tokens per program")
    ap.add_argument("--input-warps", default="8",
                    help="comma list: the Triton input kernels' launch widths")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="comma list: run only the variants whose "
                    "names contain one of these (each group's first always runs); FLA's "
                    "TileLang kernels compile for minutes per chunk length on a fresh host")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gdn_kernels: needs a CUDA GPU")
    from sleeptrain.config import load_config
    from sleeptrain.model.kernels import fused
    from sleeptrain.model.kernels.gated_delta import fla_gated_delta_rule
    from sleeptrain.model.kernels.gdn_inputs import gdn_inputs as triton_inputs
    from sleeptrain.model.kernels.gdn_short import short_gated_delta_rule

    only = [x for x in a.only.split(",") if x]
    cfg = load_config(a.config, a.overrides)
    m = cfg.model
    h, dk = m.gdn_heads, m.gdn_head_dim
    hv, dv = m.gdn_v_heads or h, m.gdn_v_head_dim or dk
    r, km = hv // h, m.conv_kernel
    b = a.batch or cfg.data.batch_size
    t = a.tokens or cfg.sleep.window_len
    dev, bf = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int, dtype: torch.dtype = bf, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * scale
        return x.to(dtype).requires_grad_()

    cg = 2 * dk + r * dv
    y = rnd(b, t, h, cg + r * dv + 2 * r)  # [q, k, v, z, b, a] per qk head
    conv_state = rnd(b, h * cg, km - 1)  # the last window's inputs, in y's dtype
    w = rnd(h * cg, km, dtype=torch.float32, scale=0.5)
    a_log = torch.empty(hv, device=dev).uniform_(1.0, 16.0).log().requires_grad_()
    dt_bias = rnd(hv, dtype=torch.float32, scale=0.5)
    shape_args = (dk, r, dv)
    ins = [y, conv_state, w, a_log, dt_bias]
    inputs = {"chain (compiled)": _fwd_bwd(
        lambda *x: fused.gdn_inputs(*x, *shape_args, compiled=True)[:6], ins, 1)}
    for bt in (int(x) for x in a.input_blocks.split(",")):
        for nw in (int(x) for x in a.input_warps.split(",")):
            inputs[f"triton {bt} tok {nw} warps"] = _fwd_bwd(
                lambda *x, bt=bt, nw=nw: triton_inputs(*x, *shape_args, block_t=bt,
                                                       num_warps=nw)[:6], ins, 1)
    rows = _group("inputs", inputs, a.iters, a.repeat, only)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.float(), dim=-1).to(bf).detach().requires_grad_()

    # the rule's inputs as the layer passes them: q, k per qk head (L2-normalized), v per
    # value head (bf16), g and beta fp32, the incoming state fp32
    q, k, v = unit(rnd(b, t, h, dk)), unit(rnd(b, t, h, dk)), rnd(b, t, hv, dv)
    g = (-0.3 * torch.rand(b, t, hv, generator=gen, device=dev)).requires_grad_()
    beta = torch.rand(b, t, hv, generator=gen, device=dev).requires_grad_()
    s0 = rnd(b, hv, dk, dv, dtype=torch.float32, scale=0.1)
    rule_in = [q, k, v, g, beta, s0]
    variants = {
        "fla chunk 64": _fwd_bwd(lambda *x: fla_gated_delta_rule(*x[:5], None, x[5], 64),
                                 rule_in, 2),
        "fla chunk by length": _fwd_bwd(lambda *x: fla_gated_delta_rule(*x[:5], None, x[5], 0),
                                        rule_in, 2)}
    for nw in (int(x) for x in a.warps.split(",")):
        variants[f"short {nw} warps"] = _fwd_bwd(
            lambda *x, nw=nw: short_gated_delta_rule(*x[:5], None, x[5], num_warps=nw),
            rule_in, 2)
    rows += _group("rule", variants, a.iters, a.repeat, only)
    result = {"config": a.config, "overrides": a.overrides, "batch": b, "tokens": t,
              "heads": h, "v_heads": hv, "head_dim": dk, "v_head_dim": dv,
              "conv_kernel": km, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({x["variant"]: round(x.get("ratio", float("nan")), 3) for x in rows}))


if __name__ == "__main__":
    main()
