"""Report: cosine similarity of truncated / implicit gradients to full BPTT on a config.

    python tools/grad_modes_report.py configs/rule110_tiny.yaml --passes 4 --batch 16

Builds the config's model (seeded), draws one training batch of its task, and prints the
cosine similarity (over all parameters) of each mode's gradient to the full-BPTT gradient,
for k (truncated, phantom) and m (Neumann) in --ks.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import sleeptrain
    from sleeptrain.data.tasks import build_task
    from sleeptrain.eval.tasks import batch_examples
    from sleeptrain.sleep import windowed_loss

    cfg = sleeptrain.load_config(args.config, ["train.device=cpu", f"sleep.passes={args.passes}",
                                               *args.overrides])
    model = sleeptrain.build_model(cfg, device="cpu")
    task = build_task(cfg.data.task, **dict(cfg.data.task_args))
    stream = task.stream("train", cfg.train.seed, 0)
    tokens, mask = batch_examples([next(stream) for _ in range(args.batch)], "cpu")

    def grad(**kw) -> torch.Tensor:
        sc = cfg.sleep.copy()
        for k, v in kw.items():
            setattr(sc, k, v)
        model.zero_grad(set_to_none=True)
        windowed_loss(model, tokens, mask, sc).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full = grad(grad_mode="full")
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        for label, kw in (("truncated", {"grad_mode": "truncated", "grad_passes": k}),
                          ("implicit-phantom", {"grad_mode": "implicit",
                                                "implicit_method": "phantom", "grad_passes": k}),
                          ("implicit-neumann", {"grad_mode": "implicit",
                                                "implicit_method": "neumann",
                                                "neumann_terms": k})):
            g = grad(**kw)
            cos = torch.nn.functional.cosine_similarity(g, full, dim=0).item()
            rows.append({"mode": label, "k_or_m": k, "cosine_to_full": round(cos, 4)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| mode | k / m | cosine to full (N={args.passes}) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['k_or_m']} | {r['cosine_to_full']:.4f} |")


if __name__ == "__main__":
    main()
