"""Accuracy by reasoning depth on the synthetic tasks (t for rule110, k for depo)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from sleeptrain.config import SleepConfig
from sleeptrain.sleep import SleepModel
from sleeptrain.sleep.runner import window_heads, windowed_loss


def batch_examples(examples: list[Any], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """tokens, loss_mask [B, T] (int64) for a list of equal-length task examples."""
    tokens = torch.tensor([e.tokens for e in examples], dtype=torch.long)
    mask = torch.tensor([e.loss_mask for e in examples], dtype=torch.long)
    return tokens.to(device), mask.to(device)


def _depth_masks(loss_mask: torch.Tensor, answer_index: torch.Tensor,
                 depths: torch.Tensor, depth_values: torch.Tensor) -> list[torch.Tensor]:
    """One loss mask [B, T] per depth value: ``loss_mask`` restricted to the answers of that
    depth (``depths`` [B, n_answers] at the positions ``answer_index`` [n_answers])."""
    if depth_values.shape[0] == 1:
        return [loss_mask]
    out = []
    for d in range(depth_values.shape[0]):
        m = torch.zeros_like(loss_mask)
        m[:, answer_index] = (depths == depth_values[d]).to(loss_mask.dtype)
        out.append(m)
    return out


def _forward(model: Any, tokens: torch.Tensor, masks: list[torch.Tensor], sleep_cfg: SleepConfig,
             heads: list[bool], autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(wake-pass argmax predictions [B, T-1], summed answer cross-entropy per mask [D],
    float64): one ``windowed_loss`` pass with per-token losses, summed under each mask."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = windowed_loss(model, tokens, masks[0], sleep_cfg, return_predictions=True,
                            return_token_loss=True, heads=heads)
    ce = out.token_loss.double()
    sums = [(ce * m[:, 1:].to(ce.dtype)).sum() for m in masks]
    return out.predictions, torch.stack(sums)


def _result(depth_values: list[int], counts: list[list[float]], n_examples: int,
            all_right: int) -> dict[str, Any]:
    """The result dict from per-depth [token right, tokens, examples right, examples, loss
    sum] counts (depths without answers are left out)."""
    by_depth = {
        int(d): {"token_acc": c[0] / c[1], "example_acc": c[2] / c[3], "loss": c[4] / c[1],
                 "tokens": int(c[1]), "examples": int(c[3])}
        for d, c in zip(depth_values, counts, strict=True) if c[1] > 0
    }
    n_tok = sum(c[1] for c in counts)
    return {"token_acc": sum(c[0] for c in counts) / max(n_tok, 1),
            "example_acc": all_right / max(n_examples, 1),
            "loss": sum(c[4] for c in counts) / max(n_tok, 1),
            "n": n_examples, "by_depth": by_depth}


@torch.no_grad()
def evaluate_task(model: SleepModel, task: Any, sleep_cfg: SleepConfig, n_examples: int,
                  batch_size: int, seed: int, device: torch.device | str,
                  autocast: bool = False, path: str = "auto") -> dict[str, Any]:
    """Exact-match accuracy and answer loss on the first ``n_examples`` of the task's test
    stream.

    Returns {'token_acc', 'example_acc', 'loss', 'n', 'by_depth': {depth: {'token_acc',
    'example_acc', 'loss', 'tokens', 'examples'}}}. A token is right when the wake-pass argmax
    at the position before it equals it; an example is right when all its answer tokens are;
    depth buckets are the task's per-answer depths (an example counts in each of its answers'
    buckets, and is right there when all its answers of that depth are). ``loss`` is the mean
    cross-entropy over answer tokens (per depth: over that depth's answer tokens), from one
    ``windowed_loss`` call per depth with the loss mask restricted to that depth's answers.

    ``path``: ``'device'`` generates batches with ``device_batch`` on ``device`` and counts on
    the device (one host sync per batch, from the generator, and one at the end; counter
    tasks only); ``'host'`` builds ``Example``s and counts on the host; ``'auto'``: device for
    counter tasks. Both give the same result for the same task.
    """
    if path == "auto":
        path = "device" if getattr(task, "sampler", "numpy") == "counter" else "host"
    if path not in ("host", "device"):
        raise ValueError(f"evaluate_task: path must be 'auto', 'host' or 'device', got {path!r}")
    was_training = model.training
    model.eval()
    try:
        run = _evaluate_device if path == "device" else _evaluate_host
        return run(model, task, sleep_cfg, n_examples, batch_size, seed, device, autocast)
    finally:
        model.train(was_training)


def _layout(task: Any, sleep_cfg: SleepConfig, device: torch.device | str
            ) -> tuple[list[int], torch.Tensor, torch.Tensor, list[bool]]:
    """(test depth values, on the device; answer positions [n_answers]; the windows holding
    an answer, for ``windowed_loss``'s ``heads``)."""
    depth_values = list(task.depth_values("test"))
    row = torch.zeros(1, task.seq_len, dtype=torch.long)
    row[0, task.answer_positions] = 1
    heads = window_heads(row, sleep_cfg.window_len)
    return (depth_values, torch.tensor(depth_values, dtype=torch.long, device=device),
            torch.tensor(task.answer_positions, dtype=torch.long, device=device), heads)


def _evaluate_host(model: Any, task: Any, sleep_cfg: SleepConfig, n_examples: int, batch_size: int,
                   seed: int, device: torch.device | str, autocast: bool) -> dict[str, Any]:
    """``evaluate_task`` with ``Example``s built on the host and counted there."""
    depth_list, depth_values, answer_index, heads = _layout(task, sleep_cfg, device)
    slot = {d: i for i, d in enumerate(depth_list)}
    stream = task.stream("test", seed, 0)
    counts = [[0.0] * 5 for _ in depth_list]
    loss_sums = torch.zeros(len(depth_list), dtype=torch.float64, device=device)
    all_ex = all_ex_right = 0
    done = 0
    while done < n_examples:
        exs = [next(stream) for _ in range(min(batch_size, n_examples - done))]
        done += len(exs)
        tokens, mask = batch_examples(exs, device)
        depths = torch.tensor([e.answer_depths for e in exs], dtype=torch.long, device=device)
        masks = _depth_masks(mask, answer_index, depths, depth_values)
        preds, sums = _forward(model, tokens, masks, sleep_cfg, heads, autocast)
        loss_sums += sums
        right = (preds == tokens[:, 1:]).cpu()
        mask_cpu = mask[:, 1:].cpu().bool()
        for i, ex in enumerate(exs):
            hits = right[i][mask_cpu[i]].tolist()
            per_depth: dict[int, list[bool]] = defaultdict(list)
            for d, h in zip(ex.answer_depths, hits, strict=True):
                per_depth[d].append(h)
                counts[slot[d]][1] += 1
                counts[slot[d]][0] += int(h)
            for d, hs in per_depth.items():
                counts[slot[d]][3] += 1
                counts[slot[d]][2] += int(all(hs))
            all_ex += 1
            all_ex_right += int(all(hits))
    for c, ls in zip(counts, loss_sums.tolist(), strict=True):
        c[4] = ls
    return _result(depth_list, counts, all_ex, all_ex_right)


def _evaluate_device(model: Any, task: Any, sleep_cfg: SleepConfig, n_examples: int,
                     batch_size: int, seed: int, device: torch.device | str,
                     autocast: bool) -> dict[str, Any]:
    """``evaluate_task`` with ``device_batch`` batches counted on the device."""
    from sleeptrain.data.tasks.device import check_counter_task, device_batch

    check_counter_task(task, "test")
    depth_list, depth_values, answer_index, heads = _layout(task, sleep_cfg, device)
    # per depth: token right, tokens, examples right, examples, loss sum
    acc = torch.zeros(len(depth_list), 5, dtype=torch.float64, device=device)
    all_right = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    while done < n_examples:
        nb = min(batch_size, n_examples - done)
        batch = device_batch(task, "test", seed, done, nb, device)
        done += nb
        tokens, depths = batch.tokens, batch.answer_depths
        masks = _depth_masks(batch.loss_mask, answer_index, depths, depth_values)
        preds, sums = _forward(model, tokens, masks, sleep_cfg, heads, autocast)
        hits = preds[:, answer_index - 1] == tokens[:, answer_index]  # [B, n_answers]
        sel = depths[:, None, :] == depth_values[None, :, None]  # [B, D, n_answers]
        has = sel.any(2)
        ok = (hits[:, None, :] | ~sel).all(2) & has
        batch_counts = torch.stack([(sel & hits[:, None, :]).sum((0, 2)), sel.sum((0, 2)),
                                    ok.sum(0), has.sum(0)], 1).double()
        acc += torch.cat([batch_counts, sums[:, None]], 1)
        all_right += hits.all(1).sum()
    flat = torch.cat([acc.flatten(), all_right[None]]).tolist()  # the one sync at the end
    counts = [flat[5 * i:5 * i + 5] for i in range(len(depth_list))]
    return _result(depth_list, counts, done, int(flat[-1]))


def format_table(result: dict[str, Any], depth_name: str = "depth") -> str:
    """A plain-text table of accuracy and answer loss by depth."""
    nan = float("nan")
    lines = [f"{depth_name:>6} | token acc | example acc |   loss | examples",
             "-------+-----------+-------------+--------+---------"]
    for d, r in result["by_depth"].items():
        lines.append(f"{d:>6} | {r['token_acc']:9.3f} | {r['example_acc']:11.3f} | "
                     f"{r.get('loss', nan):6.3f} | {r['examples']:8d}")
    lines.append(f"{'all':>6} | {result['token_acc']:9.3f} | {result['example_acc']:11.3f} | "
                 f"{result.get('loss', nan):6.3f} | {result['n']:8d}")
    return "\n".join(lines)


def eval_record(ev: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl fields of an evaluation result: for a task, ``eval_token_acc``,
    ``eval_example_acc`` (exact match: all answers right), ``eval_loss`` (mean answer
    cross-entropy) and per depth ``eval_acc_depth{d}`` (token accuracy),
    ``eval_example_acc_depth{d}`` and ``eval_loss_depth{d}``; for eval shards the held-out
    ``eval_loss`` and ``eval_token_acc``."""
    if "by_depth" not in ev:
        return {"eval_loss": round(ev["loss"], 6), "eval_token_acc": round(ev["token_acc"], 6)}
    rec = {"eval_token_acc": round(ev["token_acc"], 6),
           "eval_example_acc": round(ev["example_acc"], 6)}
    if "loss" in ev:
        rec["eval_loss"] = round(ev["loss"], 6)
    for d, r in ev["by_depth"].items():
        rec[f"eval_acc_depth{d}"] = round(r["token_acc"], 6)
        rec[f"eval_example_acc_depth{d}"] = round(r["example_acc"], 6)
        if "loss" in r:
            rec[f"eval_loss_depth{d}"] = round(r["loss"], 6)
    return rec
