"""sleeptrain: training 'sleep' SSM-attention hybrid language models at scale.

Public API::

    cfg = sleeptrain.load_config("configs/rule110_tiny.yaml", overrides=["sleep.passes=4"])
    model = sleeptrain.build_model(cfg)
    state = model.init_state(batch_size)
    logits, state = model.step_window(tokens, state, passes=4)
    out = sleeptrain.windowed_loss(model, tokens, loss_mask, cfg.sleep)
"""

import warnings

# Import-time notices of optional libraries that say nothing about the user's run.
for _msg in (".*Transformer Engine and Apex are not installed.*",
             ".*Triton is not supported on current platform.*", ".*tp_group is None.*"):
    warnings.filterwarnings("ignore", message=_msg)

from sleeptrain.api import build_model, load_config, windowed_loss  # noqa: E402

__version__ = "0.1.0"
__all__ = ["__version__", "build_model", "load_config", "windowed_loss"]
