"""Batched streaming inference (``sleeptrain.infer.batched``) equals the unbatched ``Stream``
per sample: prefill of samples of different lengths, decode across window boundaries (sleep
and eviction inside decode), greedy generation; bad input is named; state is O(window)."""

from __future__ import annotations

import pytest
import torch

from sleeptrain.infer import BatchedStream, Stream, generate
from tests.conftest import tiny_model

L = 6
# shorter than a window, exactly one window (it sleeps inside decode), and 3 to 5 windows
LENGTHS = [3, 6, 13, 20, 25]


def _prompts(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 16, (n,), generator=g) for n in lengths]


def _stream_state(st: Stream, sliding: bool) -> dict:
    """A Stream's state in ``BatchedStream.sample_state``'s form (batch of one)."""
    w = st.win
    attn = [i for i, b in enumerate(st.net.blocks) if b.kind == "attention"]
    gdn = [i for i, b in enumerate(st.net.blocks) if b.kind == "gdn"]
    carry = sliding and any(w.start.kv[i] is not None for i in attn)
    return {
        "position": st.position, "fill": w.n,
        "fast": {i: w.fast[i][0] for i in gdn},
        "conv": {i: w.conv[i][0] for i in gdn},
        "conv_start": {i: w.start.conv[i][0] for i in gdn} if carry else {},
        "kv": {i: tuple(torch.cat([p[j] for p in w.kv[i]], 1)[0] for j in (0, 1))
               for i in attn},
        "carry": {i: (w.start.kv[i][0][0], w.start.kv[i][1][0]) for i in attn} if carry else {},
        "h_loop": torch.cat(w.h_loop, 1)[0],
    }


