"""Kernel parity: PyTorch references vs FLA's naive ops (CPU) and FLA's fast kernels (GPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sleeptrain.model.kernels import (
    attention,
    chunked_gated_delta_rule,
    gated_delta_rule,
    recurrent_gated_delta_rule,
)


def _inputs(b=2, t=45, h=3, hv=3, dk=8, dv=6, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = mk(b, t, h, dk)
    k = F.normalize(mk(b, t, h, dk), dim=-1)
    v = mk(b, t, hv, dv)
    gate = -torch.rand(b, t, hv, generator=g, dtype=torch.float64) * 0.5
    beta = torch.rand(b, t, hv, generator=g, dtype=torch.float64)
    s0 = mk(b, hv, dk, dv)
    out = [x.to(dtype=dtype, device=device).requires_grad_() for x in (q, k, v, gate, beta)]
    return (*out, s0.to(dtype=torch.float32 if dtype != torch.float64 else dtype,
                        device=device).requires_grad_())


def _value_and_grads(fn, inputs, seed=1):
    o, s = fn(*inputs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
    ws = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device, s.dtype)
    loss = (o.float() * wo.float()).sum() + (s.float() * ws.float()).sum()
    grads = torch.autograd.grad(loss, inputs)
    return o, s, grads


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_matches_recurrent_fp64(chunk):
    # Same math in two summation orders; fp64 round-off ~1e-15, bound 1e-11.
    inp = _inputs()
    o1, s1, g1 = _value_and_grads(lambda *a: recurrent_gated_delta_rule(*a[:5], None, a[5]), inp)
    o2, s2, g2 = _value_and_grads(
        lambda *a: chunked_gated_delta_rule(*a[:5], None, a[5], chunk_size=chunk), inp)
    assert (o1 - o2).abs().max() < 1e-11 and (s1 - s2).abs().max() < 1e-11
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max() < 1e-10


def test_references_keep_their_dtype_inside_an_autocast_region():
    """The PyTorch references (chunked, recurrent, the context-parallel composition) compute
    in fp32 also inside a bf16 autocast region (as FLA's kernels keep their state in fp32):
    values and gradients equal the ones outside it, bit for bit. Before, autocast rounded
    their products, the state recurrence's included, to bf16."""
    from sleeptrain.model.kernels import compose_chunk_states

    inp = _inputs(dtype=torch.float32)
    fns = [lambda *a: recurrent_gated_delta_rule(*a[:5], None, a[5]),
           lambda *a: chunked_gated_delta_rule(*a[:5], None, a[5], chunk_size=16)]

    def in_autocast(fn):  # the forward in the region, the backward outside (as in training)
        def run(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*a)
        return run

    for fn in fns:
        plain = _value_and_grads(fn, inp)
        mixed = _value_and_grads(in_autocast(fn), inp)
        for a, b in zip([*plain[:2], *plain[2]], [*mixed[:2], *mixed[2]], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    m, e, s0 = (torch.randn(*shape, generator=g, requires_grad=True)
                for shape in ((4, 2, 3, 8, 8), (4, 2, 3, 8, 6), (2, 3, 8, 6)))
    plain = compose_chunk_states(m, e, s0)[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = compose_chunk_states(m, e, s0)[-1]
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


def test_grouped_value_heads_read_their_query_key_head():
    # HV = 2H: value head j must use q/k head j // 2, i.e. equal the H=HV computation with
    # q, k repeated per head.
    q, k, v, g, beta, s0 = _inputs(h=2, hv=4)
    o, s = chunked_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    q2, k2 = q.repeat_interleave(2, 2), k.repeat_interleave(2, 2)
    o_ref, s_ref = recurrent_gated_delta_rule(q2, k2, v, g, beta, initial_state=s0)
    assert (o - o_ref).abs().max() < 1e-11 and (s - s_ref).abs().max() < 1e-11


@pytest.mark.parametrize("naive", ["recurrent", "chunk"])
def test_reference_matches_fla_naive(naive):
    # FLA's naive ops compute in fp32; ours in fp32 here too. Bound 2e-5 absolute on O(1)
    # values and gradients (fp32 accumulation over 45 steps).
    from fla.ops.gated_delta_rule.naive import (
        naive_chunk_gated_delta_rule,
        naive_recurrent_gated_delta_rule,
    )

    inp = _inputs(dtype=torch.float32)
    if naive == "recurrent":
        fla_fn = lambda q, k, v, g, b, s: naive_recurrent_gated_delta_rule(  # noqa: E731
            q, k, v, b, g, initial_state=s, output_final_state=True)
    else:
        fla_fn = lambda q, k, v, g, b, s: naive_chunk_gated_delta_rule(  # noqa: E731
            q, k, v, g, b, chunk_size=16, initial_state=s, output_final_state=True)
    o1, s1, g1 = _value_and_grads(fla_fn, inp)
    for ours in (recurrent_gated_delta_rule, chunked_gated_delta_rule):
        o2, s2, g2 = _value_and_grads(lambda *a, f=ours: f(*a[:5], None, a[5]), inp)
        assert (o1 - o2).abs().max() < 2e-5
        assert (s1 - s2).abs().max() < 2e-5
        for name, a, b in zip("q k v g beta h0".split(), g1, g2, strict=True):
            assert (a - b).abs().max() < 2e-5 * max(1.0, a.abs().max().item()), name


def test_causal_conv_silu_forms_agree():
    # The compiled form (channels-last shifted sums) against the eager one (torch's grouped
    # conv1d) and an explicit loop (fp64: rounding only, |diff| <= 1e-12), values and the
    # gradients of input and weight.
    from sleeptrain.model.kernels import fused

    g = torch.Generator().manual_seed(0)
    ext = torch.randn(2, 13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = fused._causal_conv_silu_shifted(ext, w)
    ref = fused.causal_conv_silu(ext, w)
    loop = torch.stack([torch.nn.functional.silu((ext[:, t : t + 4] * w.t()).sum(1))
                        for t in range(10)], dim=1)
    assert (ref - loop).abs().max().item() <= 1e-12
    assert y.shape == (2, 10, 6)
    assert (y - ref).abs().max().item() <= 1e-12
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, (ext, w), gy)
    g2 = torch.autograd.grad(ref, (ext, w), gy)
    for a, b in zip(g1, g2, strict=True):
        assert (a - b).abs().max().item() <= 1e-12


def test_gdn_inputs_equals_its_parts():
    # fused.gdn_inputs (one function from the GDN projection to the delta rule's inputs, both
    # of its forms) against the parts it replaced: split, concatenation with the conv state,
    # causal_conv_silu, gdn_gates. fp64: rounding only, |diff| <= 1e-12; values and the
    # gradients of every input, the conv state included (it carries gradient across windows).
    from sleeptrain.model.kernels import fused

    g = torch.Generator().manual_seed(1)
    b, t, h, dk, r, dv, k = 2, 9, 2, 4, 2, 3, 4
    cg, gw = 2 * dk + r * dv, 2 * dk + 2 * r * dv + 2 * r

    def leaf(*shape, scale=1.0):
        x = torch.randn(*shape, dtype=torch.float64, generator=g) * scale
        return x.requires_grad_()

    inputs = [leaf(b, t, h, gw), leaf(b, h * cg, k - 1), leaf(h * cg, k, scale=0.5),
              leaf(h * r), leaf(h * r, scale=0.1)]

    def parts(y, state, w, a_log, dt_bias):
        qkv, z, braw, araw = torch.split(y, [cg, r * dv, r, r], dim=-1)
        ext = torch.cat([state.transpose(1, 2), qkv.reshape(b, t, -1)], dim=1)
        c = fused.causal_conv_silu(ext, w).view(b, t, h, cg)
        return (*fused.gdn_gates(c, araw, braw, a_log, dt_bias, dk, h * r, dv),
                z.reshape(b, t, h * r, dv), ext[:, t:].transpose(1, 2))

    shifted = fused._gdn_inputs_via(fused._causal_conv_silu_shifted)
    ref = parts(*inputs)
    weights = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in ref]
    ref_grads = torch.autograd.grad(ref, inputs, weights)
    for fn in (fused.gdn_inputs, shifted):
        outs = fn(*inputs, dk, r, dv)
        assert [o.shape for o in outs] == [o.shape for o in ref]
        for a, e in zip(outs, ref, strict=True):
            assert (a - e).abs().max().item() <= 1e-12
        for a, e in zip(torch.autograd.grad(outs, inputs, weights), ref_grads, strict=True):
            assert (a - e).abs().max().item() <= 1e-12


def test_rope_tables_read_by_a_captured_graph_are_never_evicted(monkeypatch):
    # A table a CUDA graph read during capture is pinned: eviction (least recently used first,
    # within the byte budget) skips it, because the graph holds its address, not a reference.
    # A table missing during capture is computed and not kept. Capture is simulated
    # (layers._capturing) since CPU tests have no CUDA graphs; the byte count stays exact.
    from sleeptrain.model import layers

    table_bytes = 2 * 16 * 8 * 8  # cos + sin, 16 positions x 8 dims, fp64
    tables = layers.RopeTables(max_bytes=4 * table_bytes)

    def get(start):
        return tables.get(start, 16, 8, 10000.0, "cpu", torch.float64)

    first = get(0)
    monkeypatch.setattr(layers, "_capturing", lambda device: True)
    assert get(0)[0] is first[0]  # a hit during capture: pinned
    missing = get(100)  # a miss during capture: computed, not kept
    assert missing[0].shape == (16, 8)
    assert len(tables.cache) == 1
    monkeypatch.setattr(layers, "_capturing", lambda device: False)
    for start in range(16, 16 * 12, 16):  # 11 more tables: the budget holds 4 in all
        get(start)
    keys = [k[0] for k in tables.cache]
    assert keys == [0, 144, 160, 176]  # the pinned one (oldest), then the 3 most recent
    assert get(0)[0] is first[0]
    held = sum(2 * c.numel() * c.element_size() for c, _ in tables.cache.values())
    assert tables.held == held == 4 * table_bytes
    with tables.streaming():  # a miss drops the other starts' tables, never a pinned one
        get(176)  # a hit drops nothing
        assert sorted(k[0] for k in tables.cache) == [0, 144, 160, 176]
        get(192)
    assert sorted(k[0] for k in tables.cache) == [0, 192] and tables.held == 2 * table_bytes


def test_a_model_shares_one_rope_table_set():
    import sleeptrain
    from tests.conftest import TINY

    model = sleeptrain.build_model(sleeptrain.load_config(None, [*TINY, "model.pattern=AGA"]),
                                   seed=0)
    attn = [b.mixer for b in model.blocks if b.kind == "attention"]
    assert len(attn) == 2 and attn[0].rope is attn[1].rope is model.rope


def test_gdn_conv_state_and_segments_in_the_layer():
    # GatedDeltaNet._inputs around fused.gdn_inputs: the new conv state is the last K-1 conv
    # inputs of (incoming state, window) -- also for windows shorter than K-1 --, zeros when
    # no state comes in; with ``segment`` each segment starts from a zero conv state (equal
    # to calling gdn_inputs per segment) and the new state is the last K-1 inputs (zeros in
    # front when the sequence is shorter). fp64: states compared exactly (copies), segment
    # outputs to 1e-12 (rounding).
    import sleeptrain
    from tests.conftest import TINY

    model = sleeptrain.build_model(sleeptrain.load_config(None, [*TINY, "model.pattern=G"]),
                                   seed=0)
    gdn = model.blocks[0].mixer
    g = torch.Generator().manual_seed(3)
    b, h, gw, cg, c, km1 = 2, gdn.h_local, gdn.group_width, gdn.conv_group, gdn.conv_channels, 3
    assert gdn.kernel - 1 == km1

    def conv_inputs(y):  # [B, t, C] in channel order
        return y[..., :cg].reshape(y.shape[0], y.shape[1], c)

    state = torch.randn(b, c, km1, dtype=torch.float64, generator=g)
    for t in (2, 7):
        y = torch.randn(b, t, h, gw, dtype=torch.float64, generator=g)
        new = gdn._inputs(y, state, None)[-1]
        expect = torch.cat([state.transpose(1, 2), conv_inputs(y)], dim=1)[:, -km1:]
        assert torch.equal(new, expect.transpose(1, 2))
        zero_in = gdn._inputs(y, None, None)
        expect0 = gdn._inputs(y, torch.zeros_like(state), None)
        for a, e in zip(zero_in, expect0, strict=True):
            assert torch.equal(a, e)
        outs = gdn._inputs(y, None, 3)
        pieces = [gdn._inputs(y[:, s : s + 3], None, None)[:-1] for s in range(0, t, 3)]
        for j, o in enumerate(outs[:-1]):  # segments batched: another summation order
            assert (o - torch.cat([p[j] for p in pieces], dim=1)).abs().max().item() <= 1e-12
        tail = torch.cat([torch.zeros(b, km1, c, dtype=torch.float64), conv_inputs(y)],
                         dim=1)[:, -km1:]
        assert torch.equal(outs[-1], tail.transpose(1, 2))


@pytest.mark.parametrize("hv", [3, 6])
def test_gdn_token_step_matches_the_references(hv):
    # One token of the rule (decoding) from a random state, grouped value heads included
    # (hv=6 over 3 query/key heads): fused.gdn_token_step vs the recurrent and chunked
    # references, output and new state, fp64: the same sums in other orders, ~1e-15; 1e-12.
    from sleeptrain.model.kernels import fused

    q, k, v, g, beta, s0 = (x.detach() for x in _inputs(t=1, hv=hv))
    o, s = fused.gdn_token_step(q, k, v, g, beta, s0)
    for ref in (recurrent_gated_delta_rule(q, k, v, g, beta, None, s0),
                chunked_gated_delta_rule(q, k, v, g, beta, None, s0)):
        assert o.shape == ref[0].shape and s.shape == ref[1].shape
        assert (o - ref[0]).abs().max().item() <= 1e-12
        assert (s - ref[1]).abs().max().item() <= 1e-12
    # the state changes (the comparison is not of two untouched copies)
    assert (s - s0).abs().max().item() > 1e-3


def test_a_decoding_gdn_layer_with_compiled_chains_takes_the_token_step(monkeypatch):
    # GatedDeltaNet.forward for one token without gradients, chains compiled (on CPU they run
    # as the references): the token step, with the layer's output, new state and conv state
    # equal to the configured backend's (fp64, 1e-12); with gradients on, or T > 1, or the
    # chains eager, the backend runs.
    import sleeptrain
    from sleeptrain.model.kernels import fused
    from tests.conftest import TINY

    model = sleeptrain.build_model(sleeptrain.load_config(None, [*TINY, "model.pattern=G"]),
                                   seed=0)
    gdn = model.blocks[0].mixer
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, model.cfg.d_model, dtype=torch.float64, generator=g)
    state = torch.randn(2, gdn.hv_local, gdn.dk, gdn.dv, dtype=torch.float64, generator=g)
    conv = torch.randn(2, gdn.conv_channels, gdn.kernel - 1, dtype=torch.float64, generator=g)
    calls = []
    step = fused.gdn_token_step
    monkeypatch.setattr(fused, "gdn_token_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    with torch.no_grad():
        ref = gdn(x, state, conv)
        gdn.compiled = True
        got = gdn(x, state, conv)
        zero = gdn(x, None, conv)
        gdn.compiled = False
        zero_ref = gdn(x, None, conv)
    assert len(calls) == 2
    for a, b in zip((*got, *zero), (*ref, *zero_ref), strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-12
    gdn.compiled = True
    gdn(x, state, conv)  # gradients on: the backend
    with torch.no_grad():
        gdn(torch.cat([x, x], dim=1), state, conv)  # two tokens: the backend
    assert len(calls) == 2


def test_qkv_rope_equals_its_parts():
    # fused.qkv_rope against split + reshape + apply_rope (fp64, |diff| <= 1e-12), values and
    # the projection's gradient; and RopeTables' kept tables equal freshly computed ones.
    from sleeptrain.model import layers
    from sleeptrain.model.kernels import fused

    g = torch.Generator().manual_seed(2)
    b, t, kv, group, hd = 2, 7, 2, 3, 8
    y = torch.randn(b, t, kv, (group + 2) * hd, dtype=torch.float64, generator=g,
                    requires_grad=True)
    tables = layers.RopeTables()
    cos, sin = tables.get(5, t, hd, 10000.0, "cpu", torch.float64)
    again = tables.get(5, t, hd, 10000.0, "cpu", torch.float64)
    assert again[0] is cos and again[1] is sin  # kept
    assert cos.dtype == torch.float64 and not cos.requires_grad
    ang = torch.arange(5, 5 + t, dtype=torch.float64)[:, None] / 10000.0 ** (
        torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([ang, ang], dim=-1)  # rotate-half: both halves share the frequencies
    assert (cos - ang.cos()).abs().max().item() <= 1e-12
    assert (sin - ang.sin()).abs().max().item() <= 1e-12
    q, k, v = torch.split(y, [group * hd, hd, hd], dim=-1)
    ref = (fused.apply_rope(q.reshape(b, t, kv * group, hd), cos, sin),
           fused.apply_rope(k, cos, sin), v)
    outs = fused.qkv_rope(y, cos, sin, group)
    weights = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in ref]
    for a, e in zip(outs, ref, strict=True):
        assert a.shape == e.shape and (a - e).abs().max().item() <= 1e-12
    (g1,) = torch.autograd.grad(outs, y, weights)
    (g2,) = torch.autograd.grad(ref, y, weights)
    assert (g1 - g2).abs().max().item() <= 1e-12


def test_unknown_backend_is_named():
    q, k, v, g, beta, s0 = _inputs()
    with pytest.raises(ValueError, match="model.gdn_backend"):
        gated_delta_rule(q, k, v, g, beta, initial_state=s0, backend="cuda-fast")
    with pytest.raises(ValueError, match="model.attention_backend"):
        attention(q, q, q, backend="xformers")


def test_gdn_input_kernel_is_checked_and_triton_wants_cuda(monkeypatch):
    # model.gdn_inputs: a bad value is named by the config check and by the layer; "triton"
    # on CPU tensors (no interpreter) is a clear error naming the key and the way out.
    import sleeptrain
    from sleeptrain.config import ConfigError
    from tests.conftest import TINY

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="model.gdn_inputs"):
        sleeptrain.load_config(None, [*TINY, "model.gdn_inputs=cuda"])
    cfg = sleeptrain.load_config(None, [*TINY, "model.pattern=G", "model.gdn_inputs=triton"])
    gdn = sleeptrain.build_model(cfg, seed=0).blocks[0].mixer
    y = torch.randn(1, 5, gdn.h_local, gdn.group_width)
    with pytest.raises(RuntimeError, match="model.gdn_inputs='triton' runs on CUDA"):
        gdn._inputs(y, None, None)
    with pytest.raises(ValueError, match="model.gdn_inputs"):
        type(gdn)(32, 2, 2, 16, 16, 4, gdn.in_proj.config, 1, 0, 0.02, 0.02, 1e-6,
                  input_kernel="cuda")


def test_flash_backend_missing_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        q = torch.randn(1, 4, 2, 8)
        with pytest.raises(RuntimeError, match="flash-attn"):
            attention(q, q, q, backend="flash")
    else:  # pragma: no cover - only where flash-attn is installed
        pytest.skip("flash-attn is installed here")


def test_banded_attention_with_carry_matches_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 8, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 8, 2, 8, generator=g, dtype=torch.float64)
    out = attention(q, k, v, window=4)
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) / 8**0.5
    qi = torch.arange(5)[:, None] + 3
    kj = torch.arange(8)[None, :]
    allowed = (qi - kj >= 0) & (qi - kj < 4)
    ref = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, -torch.inf).softmax(-1),
                       vv)
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("window, keep", [(None, False), (5, False), (None, True), (5, True)])
def test_one_query_with_grouped_heads_matches_explicit_softmax(window, keep):
    # Decoding (one query per row, 8 query heads over 2 key/value heads): the path that folds
    # each key/value head's query heads into queries of that head, with a band and a
    # per-row key mask, vs an explicit softmax over keys repeated per query head; fp64, 1e-12.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 1, 8, 16, generator=g, dtype=torch.float64)
    k = torch.randn(3, 11, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(3, 11, 2, 16, generator=g, dtype=torch.float64)
    key_keep = torch.rand(3, 11, generator=g) < 0.7 if keep else None
    if keep:
        key_keep[:, -1] = True  # the query's own key
    out = attention(q, k, v, window=window, key_keep=key_keep)
    kk, vv = k.repeat_interleave(4, 2), v.repeat_interleave(4, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) / 16**0.5
    allowed = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    if window is not None:
        allowed[..., : 11 - window] = False
    if keep:
        allowed = allowed & key_keep[:, None, None, :]
    ref = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, -torch.inf).softmax(-1),
                       vv)
    assert out.shape == q.shape and (out - ref).abs().max() < 1e-12


