"""Shared fixtures: one process group per test session, tiny fp64 configs."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
warnings.filterwarnings("ignore", message=".*Triton is not supported.*")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if has_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))


@pytest.fixture(scope="session", autouse=True)
def _parallel_groups():
    """A one-process gloo group (TP=1) for the whole session, torn down at the end."""
    from sleeptrain.parallel import destroy_parallel, init_parallel

    init_parallel(tp=1, backend="gloo", device="cpu")
    yield
    destroy_parallel()


TINY = [
    "model.params_dtype=float64",
    "model.vocab_size=16",
    "model.d_model=16",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.gdn_heads=2",
    "model.gdn_v_heads=4",
    "model.gdn_head_dim=8",
    "model.gdn_v_head_dim=4",
    "model.ffn_hidden=24",
    "model.tie_embeddings=false",
    "model.init_std=0.2",
    "train.device=cpu",
]


def tiny_cfg(*extra: str):
    import sleeptrain

    return sleeptrain.load_config(None, [*TINY, *extra])


def tiny_model(*extra: str, seed: int = 0):
    import sleeptrain

    cfg = tiny_cfg(*extra)
    return cfg, sleeptrain.build_model(cfg, device="cpu", seed=seed)