def _max_diff(a, b) -> float:
    """Largest absolute difference of two equally structured states (inf if they differ in
    structure or shape)."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int):
        return 0.0 if a == b else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0


CASES = [(ev, n, "GaMgA", 1, 4) for ev in ("hard", "sliding") for n in (1, 3)]
CASES.append(("sliding", 3, "AGgAG", 0, 2))  # loop range at the stack's start, attention first


@pytest.mark.parametrize("eviction, passes, pattern, lo, hi", CASES)
def test_batched_prefill_and_decode_equal_stream(eviction, passes, pattern, lo, hi):
    """Prefill of 5 samples of lengths 3..25 (window 6) in one batch, then 8 teacher-forced
    decode steps (every sample crosses a window boundary: its window sleeps and is evicted
    inside decode), against one unbatched ``Stream`` per sample: the logits at the last
    context token, the state after prefill (fast weights, conv states, the window's keys /
    values and loop-range outputs, carry, fill, position), every decode step's logits and the
    final state. Tolerance 1e-12: float64, the same operations on other batch sizes (and the
    decode attention over a masked static cache: extra exact zeros in its sums), so only
    the order of float64 sums differs (measured below 1e-14)."""
    cfg, model = tiny_model(f"sleep.eviction={eviction}", f"sleep.window_len={L}",
                            f"sleep.passes={passes}", f"model.pattern={pattern}",
                            f"model.loop_start={lo}", f"model.loop_end={hi}")
    sliding = eviction == "sliding"
    prompts = _prompts(LENGTHS, seed=passes)
    forced = torch.randint(0, 16, (len(prompts), 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        bs = BatchedStream(model, len(prompts))
        first = bs.prefill(prompts)
        refs = [Stream(model, 1) for _ in prompts]
        ref_first = torch.stack([st.feed(p[None])[0] for st, p in zip(refs, prompts,
                                                                       strict=True)])
        assert (first - ref_first).abs().max().item() <= 1e-12
        for j, st in enumerate(refs):
            assert _max_diff(bs.sample_state(j), _stream_state(st, sliding)) <= 1e-12, j
        for k in range(forced.shape[1]):
            got = bs.step(forced[:, k]).clone()
            ref = torch.cat([st.feed(forced[j:j + 1, k:k + 1]) for j, st in enumerate(refs)])
            assert (got - ref).abs().max().item() <= 1e-12, k
        for j, st in enumerate(refs):
            assert _max_diff(bs.sample_state(j), _stream_state(st, sliding)) <= 1e-12, j
    assert bs.windows_slept == sum(st.windows_slept for st in refs) > len(prompts)
    if passes > 1:  # the sleep passes really changed the state (the test is not vacuous)
        cold = BatchedStream(model, len(prompts), passes=1)
        with torch.no_grad():
            cold.prefill(prompts)
        assert _max_diff(cold.sample_state(4)["fast"], bs.sample_state(4)["fast"]) > 1e-6


def test_generate_batches_equal_single_stream_greedy():
    """``generate`` (batches of 2 samples of different lengths, per-prompt budgets, an EOS)
    gives exactly the tokens of greedy decoding with one unbatched ``Stream`` per prompt
    (token ids: exact; the logits agree to float64 rounding, far from argmax ties here)."""
    cfg, model = tiny_model("sleep.eviction=sliding", f"sleep.window_len={L}",
                            "sleep.passes=2", "model.pattern=GaMgA")
    prompts = [p.tolist() for p in _prompts([4, 11, 6, 17, 2], seed=5)]
    budgets = [9, 3, 14, 7, 0]
    want = []
    with torch.no_grad():
        for p, m in zip(prompts, budgets, strict=True):
            st = Stream(model, 1)
            want.append(st.generate(m, st.feed(torch.tensor([p])), None)[0].tolist())
    assert generate(model, prompts, budgets, batch_size=2) == want
    eos = want[2][3]
    cut = generate(model, prompts, budgets, eos_id=eos, batch_size=3)
    assert cut == [w[: w.index(eos)] if eos in w else w for w in want]


def test_length_dependent_calls_take_dynamic_kernels(monkeypatch):
    """With compiled chains, every call whose shape follows the samples' lengths asks for
    symbolic shapes (compiled="dynamic"): last windows, windows that only a prefix of the
    batch still has, their logits, sleeps while decoding; full windows of the whole batch and
    the decode step ask for static kernels (compiled=True), and the layers are restored
    after each call. Observed through the norms' calls (on CPU the chains run their
    references, so the results are unchanged)."""
    from sleeptrain.model.kernels import fused

    cfg, model = tiny_model(f"sleep.window_len={L}", "sleep.passes=2")
    model.set_kernels(compile=True)
    calls: list[tuple[tuple[int, ...], object]] = []
    norm = fused.rms_norm

    def spy(x, *args, compiled=False):
        calls.append((tuple(x.shape[:2]), compiled))
        return norm(x, *args, compiled=compiled)

    monkeypatch.setattr(fused, "rms_norm", spy)
    b = 3  # 13 tokens twice: 3 windows, the last of 1 token; 25: 5, the last of 1
    with torch.no_grad():
        bs = BatchedStream(model, b)
        bs.prefill(_prompts([13, 13, 25], seed=2))
        for _ in range(L):  # every slot's window fills and sleeps once
            bs.step(torch.zeros(b, dtype=torch.long))
    static = {shape for shape, c in calls if c is True}
    dynamic = {shape for shape, c in calls if c == "dynamic"}
    assert all(c in (True, "dynamic") for _, c in calls)
    assert static == {(b, L), (b, 1)}  # the whole batch's windows 0-1, the decode step
    # windows 2-3 of the 25-token sample alone, the last windows (a bucket of the two
    # 13-token samples, then 25's) and their logits, the sleeps in decode (the two 13-token
    # samples together: one window start; 25 alone)
    assert dynamic == {(1, L), (2, 1), (1, 1), (2, L)}
    assert bs.windows_slept == 3 + 3 + 1 + 1 + b  # prefill's full windows, one sleep each
    assert all(m.compiled is True for m in model.modules() if hasattr(type(m), "compiled"))


def test_state_is_o_window_whatever_the_context():
    """The buffers of a slot are the same size after a 5-token and a 300-token context (one
    window's worth), and decode keeps them (no growth with the tokens decoded); so are the
    model's kept RoPE tables (one window start's, where a long prefill used to keep every
    window's up to RopeTables.max_bytes: 60 MiB more at 1M tokens than at 4k for the 1.3B
    preset on a GPU), also after the unbatched Stream; outside an engine the tables of
    every window are kept again (training reuses them)."""
    cfg, model = tiny_model("sleep.eviction=sliding", f"sleep.window_len={L}")

    def held(bs: BatchedStream) -> int:
        return sum(t.numel() for t in bs._state_tensors())

    sizes, tables = [], []
    with torch.no_grad():
        for n in (5, 300):
            bs = BatchedStream(model, 1)
            bs.prefill(_prompts([n], seed=n))
            sizes.append(held(bs))
            for _ in range(2 * L):
                bs.step(torch.zeros(1, dtype=torch.long))
            sizes.append(held(bs))
            tables.append({k[0] for k in model.rope.cache})
        Stream(model, 1).feed(_prompts([300], seed=1)[0][None])
        tables.append({k[0] for k in model.rope.cache})
    assert len(set(sizes)) == 1 and bs.pos == [300 + 2 * L]
    assert [len(t) for t in tables] == [1, 1, 1], tables
    for start in range(0, 3 * L, L):
        model.rope.get(start, L, 8, 1e4, "cpu", torch.float32)
    assert {k[0] for k in model.rope.cache} == tables[-1] | {0, L, 2 * L}


def test_bad_input_is_named():
    cfg, model = tiny_model(f"sleep.window_len={L}")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BatchedStream(model, 0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        BatchedStream(model, 1, device="cpu", cuda_graph=True)
    bs = BatchedStream(model, 2)
    with pytest.raises(ValueError, match=r"step\(\) before prefill"):
        bs.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="3 samples for a BatchedStream of batch_size 2"):
        bs.prefill([[1], [2], [3]])
    with pytest.raises(ValueError, match="sample 1 is empty"):
        bs.prefill([[1, 2], []])
    with pytest.raises(ValueError, match=r"sample 0: tokens must be 1-D, got shape \(1, 2\)"):
        bs.prefill([torch.zeros(1, 2, dtype=torch.long), [1]])
    with pytest.raises(ValueError, match=r"sample 1: token id 16 outside the vocabulary"):
        bs.prefill([[1], [3, 16]])
    bs.prefill([[1, 2, 3], [4]])
    with pytest.raises(ValueError, match=r"tokens must be \[2\] \(one per sample\)"):
        bs.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="prefilled already"):
        bs.prefill([[1], [2]])
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
        generate(model, [[1], [2]], [3])
    with pytest.raises(ValueError, match="sample 0 is empty"):
        generate(model, [[]], 3)


GPU_MODEL = ["model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2", "model.gdn_heads=2",
             "model.gdn_v_heads=4", "model.gdn_head_dim=64", "model.gdn_v_head_dim=64",
             "model.vocab_size=256", "model.params_dtype=float32", "model.pattern=GaMgA",
             "model.loop_start=1", "model.loop_end=4", "sleep.window_len=16",
             "sleep.passes=2", "train.device=cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("eviction,compiled", [("hard", False), ("sliding", False),
                                               ("hard", True)])
def test_cuda_graph_decode_equals_eager(eviction, compiled):
    """On CUDA (fp32 model, FLA / SDPA kernels), batch of 4 samples of lengths 5..71, window
    16: (1) the batched prefill's last-token logits equal one unbatched ``Stream`` per sample
    to 2e-3 x (1 + the largest |logit|): other batch sizes pick other tilings of FLA's fp32
    kernels, which multiply in TF32 (unit roundoff 4.9e-4), carried through the sleep passes
    of every window (on an H200, 2026-12-02: samples within one window identical, the longer
    ones 8.9e-4 (hard) and 3.6e-3 (sliding) apart at logits up to ~7.4; a first tolerance of
    1e-4 failed there, and the rest of this test has not run yet; on CPU in float64 the two
    engines agree to 1e-12, tests above); (2) the
    decode step replayed as a CUDA graph gives the eager step's logits and state over 48
    teacher-forced tokens (3 windows: sleep and eviction between replays) to 1e-5: the same
    kernels on the same inputs, so a larger difference is a capture bug (a stale buffer or a
    missed update), not rounding. ``compiled``: the layers' elementwise chains compiled, as
    ``load_run`` sets them on CUDA (the eager warm-up steps compile them, the graph replays
    the generated kernels); the bounds are the same: the fp32 chains' compiled and eager
    forms differ by float rounding only (tests/test_fused_gpu.py)."""
    import sleeptrain
    from tests.conftest import TINY

    cfg = sleeptrain.load_config(None, [*TINY, *GPU_MODEL, f"sleep.eviction={eviction}"])
    model = sleeptrain.build_model(cfg, seed=0).eval()
    model.set_kernels(compile=compiled)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).cuda() for n in (5, 16, 40, 71)]
    forced = torch.randint(0, 256, (4, 48), generator=g).cuda()
    with torch.no_grad():
        eager = BatchedStream(model, 4)
        graph = BatchedStream(model, 4, cuda_graph=True)
        first = eager.prefill(prompts)
        ref = torch.stack([Stream(model, 1).feed(p[None])[0] for p in prompts])
        assert (first - ref).abs().max().item() <= 2e-3 * (1 + ref.abs().max().item())
        assert (first - graph.prefill(prompts)).abs().max().item() <= 1e-5
        for k in range(forced.shape[1]):
            a = eager.step(forced[:, k]).clone()
            b = graph.step(forced[:, k]).clone()
            assert (a - b).abs().max().item() <= 1e-5, k
        for j in range(4):
            assert _max_diff(eager.sample_state(j), graph.sample_state(j)) <= 1e-5, j
    assert graph.graph_replays == forced.shape[1] - graph.graph_warmup
    assert graph.windows_slept == eager.windows_slept >= 4 * 3
