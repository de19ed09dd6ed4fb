"""Planning a run: costs (parameters, FLOPs, memory), the GPU's peak, the layout report."""

from sleeptrain.plan.costs import (
    BlockCost,
    backward_passes,
    block_cost,
    linear_weight_count,
    memory_estimate,
    param_count,
    train_flops_per_token,
)
from sleeptrain.plan.hardware import PEAK_BF16, measure_bf16_peak, peak_flops
from sleeptrain.plan.report import check_layout, plan_report, preflight

__all__ = ["PEAK_BF16", "BlockCost", "backward_passes", "block_cost", "check_layout",
           "linear_weight_count", "measure_bf16_peak", "memory_estimate", "param_count",
           "peak_flops", "plan_report", "preflight", "train_flops_per_token"]