# ----------------------------------------------------------------------------- GPU parity


def _assert_matches_recurrent(inp, tol, **rule_args):
    """``gated_delta_rule(**rule_args)`` on ``inp`` against the fp64 recurrent reference on
    the same (rounded) inputs: o, the final state and the gradients of q, k, v, g, beta and
    the initial state, each within ``tol * max(1, |ref|)``."""
    ref_inp = [x.detach().double().requires_grad_() for x in inp]
    o_r, s_r, g_r = _value_and_grads(
        lambda *a: recurrent_gated_delta_rule(*a[:5], None, a[5]), ref_inp)
    o_f, s_f, g_f = _value_and_grads(
        lambda *a: gated_delta_rule(*a[:5], None, a[5], **rule_args), inp)
    for name, a, b in zip(["o", "state", *"dq dk dv dg dbeta dh0".split()], [o_f, s_f, *g_f],
                          [o_r, s_r, *g_r], strict=True):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, hv", [(torch.float32, 4), (torch.bfloat16, 8)],
                         ids=["fp32-hv4", "bf16-hv8-grouped"])
def test_fla_matches_reference_on_gpu(dtype, hv):
    # FLA's chunked kernel vs the fp64 recurrent reference, values and all gradients (state
    # included). Tolerances: fp32 inputs 2e-3 (FLA uses tf32-class dot products inside),
    # bf16 inputs 5e-2 on O(1) quantities (8-bit mantissa), both relative to max(1, |ref|).
    inp = _inputs(b=2, t=300, h=4, hv=hv, dk=64, dv=64, dtype=dtype, device="cuda")
    _assert_matches_recurrent(inp, 2e-3 if dtype == torch.float32 else 5e-2, backend="fla")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [24, 7, 40])
