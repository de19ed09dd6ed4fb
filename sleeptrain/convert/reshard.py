"""Rewrite a run's latest checkpoint for another tensor-parallel layout.

sleeptrain's sharded checkpoints store every tensor by its full (TP-independent) shape, so a
run resumes at any TP size as it is (tests/test_parallel.py). ``reshard`` writes a copy laid
out for the new layout instead: the new run directory's ``config.yaml`` and ``state.pt`` name
the new ``parallel.*`` settings, and the shard files are written by the new layout's ranks
(one file per rank, each holding its own slices; loading reads only local files). Model
weights, optimizer state and the training state (step, RNG, data position, counters) are
carried; the data position is restored by the loader as on any resume at a new layout.

Run it with the target world size, e.g. TP=1 -> TP=2:

    torchrun --nproc-per-node=2 tools/convert.py reshard runs/a runs/a_tp2 parallel.tp=2

After writing, the new checkpoint is loaded back into a fresh model and its logits for a seeded
prompt must equal those of the model that was written (exactly: same layout, same values);
``logits_out`` saves those logits (rank 0) so that two layouts can be compared (tests do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sleeptrain.convert.common import ConversionError, save_run


def reshard(src_run: str | Path, out_run: str | Path, overrides: list[str] | None = None,
            logits_out: str | Path | None = None, length: int = 32, seed: int = 0,
            check: bool = True, *, trust: bool = False) -> dict[str, Any]:
    """Collective (every process of the target layout calls it). Returns a summary dict.
    ``check=False`` skips the read-back (it builds a second model: twice the memory). The
    source checkpoint is verified against its digests while it is loaded (one without
    digests needs ``trust``), and so is the written one when it is read back."""
    import torch.distributed as dist

    from sleeptrain.api import build_model, load_config
    from sleeptrain.train.checkpoint import CheckpointError, find_latest_checkpoint, load_verified
    from sleeptrain.train.dist_ckpt import load_model_weights
    from sleeptrain.train.optim import optimizer_for
    from sleeptrain.train.trainer import load_train_state

    src, out = Path(src_run), Path(out_run)
    if not (src / "config.yaml").is_file():
        raise CheckpointError(f"{src} is not a run directory (no config.yaml)")
    if out.resolve() == src.resolve():
        raise ConversionError(f"the output run {out} is the source run: write a new directory")
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConversionError(f"{out / 'checkpoints'} already holds checkpoints: refusing to "
                              "mix runs (choose an empty directory)")
    latest = find_latest_checkpoint(src)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint under {src / 'checkpoints'}")
    cfg = load_config(src / "config.yaml", [*(overrides or []), f"train.run_dir={out}"])
    model = build_model(cfg)
    opt: Any = None

    def _load(path: Path, state: dict[str, Any]) -> None:
        nonlocal opt
        has_optim = bool(state.get("optim_layout", {}).get("optim")) or "optimizer" in state
        opt = optimizer_for(cfg, model) if has_optim else None
        load_train_state(path, state, model, opt)

    state = load_verified(latest, _load, trust=trust)
    has_optim = opt is not None
    carried = {k: state[k] for k in ("step", "rng", "nonfinite_total", "data") if k in state}
    path = save_run(out, cfg, model, {"resharded_from": str(latest),
                                      "parallel": {"tp": cfg.parallel.tp,
                                                   "sp": cfg.parallel.sequence_parallel}},
                    opt, carried)
    multi = dist.is_initialized()
    summary = {"source": str(latest), "written": str(path), "step": int(state["step"]),
               "tp": cfg.parallel.tp, "world_size": dist.get_world_size() if multi else 1,
               "rank": dist.get_rank() if multi else 0, "optimizer_state": has_optim}
    if not check:
        return summary
    # read back what was written: the same logits, bit for bit
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (1, length), generator=gen)
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = model.eval().forward_parallel(ids.to(device), length).float().cpu()
        fresh = build_model(cfg, seed=cfg.train.seed + 1)  # other weights until loaded
        step_dir = out / "checkpoints" / latest.name
        load_model_weights(step_dir, fresh)
        got = fresh.eval().forward_parallel(ids.to(device), length).float().cpu()
    diff = float((got - ref).abs().max())
    if diff != 0.0:
        raise CheckpointError(f"{step_dir}: the written checkpoint gives other logits than the "
                              f"model that was written (max |diff| {diff:.3e})")
    if logits_out is not None and summary["rank"] == 0:
        torch.save(ref, str(logits_out))
    return {**summary, "readback_max_abs_diff": diff}


__all__ = ["reshard"]
