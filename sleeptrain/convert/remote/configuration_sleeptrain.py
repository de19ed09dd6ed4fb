"""Configuration of an exported sleeptrain model (custom code for ``transformers``).

This file is copied next to the weights by ``sleeptrain.convert.hf_custom.export_custom`` and
loaded with ``AutoConfig.from_pretrained(dir, trust_remote_code=True)``. It imports only the
standard library and ``transformers``.

Fields (all resolved to explicit values at export):

* stack: ``vocab_size``, ``d_model``, ``pattern`` (one symbol per block: ``A`` attention +
  MLP, ``a`` attention, ``G`` gated DeltaNet + MLP, ``g`` gated DeltaNet, ``M`` MLP only),
  ``loop_start``/``loop_end`` (the loop range [a, b) that sleep repeats), ``norm_eps``,
  ``ffn_hidden`` (SwiGLU width), ``tie_word_embeddings``;
* attention: ``n_heads``, ``n_kv_heads``, ``head_dim``, ``rope_theta``, ``qkv_bias``;
* gated DeltaNet: ``gdn_heads`` (query/key heads), ``gdn_v_heads``, ``gdn_head_dim``,
  ``gdn_v_head_dim``, ``conv_kernel``, ``gdn_chunk_size`` (chunk length of the chunked delta
  rule, a speed setting);
* sleep: ``window_len`` (L), ``sleep_passes`` (N: the wake pass plus N-1 sleep passes at every
  eviction), ``eviction`` (``hard``: only the fast weights cross windows; ``sliding``: the
  conv state and the keys/values of the last L-1 tokens cross too).
"""

from __future__ import annotations

from transformers import PretrainedConfig

PATTERN_SYMBOLS = {
    "A": ("attention", True),
    "a": ("attention", False),
    "G": ("gdn", True),
    "g": ("gdn", False),
    "M": (None, True),
}
EVICTIONS = ("hard", "sliding")


class SleeptrainConfig(PretrainedConfig):
    """A sleep hybrid (gated DeltaNet + attention) with its window/sleep settings."""

    model_type = "sleeptrain"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads"}

    def __init__(
        self,
        vocab_size: int = 32,
        d_model: int = 64,
        pattern: str = "AGAG",
        loop_start: int = 0,
        loop_end: int | None = None,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 10000.0,
        qkv_bias: bool = False,
        gdn_heads: int = 2,
        gdn_v_heads: int | None = None,
        gdn_head_dim: int = 32,
        gdn_v_head_dim: int | None = None,
        conv_kernel: int = 4,
        gdn_chunk_size: int = 32,
        ffn_hidden: int = 192,
        norm_eps: float = 1e-6,
        window_len: int = 24,
        sleep_passes: int = 1,
        eviction: str = "hard",
        init_std: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = int(vocab_size)
        self.d_model = int(d_model)
        self.pattern = str(pattern)
        self.loop_start = int(loop_start)
        self.loop_end = len(self.pattern) if loop_end is None else int(loop_end)
        self.n_heads = int(n_heads)
        self.n_kv_heads = int(n_kv_heads or n_heads)
        self.head_dim = int(head_dim or d_model // n_heads)
        self.rope_theta = float(rope_theta)
        self.qkv_bias = bool(qkv_bias)
        self.gdn_heads = int(gdn_heads)
        self.gdn_v_heads = int(gdn_v_heads or gdn_heads)
        self.gdn_head_dim = int(gdn_head_dim)
        self.gdn_v_head_dim = int(gdn_v_head_dim or gdn_head_dim)
        self.conv_kernel = int(conv_kernel)
        self.gdn_chunk_size = int(gdn_chunk_size)
        self.ffn_hidden = int(ffn_hidden)
        self.norm_eps = float(norm_eps)
        self.window_len = int(window_len)
        self.sleep_passes = int(sleep_passes)
        self.eviction = str(eviction)
        self.init_std = float(init_std)
        self.use_cache = bool(use_cache)
        self._check()
        super().__init__(tie_word_embeddings=bool(tie_word_embeddings), **kwargs)

    def _check(self) -> None:
        """Refuses values the model cannot run, naming the field."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"SleeptrainConfig.{key}: {msg}")

        depth = len(self.pattern)
        need(depth > 0, "pattern", "must be a non-empty string")
        bad = sorted({s for s in self.pattern if s not in PATTERN_SYMBOLS})
        need(not bad, "pattern", f"unknown symbols {bad} in {self.pattern!r}; valid: "
             f"{''.join(PATTERN_SYMBOLS)}")
        need(0 <= self.loop_start < depth, "loop_start", f"must be in [0, {depth})")
        need(self.loop_start < self.loop_end <= depth, "loop_end",
             f"must be in ({self.loop_start}, {depth}]")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        need(self.gdn_v_heads % self.gdn_heads == 0, "gdn_v_heads",
             f"{self.gdn_v_heads} is not a multiple of gdn_heads {self.gdn_heads}")
        need(self.window_len >= 1, "window_len", f"must be >= 1, got {self.window_len}")
        need(self.sleep_passes >= 1, "sleep_passes", f"must be >= 1, got {self.sleep_passes}")
        need(self.eviction in EVICTIONS, "eviction",
             f"must be one of {list(EVICTIONS)}, got {self.eviction!r}")
        need(self.conv_kernel >= 1, "conv_kernel", "must be >= 1")
        need(self.gdn_chunk_size >= 1, "gdn_chunk_size", "must be >= 1")


__all__ = ["SleeptrainConfig"]