def test_fla_with_chunks_by_length_matches_reference_on_gpu(t):
    # model.fla_chunk_size=0: FLA's kernels in 32-row chunks for 24 tokens (the Rule 110
    # paper model's windows) and for 7, and 64 from 40 up, against the fp64
    # recurrent reference; values and all gradients (state included), bf16 inputs, grouped
    # value heads. Tolerance as test_fla_matches_reference_on_gpu's bf16 case.
    inp = _inputs(b=3, t=t, h=4, hv=8, dk=64, dv=64, dtype=torch.bfloat16, device="cuda")
    _assert_matches_recurrent(inp, 5e-2, backend="fla", fla_chunk_size=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, t", [(torch.float32, 24), (torch.bfloat16, 24),
                                      (torch.bfloat16, 7), (torch.bfloat16, 64)])
def test_short_matches_reference_on_gpu(dtype, t):
    # model.gdn_backend=short (sleeptrain's one-chunk Triton rule, calls <= 64 tokens)
    # against the fp64 recurrent reference: values and all gradients (state included),
    # grouped value heads. Tolerances relative to max(1, |ref|): fp32 1e-4 (IEEE fp32
    # products, no TF32; 1.4e-5 at worst under the interpreter, tests/test_gdn_short.py),
    # bf16 5e-2 as the FLA case above.
    inp = _inputs(b=3, t=t, h=4, hv=8, dk=64, dv=64, dtype=dtype, device="cuda")
    _assert_matches_recurrent(inp, 1e-4 if dtype == torch.float32 else 5e-2, backend="short")


