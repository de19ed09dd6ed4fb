"""Pipelined forward + backward of fixed micro-batches at a TP x PP layout; rank 0 saves, per
case, the step's loss sum, correct count and every full gradient (TP-gathered, the tied
embedding's two copies summed as the trainer does).

Run by tests/test_pipeline.py under ``torch.distributed.run`` (PP > 1) and in the test
process for the one-process reference (``reference``):
``python -m torch.distributed.run --standalone --nproc_per_node=4 tests/_pp_worker.py OUT.pt
TP PP '{"case": ["key=value", ...], ...}'``. A case whose overrides include ``doc_resets``
gets document starts at fixed windows; ``micro=K`` sets the number of micro-batches (3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

DOC = "doc_resets"


def batches(cfg: Any, dev: torch.device, micro: int, resets: bool) -> list[tuple]:
    """``micro`` micro-batches of 2 rows: 3 full windows and a short last one (3 inputs)."""
    gen = torch.Generator().manual_seed(1)
    t = 3 * cfg.sleep.window_len + 4
    n_windows = -(-(t - 1) // cfg.sleep.window_len)
    out = []
    for m in range(micro):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, t), generator=gen).to(dev)
        mask = (torch.rand(2, t, generator=gen) < 0.8).to(dev)
        doc = None
        if resets:
            doc = torch.zeros(2, n_windows, dtype=torch.bool)
            doc[0, 1 + m % 2] = doc[1, 2] = True
        out.append((tokens, mask, doc))
    return out


def _split(overrides: list[str]) -> tuple[list[str], int, bool]:
    micro = 3
    rest = []
    for o in overrides:
        if o.startswith("micro="):
            micro = int(o.split("=", 1)[1])
        elif o != DOC:
            rest.append(o)
    return rest, micro, DOC in overrides


def reference(overrides: list[str]) -> dict[str, Any]:
    """The one-process step (``forward_backward`` per micro-batch, as the trainer at pp=1)."""
    import sleeptrain
    from sleeptrain.sleep.runner import window_heads
    from sleeptrain.train.step import forward_backward

    over, micro, resets = _split(overrides)
    cfg = sleeptrain.load_config(None, [*over, "parallel.pp=1", "parallel.tp=1"])
    model = sleeptrain.build_model(cfg, device="cpu", seed=0)
    bs = batches(cfg, torch.device("cpu"), micro, resets)
    denom = float(sum(int(b[1][:, 1:].sum()) for b in bs))
    loss = torch.zeros((), dtype=torch.float64)
    correct = 0
    for tokens, mask, doc in bs:
        ls, nc = forward_backward(model, tokens, mask, doc, cfg.sleep, denom, False,
                                  window_heads(mask, cfg.sleep.window_len))
        loss += ls.double()
        correct += int(nc)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss, "correct": correct, "grads": grads}


def run_case(tp: int, pp: int, overrides: list[str]) -> dict[str, Any]:
    """The pipelined step on this rank; every rank returns the merged full gradients."""
    import torch.distributed as dist

    import sleeptrain
    from sleeptrain.parallel.state import pipeline_groups
    from sleeptrain.parallel.tensors import gather_tp, partition_dim, sync_tp_grads
    from sleeptrain.plan.pipeline import stage_bounds
    from sleeptrain.sleep.runner import window_heads
    from sleeptrain.train.pipeline_step import PipelineStep
    from sleeptrain.train.trainer import _sum_tied_embedding

    over, micro, resets = _split(overrides)
    cfg = sleeptrain.load_config(None, [*over, f"parallel.tp={tp}", f"parallel.pp={pp}"])
    model = sleeptrain.build_model(cfg, seed=0)
    bs = batches(cfg, model.device, micro, resets)
    denom = float(sum(int(b[1][:, 1:].sum()) for b in bs))
    step = PipelineStep(cfg, model, stage_bounds(cfg), pipeline_groups())
    heads = [window_heads(b[1], cfg.sleep.window_len) for b in bs]
    ls, nc = step.run(bs, cfg.sleep, denom, False, heads)
    sync_tp_grads(model.parameters())
    _sum_tied_embedding(model, cfg)
    loss = torch.zeros((), dtype=torch.float64) if ls is None else ls.double().cpu()
    correct = torch.zeros((), dtype=torch.int64) if nc is None else nc.cpu()
    dist.all_reduce(loss, group=step.groups.group)
    dist.all_reduce(correct, group=step.groups.group)
    mine = {n: gather_tp(p.grad, partition_dim(p)).cpu().clone()
            for n, p in model.named_parameters() if p.grad is not None}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    grads: dict[str, torch.Tensor] = {}
    for part in every:  # TP peers hold the same full gradients; the first rank's is kept
        for n, g in part.items():
            grads.setdefault(n, g)
    return {"loss": loss, "correct": int(correct), "grads": grads,
            "bounds": stage_bounds(cfg), "policy": step.schedule(bs, cfg.sleep,
                                                                 cfg.sleep.passes).policy}


def main() -> None:
    out, tp, pp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cases = json.loads(sys.argv[4])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    res = {name: run_case(tp, pp, over) for name, over in cases.items()}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(res, out)


if __name__ == "__main__":
    main()
