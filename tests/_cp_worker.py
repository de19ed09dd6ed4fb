"""Windowed loss + backward of fixed batches at a TP x CP layout; rank 0 saves, per case, the
loss, the wake-pass logits of every window and the full gradients.

Run by tests/test_context_parallel.py under ``torch.distributed.run`` (CP > 1) and in the test
process for the one-process reference (TP = CP = 1):
``python -m torch.distributed.run --standalone --nproc_per_node=4 tests/_cp_worker.py OUT.pt
TP CP '{"case": ["key=value", ...], ...}'``. A case whose overrides include ``doc_resets``
gets document starts (packed rows) at fixed windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

DOC = "doc_resets"


def _batch(cfg: Any, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """3 rows of 3 full windows and a short last one (3 inputs): windows of 7 tokens split
    unevenly over 2 and 4 ranks, the last window shorter than 4 ranks."""
    gen = torch.Generator().manual_seed(1)
    t = 3 * cfg.sleep.window_len + 4
    tokens = torch.randint(0, cfg.model.vocab_size, (3, t), generator=gen).to(dev)
    mask = (torch.rand(3, t, generator=gen) < 0.8).to(dev)
    n_windows = -(-(t - 1) // cfg.sleep.window_len)
    doc = torch.zeros(3, n_windows, dtype=torch.bool)
    doc[0, 2] = doc[1, 1] = doc[2, 3] = True
    return tokens, mask, doc


def _full_logits(model: Any, local: list[torch.Tensor], lengths: list[int]
                 ) -> list[torch.Tensor]:
    """Every window's logits [B, l, V] from this rank's chunks' vocabulary slices (windows
    of ``lengths`` tokens; one not split over CP is whole on every rank)."""
    from sleeptrain.parallel.context import gather_window

    out = []
    for x, length in zip(local, lengths, strict=True):
        full = model.gather_vocab(x)
        chunks = model.window_chunks(length)
        if chunks is not None:
            full = gather_window(full, chunks)
        out.append(full.detach().cpu().clone())
    return out


def run_case(tp: int, cp: int, overrides: list[str]) -> dict[str, Any]:
    """Loss (summed over CP), logits and gradients (summed over CP, gathered over TP)."""
    import torch.distributed as dist

    import sleeptrain
    from sleeptrain.parallel.state import grad_group
    from sleeptrain.parallel.tensors import gather_tp, partition_dim, sync_tp_grads

    resets = DOC in overrides
    over = [o for o in overrides if o != DOC]
    cfg = sleeptrain.load_config(None, [*over, f"parallel.tp={tp}", f"parallel.cp={cp}"])
    model = sleeptrain.build_model(cfg, seed=0)
    tokens, mask, doc = _batch(cfg, model.embed.weight.device)
    local: list[torch.Tensor] = []  # the wake passes' logits (not the recomputations')
    head = model.logits

    def logits(*args: Any) -> torch.Tensor:
        y = head(*args)
        local.append(y.detach().clone())  # megatron's TP cross-entropy works in place
        return y

    model.logits = logits
    out = sleeptrain.windowed_loss(model, tokens, mask, cfg.sleep,
                                   doc_starts=doc if resets else None, context_parallel=True)
    model.logits = head
    out.loss.backward()
    loss = out.loss.detach().clone()
    if cp > 1:
        dist.all_reduce(loss, group=model.cp.group)
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=grad_group())
    sync_tp_grads(model.parameters())
    grads = {n: gather_tp(p.grad, partition_dim(p)).cpu().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    t_in, L = tokens.shape[1] - 1, cfg.sleep.window_len
    lengths = [min(L, t_in - s) for s in range(0, t_in, L)]
    return {"loss": loss.cpu(), "logits": _full_logits(model, local, lengths), "grads": grads,
            "n_tokens": int(out.n_tokens)}


def main() -> None:
    out, tp, cp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cases = json.loads(sys.argv[4])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    res = {name: run_case(tp, cp, over) for name, over in cases.items()}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(res, out)


if __name__ == "__main__":
    main()