def test_fla_chunk_by_length_and_its_setting_is_checked():
    # model.fla_chunk_size: a fixed 32/64 is used as is; 0 picks the smallest chunk that
    # holds the call's tokens, 64 from 64 tokens on; other values are config errors.
    import sleeptrain
    from sleeptrain.config import ConfigError
    from sleeptrain.model.kernels.gated_delta import fla_chunk
    from tests.conftest import TINY

    assert [fla_chunk(t, 0) for t in (1, 7, 16, 17, 24, 32, 33, 64, 104)] == \
        [32, 32, 32, 32, 32, 32, 64, 64, 64]
    assert fla_chunk(24, 64) == 64 and fla_chunk(500, 32) == 32
    for bad in (48, 16):  # 16: FLA's TileLang backward refuses it (gated_delta.FLA_CHUNKS)
        with pytest.raises(ConfigError, match="model.fla_chunk_size"):
            sleeptrain.load_config(None, [*TINY, f"model.fla_chunk_size={bad}"])


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5])
def test_fla_decode_lengths_match_reference_on_gpu(t):
    # Gradient-free calls of 1 and 5 tokens (decoding: shorter than one FLA chunk): values and
    # final state vs the fp64 reference, bf16 inputs with grouped value heads; 5e-2 as above.
    inp = [x.detach() for x in _inputs(b=2, t=t, h=4, hv=8, dk=64, dv=64,
                                        dtype=torch.bfloat16, device="cuda")]
    with torch.no_grad():
        o_r, s_r = recurrent_gated_delta_rule(*[x.double() for x in inp[:5]], None,
                                              inp[5].double())
        o_f, s_f = gated_delta_rule(*inp[:5], None, inp[5], backend="fla")
    for name, a, b in (("o", o_f, o_r), ("state", s_f, s_r)):
        err = (a.double() - b).abs().max().item()
        assert err <= 5e-2 * max(1.0, b.abs().max().item()), f"{name}: {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_token_step_matches_reference_on_gpu(dtype):
    # The decode step's rule compiled (fused.gdn_token_step, what a decoding GDN layer runs
    # with compiled chains) vs the fp64 recurrent reference, grouped value heads: bf16 inputs
    # 5e-2 as above; fp32 inputs 1e-4 relative (fp32 sums over dk=64, no TF32 products).
    from sleeptrain.model.kernels import fused

    inp = [x.detach() for x in _inputs(b=4, t=1, h=4, hv=8, dk=64, dv=64, dtype=dtype,
                                        device="cuda")]
    with torch.no_grad():
        o_r, s_r = recurrent_gated_delta_rule(*[x.double() for x in inp[:5]], None,
                                              inp[5].double())
        o_c, s_c = fused.gdn_token_step(*inp, compiled=True)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    assert o_c.dtype == dtype and s_c.dtype == torch.float32
    for name, a, b in (("o", o_c, o_r), ("state", s_c, s_r)):
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: {err}"


