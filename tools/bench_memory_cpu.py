"""CPU benchmark: peak memory of one training step (fwd+bwd) vs sleep passes N, with and
without window-pass checkpointing. Each configuration runs in a fresh subprocess and reports
its peak resident set size growth over the model-built baseline (ru_maxrss).

    python tools/bench_memory_cpu.py --passes 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CFG = ["model.d_model=256", "model.pattern=AGAG", "model.n_heads=4", "model.gdn_heads=4",
       "model.gdn_head_dim=64", "model.ffn_hidden=1024", "model.vocab_size=512",
       "sleep.window_len=256", "train.device=cpu"]


def _child(passes: int, ckpt: bool, seq: int, batch: int) -> None:
    import torch

    import sleeptrain
    from sleeptrain.sleep import windowed_loss

    cfg = sleeptrain.load_config(None, [*CFG, f"sleep.passes={passes}",
                                        f"sleep.checkpoint={str(ckpt).lower()}"])
    model = sleeptrain.build_model(cfg, device="cpu")
    tokens = torch.randint(0, 512, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    windowed_loss(model, tokens, mask, cfg.sleep).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"passes": passes, "checkpoint": ckpt, "step_peak_mib": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", default="1,2,4,8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(int(args.child[0]), args.child[1] == "1", args.seq, args.batch)
        return
    rows = []
    for ckpt in (False, True):
        for n in [int(x) for x in args.passes.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--batch",
                                  str(args.batch), "--child", str(n), str(int(ckpt))],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| N | checkpoint | step peak RSS growth MiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['passes']} | {r['checkpoint']} | {r['step_peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
