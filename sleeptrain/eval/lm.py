"""Held-out language-modelling loss over shards (the eval of ``data.source: shards``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from sleeptrain.config import SleepConfig
from sleeptrain.sleep import SleepModel
from sleeptrain.sleep.runner import windowed_loss


@torch.no_grad()
def evaluate_shards(model: SleepModel, cfg: DictConfig, sleep_cfg: SleepConfig, info: Any,
                    n_rows: int, autocast: bool = False) -> dict[str, Any]:
    """Loss and next-token accuracy over the first ``n_rows`` packed rows of
    ``data.eval_shards`` on every data-parallel rank (no shuffling, one epoch, summed over ranks).
    Returns {'loss', 'token_acc', 'tokens', 'rows'}."""
    from sleeptrain.data.shards import ShardLoader

    bs = cfg.data.eval_batch_size
    loader = ShardLoader(list(cfg.data.eval_shards), seq_len=cfg.data.seq_len,
                         window_len=cfg.sleep.window_len, batch_size=bs,
                         dp_rank=info.dp_rank, dp_size=info.dp_size, workers=0,
                         seed=cfg.train.seed, shuffle_buffer=1, epochs=1,
                         agree_device=info.device if info.device.type == "cuda" else "cpu",
                         allow_pipe=cfg.data.allow_pipe)
    device = info.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
    rows = 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if rows >= n_rows:
                break
            with torch.autocast("cuda", dtype=torch.bfloat16,
                                enabled=autocast and device.type == "cuda"):
                out = windowed_loss(model, batch.tokens.to(device), batch.mask.to(device),
                                    sleep_cfg, doc_starts=batch.doc_starts)
            sums += torch.stack([out.loss_sum.double(), out.n_correct.double(),
                                 out.n_tokens.double()])
            rows += batch.tokens.shape[0]
    finally:
        model.train(was_training)
    if info.dp_size > 1:
        from megatron.core import parallel_state as mpu

        dist.all_reduce(sums, group=mpu.get_data_parallel_group())
    loss_sum, correct, tokens = sums.tolist()
    return {"loss": loss_sum / tokens if tokens else math.nan,
            "token_acc": correct / tokens if tokens else math.nan,
            "tokens": int(tokens), "rows": rows * info.dp_size}