@pytest.mark.gpu
def test_decode_attention_matches_math_on_gpu():
    # The single-query path (cuDNN excluded) against an explicit softmax in fp32.
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(2, 1, 8, 64, generator=g).cuda()
    k = torch.randn(2, 37, 2, 64, generator=g).cuda()
    v = torch.randn(2, 37, 2, 64, generator=g).cuda()
    out = attention(q, k, v, window=None)
    kk, vv = k.repeat_interleave(4, 2), v.repeat_interleave(4, 2)
    w = torch.einsum("bqhd,bkhd->bhqk", q, kk).mul(64 ** -0.5).softmax(-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", w, vv)
    assert (out - ref).abs().max().item() < 1e-4  # fp32 kernels vs explicit softmax
    # with a per-row key mask (the batched engine's decode step), bf16 as in inference: 5e-2
    # as for the other bf16 comparisons (8-bit mantissa inputs and output, values up to ~4)
    keep = torch.rand(2, 37, generator=g) < 0.6
    keep[:, -1] = True
    outm = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_keep=keep.cuda())
    wm = torch.einsum("bqhd,bkhd->bhqk", q, kk).mul(64 ** -0.5)
    wm = wm.masked_fill(~keep.cuda()[:, None, None, :], -torch.inf).softmax(-1)
    refm = torch.einsum("bhqk,bkhd->bqhd", wm, vv)
    assert (outm.float() - refm).abs().max().item() < 5e-2


