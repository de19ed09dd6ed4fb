"""CPU benchmark: peak memory of one training step (fwd+bwd) vs sleep passes N, with and
without window-pass checkpointing.

Each configuration runs in a fresh subprocess. Three numbers per row:

* ``alloc_peak_mib``: the exact peak of live bytes in PyTorch's CPU allocator during the step,
  from the profiler's allocation/free events (independent of how malloc retains memory);
* ``boundary_mib``: what checkpointing must keep by construction, the input of every sleep
  pass: the loop-range hidden state [B, L, d] plus the fast weights of the looped GDN blocks,
  for every (window that sleeps) x (sleep pass);
* ``rss_growth_mib``: growth of the process's peak RSS during the step (ru_maxrss), which also
  counts memory glibc's malloc keeps after it was freed.

    python tools/bench_memory_cpu.py --passes 1,2,4,8

With ``--cp 1,2,4`` it measures context parallelism instead: for each C, C processes
(torchrun, gloo) run the same step with every window split over them
(``windowed_loss(context_parallel=True)``), and the table lists every rank's allocator peak
(``--passes`` gives N, its first value; checkpointing on and off).

    python tools/bench_memory_cpu.py --cp 1,2,4 --passes 4
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


def alloc_peak_bytes(fn) -> int:
    """Runs fn under the profiler and returns the peak of live CPU-allocator bytes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def _boundary_bytes(model, cfg, batch: int, seq: int) -> int:
    """Bytes of all sleep-pass inputs kept by per-pass checkpointing."""
    fast = model.init_state(batch).fast
    per_pass = batch * cfg.sleep.window_len * cfg.model.d_model * 4  # fp32 hidden
    per_pass += sum(fast[i].numel() * fast[i].element_size() for i in model.gdn_blocks()
                    if model.loop_start <= i < model.loop_end)
    sleeping_windows = -(-seq // cfg.sleep.window_len) - 1  # the last window never sleeps
    return per_pass * sleeping_windows * max(0, cfg.sleep.passes - 1)


def _cp_child(passes: int, ckpt: bool, seq: int, batch: int, cp: int) -> None:
    """One rank of the CP measurement: its allocator peak of one step, gathered to rank 0."""
    import torch
    import torch.distributed as dist

    import sleeptrain
    from sleeptrain.sleep import windowed_loss

    cfg = sleeptrain.load_config(None, [*CFG, f"sleep.passes={passes}", f"parallel.cp={cp}",
                                        "parallel.backend=gloo",
                                        f"sleep.checkpoint={str(ckpt).lower()}"])
    model = sleeptrain.build_model(cfg, device="cpu")
    tokens = torch.randint(0, 512, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)

    def step() -> None:
        windowed_loss(model, tokens, mask, cfg.sleep, context_parallel=True).loss.backward()

    peak = alloc_peak_bytes(step) / 2**20
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, peak)
    if dist.get_rank() == 0:
        print(json.dumps({"cp": cp, "passes": passes, "checkpoint": ckpt,
                          "rank_peaks_mib": [round(x, 1) for x in every]}))


def _cp_table(args: argparse.Namespace) -> None:
    n = int(args.passes.split(",")[0])
    rows = []
    for ckpt in (False, True):
        for cp in [int(x) for x in args.cp.split(",")]:
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={cp}", __file__, "--seq", str(args.seq),
                                  "--batch", str(args.batch), "--cp-child", str(n),
                                  str(int(ckpt)), str(cp)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["checkpoint"]: max(r["rank_peaks_mib"]) for r in rows if r["cp"] == rows[0]["cp"]}
    print(f"\n| C | checkpoint | allocator peak per rank MiB (max) | x of C={rows[0]['cp']} | "
          "every rank |\n|---|---|---|---|---|")
    for r in rows:
        top = max(r["rank_peaks_mib"])
        print(f"| {r['cp']} | {r['checkpoint']} | {top:.1f} | {top / base[r['checkpoint']]:.2f} "
              f"| {r['rank_peaks_mib']} |")


def _child(passes: int, ckpt: bool, seq: int, batch: int, exact: bool) -> None:
    import torch

    import sleeptrain
    from sleeptrain.sleep import windowed_loss

    cfg = sleeptrain.load_config(None, [*CFG, f"sleep.passes={passes}",
                                        f"sleep.checkpoint={str(ckpt).lower()}"])
    model = sleeptrain.build_model(cfg, device="cpu")
    tokens = torch.randint(0, 512, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)

    def step() -> None:
        windowed_loss(model, tokens, mask, cfg.sleep).loss.backward()

    row = {"passes": passes, "checkpoint": ckpt,
           "boundary_mib": _boundary_bytes(model, cfg, batch, seq) / 2**20}
    if exact:
        row["alloc_peak_mib"] = alloc_peak_bytes(step) / 2**20
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        row["rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", default="1,2,4,8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cp", default="", help="context-parallel sizes, e.g. 1,2,4")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--cp-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cp_child:
        _cp_child(int(args.cp_child[0]), args.cp_child[1] == "1", args.seq, args.batch,
                  int(args.cp_child[2]))
        return
    if args.cp:
        _cp_table(args)
        return
    if args.child:
        _child(int(args.child[0]), args.child[1] == "1", args.seq, args.batch,
               args.child[2] == "1")
        return
    rows = []
    for ckpt in (False, True):
        for n in [int(x) for x in args.passes.split(",")]:
            row: dict = {}
            for exact in ("1", "0"):  # separate processes: the profiler perturbs RSS
                out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq),
                                      "--batch", str(args.batch), "--child", str(n),
                                      str(int(ckpt)), exact],
                                     capture_output=True, text=True, check=True)
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["checkpoint"]: r["alloc_peak_mib"] for r in rows if r["passes"] == rows[0]["passes"]}
    print("\n| N | checkpoint | allocator peak MiB | boundary tensors MiB "
          "| peak - boundaries - peak(N=first) | RSS growth MiB |\n|---|---|---|---|---|---|")
    for r in rows:
        rest = r["alloc_peak_mib"] - r["boundary_mib"] - base[r["checkpoint"]]
        print(f"| {r['passes']} | {r['checkpoint']} | {r['alloc_peak_mib']:.1f} "
              f"| {r['boundary_mib']:.1f} | {rest:+.1f} | {r['rss_growth_mib']:.0f} |")


if __name__ == "__main__":
    main()
