"""Accuracy by reasoning depth on the synthetic tasks (t for rule110, k for depo)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from sleeptrain.sleep.runner import windowed_loss


def batch_examples(examples: list[Any], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """tokens, loss_mask [B, T] (int64) for a list of equal-length task examples."""
    tokens = torch.tensor([e.tokens for e in examples], dtype=torch.long)
    mask = torch.tensor([e.loss_mask for e in examples], dtype=torch.long)
    return tokens.to(device), mask.to(device)


@torch.no_grad()
def evaluate_task(model: Any, task: Any, sleep_cfg: Any, n_examples: int, batch_size: int,
                  seed: int, device: torch.device | str, autocast: bool = False
                  ) -> dict[str, Any]:
    """Exact-match accuracy on the first ``n_examples`` of the task's test stream.

    Returns {'token_acc', 'example_acc', 'n', 'by_depth': {depth: {'token_acc', 'example_acc',
    'tokens', 'examples'}}}. A token is right when the wake-pass argmax at the position before
    it equals it; an example is right when all its answer tokens are; depth buckets are the
    task's per-answer depths (an example counts in each of its answers' buckets).
    """
    was_training = model.training
    model.eval()
    stream = task.stream("test", seed, 0)
    tok_right: dict[int, int] = defaultdict(int)
    tok_total: dict[int, int] = defaultdict(int)
    ex_right: dict[int, int] = defaultdict(int)
    ex_total: dict[int, int] = defaultdict(int)
    all_tok = all_tok_right = all_ex = all_ex_right = 0
    done = 0
    while done < n_examples:
        exs = [next(stream) for _ in range(min(batch_size, n_examples - done))]
        done += len(exs)
        tokens, mask = batch_examples(exs, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = windowed_loss(model, tokens, mask, sleep_cfg, return_predictions=True)
        right = (out.predictions == tokens[:, 1:]).cpu()
        mask_cpu = mask[:, 1:].cpu().bool()
        for i, ex in enumerate(exs):
            hits = right[i][mask_cpu[i]].tolist()
            depths = ex.answer_depths
            per_depth: dict[int, list[bool]] = defaultdict(list)
            for d, h in zip(depths, hits, strict=True):
                per_depth[d].append(h)
                tok_total[d] += 1
                tok_right[d] += int(h)
            for d, hs in per_depth.items():
                ex_total[d] += 1
                ex_right[d] += int(all(hs))
            all_tok += len(hits)
            all_tok_right += sum(hits)
            all_ex += 1
            all_ex_right += int(all(hits))
    model.train(was_training)
    by_depth = {
        int(d): {"token_acc": tok_right[d] / tok_total[d],
                 "example_acc": ex_right[d] / ex_total[d],
                 "tokens": tok_total[d], "examples": ex_total[d]}
        for d in sorted(tok_total)
    }
    return {"token_acc": all_tok_right / max(all_tok, 1),
            "example_acc": all_ex_right / max(all_ex, 1), "n": all_ex, "by_depth": by_depth}


def format_table(result: dict[str, Any], depth_name: str = "depth") -> str:
    """A plain-text table of accuracy by depth."""
    lines = [f"{depth_name:>6} | token acc | example acc | examples",
             "-------+-----------+-------------+---------"]
    for d, r in result["by_depth"].items():
        lines.append(f"{d:>6} | {r['token_acc']:9.3f} | {r['example_acc']:11.3f} | "
                     f"{r['examples']:8d}")
    lines.append(f"{'all':>6} | {result['token_acc']:9.3f} | {result['example_acc']:11.3f} | "
                 f"{result['n']:8d}")
    return "\n".join(lines)