@pytest.mark.gpu
def test_flash_attention_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(2, 64, 8, 64, generator=g).cuda().bfloat16()
    k = torch.randn(2, 100, 2, 64, generator=g).cuda().bfloat16()
    v = torch.randn(2, 100, 2, 64, generator=g).cuda().bfloat16()
    for window in (None, 48):
        a = attention(q, k, v, window=window, backend="flash").float()
        b = attention(q, k, v, window=window, backend="sdpa").float()
        assert (a - b).abs().max().item() < 2e-2  # bf16 outputs of two kernels


@pytest.mark.parametrize("capability, version, caveat", [
    ((9, 0), "3.6.0", True), ((9, 0), "3.4.0", True), ((9, 0), "3.7.1", False),
    ((9, 0), "3.3.1", False), ((8, 0), "3.6.0", False), ((10, 0), "3.5.0", False),
    ((9, 0), "3.7.0+git1a2b", True)])
def test_fla_fp32_gate_caveat_names_hopper_with_the_miscompiling_triton(
        monkeypatch, capability, version, caveat):
    """The caveat (FLA's TileLang backward, issue #640's Triton range) is raised exactly on
    Hopper with Triton >= 3.4 and < 3.7.1."""
    triton = pytest.importorskip("triton")
    from sleeptrain.model.kernels.gated_delta import fla_fp32_gate_caveat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(triton, "__version__", version)
    note = fla_fp32_gate_caveat()
    assert (note is not None) == caveat
    if caveat:
        assert "#640" in note and version in note and "gdn_backend=chunked" in note


