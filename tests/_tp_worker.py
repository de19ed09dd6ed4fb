"""One windowed loss + backward at a given TP size; rank 0 saves the loss and full gradients.

Run by tests/test_parallel.py, under ``torch.distributed.run`` for TP=2 and in the test process
for TP=1: ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/_tp_worker.py OUT.pt TP '["key=value", ...]'``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch


def run(tp: int, overrides: list[str]) -> dict[str, object]:
    """Loss and gathered gradients (name -> full tensor) of one fixed batch."""
    import sleeptrain
    from sleeptrain.parallel.tensors import gather_tp, partition_dim, sync_tp_grads

    cfg = sleeptrain.load_config(None, [*overrides, f"parallel.tp={tp}"])
    model = sleeptrain.build_model(cfg, seed=0)
    dev = model.embed.weight.device
    gen = torch.Generator().manual_seed(1)
    # three full windows and a short last one of 5 inputs: 3 x 5 tokens do not split evenly
    # over 2 ranks (sequence parallelism pads)
    t = 3 * cfg.sleep.window_len + 6
    tokens = torch.randint(0, cfg.model.vocab_size, (3, t), generator=gen).to(dev)
    mask = (torch.rand(3, t, generator=gen) < 0.8).to(dev)
    fusion = contextlib.nullcontext()
    if cfg.train.grad_accum_fusion == "on":  # the trainer's fused linears (fp32/fp64 weights)
        from sleeptrain.model.kernels import linear as fused_linear

        fusion = fused_linear.for_model(model, None)
    with fusion:
        out = sleeptrain.windowed_loss(model, tokens, mask, cfg.sleep)
        out.loss.backward()
    sync_tp_grads(model.parameters())
    grads = {n: gather_tp(p.grad, partition_dim(p)).cpu().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.detach().cpu().clone(), "grads": grads, "sp": model.sp}


def main() -> None:
    out, tp, overrides = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    res = run(tp, overrides)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(res, out)


if __name__ == "__main__":
    main()
