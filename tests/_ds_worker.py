"""Trains a few steps with each case's overrides (megatron or DeepSpeed engine) and, on rank 0,
saves per case the logged losses and gradient norms, the final weights (gathered from the
ZeRO partitions), DeepSpeed's count of reduction collectives per step and, on a GPU, the peak
of allocated GPU memory.

Run by tests/test_deepspeed.py (2 ranks, gloo) and tests/test_deepspeed_gpu.py (1 GPU) under
torch.distributed.run:
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ds_worker.py OUT.pt
'{"case": ["key=value", ...], ...}' BASE_DIR`` (each case's run directory: BASE_DIR/case).
A DeepSpeed case gets a JSON file turning on DeepSpeed's communication logger
(``deepspeed.config_file``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _weights(trainer: Any) -> dict[str, torch.Tensor]:
    """The model's full weights on every rank (ZeRO-3 partitions gathered)."""
    params = list(trainer.model.parameters())
    if trainer.cfg.train.engine == "deepspeed" and trainer.engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                    if isinstance(v, torch.Tensor)}
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                    if isinstance(v, torch.Tensor)}


def _reductions() -> dict[str, int]:
    """DeepSpeed's logged reduction collectives (name -> calls) since the last reset."""
    from deepspeed.comm import comm

    counts = {name: sum(v[0] for v in sizes.values())
              for name, sizes in comm.comms_logger.comms_dict.items() if "reduce" in name}
    comm.comms_logger.reset_data()
    return counts


def run_case(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    import sleeptrain
    from sleeptrain.parallel.state import init_parallel
    from sleeptrain.train.logging import read_metrics
    from sleeptrain.train.signals import process_stop_flag
    from sleeptrain.train.trainer import Trainer

    cfg = sleeptrain.load_config(None, [*overrides, f"train.run_dir={run_dir}"])
    deepspeed_engine = cfg.train.engine == "deepspeed"
    if deepspeed_engine:
        from sleeptrain.train.ds_engine import DeepSpeedTrainer as Engine

        # one file per rank: both ranks writing one file raced (a rank read it half written)
        rank = os.environ.get("RANK", "0")
        logger = run_dir.parent / f"{run_dir.name}_ds_rank{rank}.json"
        logger.write_text(json.dumps({"comms_logger": {"enabled": True, "prof_all": True}}))
        cfg.deepspeed.config_file = str(logger)
    else:
        Engine = Trainer
    info = init_parallel(cfg.parallel.tp, cfg.parallel.backend, cfg.train.device)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(info.device)
    trainer = Engine(cfg, info, process_stop_flag())
    trainer.setup()
    if deepspeed_engine:
        _reductions()  # nothing before the first step counts
    trainer.run()
    trainer.close()
    out = {"weights": _weights(trainer), "reductions": _reductions() if deepspeed_engine else {},
           "peak_bytes": torch.cuda.max_memory_allocated(info.device) if cuda else 0}
    out["weights"] = {k: v.cpu() for k, v in out["weights"].items()}
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    out["loss"] = [r["loss"] for r in rows]
    out["grad_norm"] = [r["grad_norm"] for r in rows]
    out["steps"] = trainer.step
    return out


def main() -> None:
    import torch.distributed as dist

    out_path, cases, base = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    results = {name: run_case(overrides, base / name) for name, overrides in cases.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(results, out_path)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