def _chain_args(b, t, dtype=torch.float64, seed=0):
    """Arguments of each compiled chain for a batch b of t tokens (small widths, none equal
    to a batch or length used below)."""
    from sleeptrain.model.kernels import fused

    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    h, dk, rr, dv, kk = 2, 8, 2, 6, 4
    cg = 2 * dk + rr * dv
    ang = r(t, 10)
    return {
        "rms_norm": (fused.rms_norm.__wrapped__, (r(b, t, 20), r(20), 1e-6)),
        "swiglu": (fused.swiglu.__wrapped__, (r(b, t, 22),)),
        "qkv_rope": (fused.qkv_rope.__wrapped__, (r(b, t, 2, 5 * 10), ang.cos(), ang.sin(), 3)),
        "gdn_inputs": (fused._gdn_inputs_via(fused._causal_conv_silu_shifted),
                       (r(b, t, h, cg + rr * dv + 2 * rr), r(b, h * cg, kk - 1),
                        r(h * cg, kk), r(h * rr), r(h * rr), dk, rr, dv)),
        "gated_rms_norm": (fused.gated_rms_norm.__wrapped__,
                           (r(b, t, h * rr, dv), r(b, t, h * rr, dv), r(dv), 1e-6,
                            torch.float64)),
    }


def test_dynamic_chains_trace_once_for_every_batch_and_length():
    # Streaming inference runs a batch's last windows through the chains with symbolic
    # shapes (compiled="dynamic"): one trace must serve every (batch, length), where static
    # shapes trace once per shape (a compile per sample's length in a long-context suite).
    # Traced here by dynamo with a counting CPU backend that runs the captured graph, so the
    # check is dynamo's shape handling and the graph's values (the same torch ops: fp64,
    # 1e-12); inductor's GPU kernels of both forms: tests/test_fused_gpu.py.
    from sleeptrain.model.kernels import fused

    shapes = [(3, 7), (5, 24), (2, 13), (4, 9)]
    torch._dynamo.reset()
    try:
        for name in _chain_args(2, 3):
            traced = {True: [], False: []}
            for dynamic in (True, False):
                fn = _chain_args(2, 3)[name][0]
                fast = fused.compiled_chain(
                    fn, dynamic, name,
                    backend=lambda gm, ex, d=dynamic, n=traced: n[d].append(1) or gm.forward)
                for b, t in shapes:
                    ref_fn, args = _chain_args(b, t)[name]
                    want, got = ref_fn(*args), fast(*args)
                    want = want if isinstance(want, tuple) else (want,)
                    got = got if isinstance(got, tuple) else (got,)
                    for w, o in zip(want, got, strict=True):
                        assert w.shape == o.shape
                        torch.testing.assert_close(o, w, rtol=0, atol=1e-12)
            assert len(traced[True]) == 1, (name, len(traced[True]))
            assert len(traced[False]) == len(shapes), (name, len(traced[False]))
    finally:
        torch._dynamo.reset()


def test_dynamic_kernels_switch_compiled_layers_only_and_restore():
    import sleeptrain
    from tests.conftest import TINY

    model = sleeptrain.build_model(sleeptrain.load_config(None, TINY), seed=0)
    layers = [m for m in model.modules() if hasattr(type(m), "compiled")]
    assert len(layers) >= 4
    with model.dynamic_kernels():
        assert all(m.compiled is False for m in layers)  # eager stays eager
    model.set_kernels(compile=True)
    layers[0].compiled = False  # one layer eager by hand
    with model.dynamic_kernels():
        assert layers[0].compiled is False
        assert all(m.compiled == "dynamic" for m in layers[1:])
        with pytest.raises(RuntimeError, match="inside"):
            with model.dynamic_kernels():
                raise RuntimeError("inside")
        assert all(m.compiled == "dynamic" for m in layers[1:])  # the outer block's
    assert layers[0].compiled is False and all(m.compiled is True for m in layers[1:])


def test_a_failing_dynamic_compile_falls_back_to_static_with_one_warning(monkeypatch):
    # A compiler limitation in the dynamic-shape form (Unsupported, BackendCompilerFailed:
    # the latter's cause named) warns once, naming the chain, and the chain runs its static
    # form from then on; a tracing error of the caller's own (TorchRuntimeError) or any other
    # error propagates and switches nothing. torch.compile is replaced by a stand-in (CPU).
    from torch._dynamo.exc import BackendCompilerFailed, TorchRuntimeError, Unsupported

    from sleeptrain.model.kernels import fused

    made = []

    def compile_raising(error):
        def fake_compile(fn, fullgraph, dynamic, backend):
            made.append(dynamic)
            if not dynamic:
                return fn

            def broken(*args):
                raise error

            return broken

        return fake_compile

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(8, generator=g)
    want = fused.rms_norm(x, w, 1e-6)
    monkeypatch.setattr(fused, "_compilable", lambda x: True)
    failed = BackendCompilerFailed("inductor", ValueError("no symbolic shapes today"), None)
    for error, why in ((Unsupported("data-dependent branch"), "Unsupported: data-dependent"),
                       (failed, "ValueError: no symbolic shapes today")):
        made.clear()
        monkeypatch.setattr(fused, "_COMPILED", {})
        monkeypatch.setattr(torch, "compile", compile_raising(error))
        with pytest.warns(UserWarning, match=r"fused\.rms_norm: the dynamic-shape compile "
                          rf"failed \({why}"):
            got = fused.rms_norm(x, w, 1e-6, compiled="dynamic")
        assert torch.equal(got, want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fused.rms_norm(x, w, 1e-6, compiled="dynamic"), want)  # once
        assert sorted(made) == [False, True]
        assert fused._COMPILED[("rms_norm", True)] is fused._COMPILED[("rms_norm", False)]
    for error in (TorchRuntimeError("shape mismatch in the caller's inputs"),
                  RuntimeError("CUDA out of memory")):
        monkeypatch.setattr(fused, "_COMPILED", {})
        monkeypatch.setattr(torch, "compile", compile_raising(error))
        with pytest.raises(RuntimeError, match=str(error)):
            fused.rms_norm(x, w, 1e-6, compiled="dynamic")
        assert ("rms_norm", True) not in fused._COMPILED or \
            fused._COMPILED[("rms_norm", True)] is not fused._COMPILED[("rms_norm", False)]
