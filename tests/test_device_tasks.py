"""Tests of the counter sampler and its device generator (sleeptrain.data.tasks.device).

``device_batch`` must equal stacking the scalar reference ``example_at`` sample for sample;
the counter streams must keep the tasks' layouts and answers (recomputed independently with
the helpers of test_tasks), keep train and test disjoint, and leave the numpy sampler's
streams exactly as they were (golden values recorded before the counter sampler existed).
"""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from test_tasks import (
    check_common,
    depo_key,
    depo_walk,
    parse_depo,
    parse_rule110,
    ref_rule110_first_cells,
)

import sleeptrain.data.tasks.base as base
from sleeptrain.data.tasks import build_task, counter
from sleeptrain.data.tasks import device as dev
from sleeptrain.data.tasks.device import device_batch, device_batch_at, tries_per_round

RULE110 = [
    {},  # width 24, 4 states, t = 4, periodic
    {"t_min": 32, "t_max": 32},  # the paper's setting
    {"t_min": 0, "t_max": 40, "test_t": [50, 64, 7], "boundary": "zero", "width": 16},
    {"t_min": 1, "t_max": 12, "width": 5, "n_states": 3},
    {"t_min": 0, "t_max": 9, "width": 3, "n_states": 1, "test_permille": 400},
    {"t_min": 3, "t_max": 20, "test_t": [9, 9, 17], "width": 70, "n_states": 2},
    {"t_min": 0, "t_max": 5, "width": 130, "n_states": 1, "boundary": "zero"},
]
DEPO = [
    {},  # n in [8, 16], 100 names, window 75, 10 queries, K = 4
    {"window_len": 16, "n_min": 2, "n_max": 16, "K": 6, "test_k": [0, 3, 20, 33]},
    {"n_min": 75, "n_max": 75, "n_names": 80, "name_prefix": "v", "pad_token": "_",
     "context_len": 160, "window_len": 75, "n_queries": 4},
    {"n_min": 40, "n_max": 75, "K": 16, "context_len": 150, "n_queries": 42},  # the paper's
    {"n_min": 5, "n_max": 9, "n_names": 1000, "n_queries": 2, "K": 30, "test_permille": 700},
    {"n_min": 3, "n_max": 3, "n_names": 4, "n_queries": 2, "K": 2, "test_k": [1, 2]},
]
CASES = [("rule110", kw) for kw in RULE110] + [("depo", kw) for kw in DEPO]


def stacked(task, split: str, seed: int, indices) -> tuple[torch.Tensor, ...]:
    """tokens, loss_mask, answer_depths of the scalar reference samples, stacked."""
    exs = [task.example_at(split, seed, int(i)) for i in indices]
    return (torch.tensor([e.tokens for e in exs]), torch.tensor([e.loss_mask for e in exs]),
            torch.tensor([e.answer_depths for e in exs]))


def assert_batch_equal(batch, ref) -> None:
    for got, want in zip((batch.tokens, batch.loss_mask, batch.answer_depths), ref,
                         strict=True):
        assert got.dtype == torch.int64 and got.shape == want.shape
        assert torch.equal(got.cpu(), want)


# ----------------------------------------------------------------------------------------------
# device == scalar reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kw"), CASES, ids=lambda x: x if isinstance(x, str)
                         else json.dumps(x))
@pytest.mark.parametrize("split", ["train", "test"])
def test_device_batch_equals_example_at(name: str, kw: dict, split: str) -> None:
    """Several seeds and starts (up to 2**62): every row equals example_at's sample."""
    task = build_task(name, sampler="counter", **kw)
    count = 6 if kw.get("n_queries", 10) > 20 else 12
    for seed, start in [(0, 0), (7, 10**9), (2**40 + 3, 2**62 + 5)]:
        batch = device_batch(task, split, seed, start, count, "cpu")
        assert_batch_equal(batch, stacked(task, split, seed, range(start, start + count)))


def test_device_batch_at_arbitrary_indices() -> None:
    """Unordered, repeated indices give the samples of those indices."""
    task = build_task("depo", sampler="counter", n_min=3, n_max=9, n_names=12, K=5)
    index = [5, 0, 2**63 - 1, 5, 123456789012]
    batch = device_batch_at(task, "train", 3, torch.tensor(index))
    assert_batch_equal(batch, stacked(task, "train", 3, index))


@pytest.mark.parametrize("name", ["rule110", "depo"])
def test_fallback_rounds_and_chunks(monkeypatch, name: str) -> None:
    """With one try per round (most rows fall back to further rounds) and tiny row chunks,
    in small sample spaces where rejection is frequent, the batch is still exact."""
    kw = ({"width": 3, "n_states": 2, "t_min": 0, "t_max": 3, "test_permille": 300}
          if name == "rule110" else
          {"n_min": 3, "n_max": 3, "n_names": 4, "n_queries": 2, "K": 2, "test_k": [1, 2],
           "test_permille": 500})
    task = build_task(name, sampler="counter", **kw)
    monkeypatch.setattr(dev, "MISS_LOG2", 1)
    monkeypatch.setattr(dev, "ELEMENT_BUDGET", 64)
    for split in ("train", "test"):
        assert tries_per_round(task.test_permille, split) <= 2
        batch = device_batch(task, split, 1, 40, 50, "cpu")
        assert_batch_equal(batch, stacked(task, split, 1, range(40, 90)))


def test_empty_split_raises_like_the_reference(monkeypatch) -> None:
    """A split with no content in a tiny space: both implementations give up after
    MAX_TRIES tries with the same RuntimeError."""
    task = build_task("rule110", sampler="counter", width=3, n_states=1, t_min=0, t_max=0)
    buckets = [task.counter_bucket(([format(v, "03b")], 0)) for v in range(8)]
    assert max(buckets) < 999
    empty = build_task("rule110", sampler="counter", width=3, n_states=1, t_min=0, t_max=0,
                       test_permille=max(buckets) + 1)  # every content is a test sample
    monkeypatch.setattr(base, "MAX_TRIES", 300)
    monkeypatch.setattr(dev, "MAX_TRIES", 300)
    with pytest.raises(RuntimeError, match="no 'train' sample found in 300 draws"):
        empty.example_at("train", 0, 0)
    with pytest.raises(RuntimeError, match="no 'train' sample found in 300 draws"):
        device_batch(empty, "train", 0, 0, 3, "cpu")
    assert device_batch(empty, "test", 0, 0, 3, "cpu").tokens.shape == (3, empty.seq_len)


def test_empty_count_and_errors() -> None:
    """count=0 gives empty batches; a numpy task, bad splits/arguments and bad sampler names
    are refused with the option named."""
    task = build_task("depo", sampler="counter")
    empty = device_batch(task, "test", 0, 9, 0, "cpu")
    assert empty.tokens.shape == (0, task.seq_len) and empty.answer_depths.shape == (0, 10)
    with pytest.raises(ValueError, match="set task_args.sampler=counter"):
        device_batch(build_task("rule110"), "train", 0, 0, 4, "cpu")
    with pytest.raises(ValueError, match="unknown split"):
        device_batch(task, "valid", 0, 0, 4, "cpu")
    with pytest.raises(ValueError, match="test split is empty"):
        device_batch(build_task("rule110", sampler="counter", test_permille=0), "test", 0, 0,
                     1, "cpu")
    with pytest.raises(ValueError, match="start"):
        device_batch(task, "train", 0, -1, 4, "cpu")
    with pytest.raises(ValueError, match="count"):
        device_batch(task, "train", 0, 2**63 - 2, 4, "cpu")
    with pytest.raises(ValueError, match="index"):
        task.example_at("train", 0, 2**63)
    with pytest.raises(ValueError, match="Rule110Config.sampler"):
        build_task("rule110", sampler="philox")
    with pytest.raises(ValueError, match="DepoConfig.sampler"):
        build_task("depo", sampler="Counter")


# ----------------------------------------------------------------------------------------------
# The counter streams themselves
# ----------------------------------------------------------------------------------------------


def test_counter_rng_scalar_equals_torch() -> None:
    """mix64 / stream_key / below / content hash agree bit for bit between Python ints and
    int64 tensors, including words with the top bit set; mix64 matches splitmix64."""
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64)
    words = torch.cat([words, torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])])
    unsigned = [w & counter.M64 for w in words.tolist()]
    assert counter.mix64_t(words).tolist() == [counter.signed64(counter.mix64(u))
                                               for u in unsigned]
    assert counter.below_t(words, 997).tolist() == [counter.below(u, 997) for u in unsigned]
    assert counter.bucket_t(words).tolist() == [counter.bucket(u) for u in unsigned]
    idx = [0, 1, 10**9, 2**63 - 1]
    assert counter.stream_key_t(5, 9, 1, torch.tensor(idx)).tolist() == [
        counter.signed64(counter.stream_key(5, 9, 1, i)) for i in idx]
    rows = words[:12].view(3, 4)
    salts = counter.salts_t(range(4), "cpu")
    want = [counter.signed64(counter.content_hash(enumerate(r & counter.M64 for r in row)))
            for row in rows.tolist()]
    assert counter.content_hash_t(rows, salts).tolist() == want
    # splitmix64 reference value: the first output of the generator seeded with 0
    assert counter.draw(0, 0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize(("name", "kw"), [
    ("rule110", {"t_min": 0, "t_max": 6, "test_t": [9, 7], "boundary": "zero", "width": 16}),
    ("rule110", RULE110[5]), ("depo", DEPO[1]), ("depo", DEPO[2])])
@pytest.mark.parametrize("split", ["train", "test"])
def test_counter_examples_are_valid(name: str, kw: dict, split: str) -> None:
    """Counter samples keep the layout; answers re-derived from the tokens alone are right;
    fields, depths and split_of agree; every allowed t / k occurs."""
    task = build_task(name, sampler="counter", **kw)
    exs = [task.example_at(split, 11, i) for i in range(150)]
    check_common(task, exs)
    depths = set()
    for ex in exs:
        assert task.split_of(ex) == split
        if name == "rule110":
            states, t, answers, positions = parse_rule110(task, ex)
            cells = torch.tensor([[int(c) for c in s] for s in states]).numpy()
            want = ref_rule110_first_cells(cells, torch.full((len(states),), t).numpy(),
                                           task.config.boundary)
            assert answers == want.tolist()
            assert ex.fields == {"states": states, "t": t, "boundary": task.config.boundary,
                                 "answers": answers}
        else:
            edges, queries, positions, lo, hi, _ = parse_depo(task, ex)
            assert hi == task.config.context_len and lo == hi - 2 * len(edges)
            assert all(ans == depo_walk(edges, x, k) for x, k, ans in queries)
            assert ex.fields["edges"] == [list(e) for e in edges]
            assert ex.answer_depths == [k for _, k, _ in queries]
        assert [i for i, m in enumerate(ex.loss_mask) if m] == positions
        depths.update(ex.answer_depths)
    assert depths == set(task.depth_values(split))


@pytest.mark.parametrize(("name", "kw"), [
    ("rule110", {"test_permille": 600}),
    ("depo", {"test_permille": 600, "n_min": 4, "n_max": 10}),
    # tiny spaces, where unsplit streams would collide: 2^6 * 4 = 256 and 8 * 36 = 288 samples
    ("rule110", {"width": 3, "n_states": 2, "t_min": 0, "t_max": 3}),
    ("depo", {"n_min": 3, "n_max": 3, "n_names": 4, "n_queries": 2, "K": 2, "test_k": [1, 2]}),
])
def test_counter_splits_disjoint(name: str, kw: dict) -> None:
    """Thousands of device-generated train and test samples share no content key; the test
    share of a tiny space is about test_permille."""
    task = build_task(name, sampler="counter", **kw)
    keys = {}
    for split in ("train", "test"):
        toks = device_batch(task, split, 4, 0, 3000, "cpu").tokens.tolist()
        if name == "rule110":
            keys[split] = {tuple(t[: task.query_start + 1 + task.t_digits]) for t in toks}
        else:
            keys[split] = {depo_key([task.vocab[i] for i in t], task.config.n_queries)
                           for t in toks}
    assert not keys["train"] & keys["test"]
    if "width" in kw or "n_names" in kw:
        space = 256 if name == "rule110" else 288
        assert len(keys["train"] | keys["test"]) > 0.9 * space
        assert 0.03 < len(keys["test"]) / space < 0.2
    else:
        assert min(len(keys["train"]), len(keys["test"])) > 2900  # no repeats
    # the scalar split assignment agrees on a few
    for split in ("train", "test"):
        assert {task.split_of(task.example_at(split, 4, i)) for i in range(20)} == {split}


def test_counter_stream_and_example() -> None:
    """stream(start) continues example_at; example(rng) draws a (seed, index) sample."""
    task = build_task("rule110", sampler="counter")
    it = task.stream("test", 2, start=10**9)
    assert [next(it) for _ in range(3)] == [task.example_at("test", 2, 10**9 + i)
                                            for i in range(3)]
    rng = __import__("numpy").random.default_rng(0)
    seed, index = (int(v) for v in __import__("numpy").random.default_rng(0).integers(
        0, 1 << 63, size=2))
    assert task.example(rng, "train") == task.example_at("train", seed, index)


# ----------------------------------------------------------------------------------------------
# The numpy sampler is unchanged (golden values recorded from the code before this change)
# ----------------------------------------------------------------------------------------------

GOLDEN = {
    ("rule110", "{}", "train"): "60478e568679e7d3",
    ("rule110", "{}", "test"): "18c37005a937e03d",
    ("rule110", '{"t_min": 32, "t_max": 32}', "train"): "974a3e9b57f6d2b7",
    ("rule110", '{"t_min": 32, "t_max": 32}', "test"): "5778be7e8a5e85de",
    ("depo", "{}", "train"): "7e91dbef81e39ff6",
    ("depo", "{}", "test"): "c0ee157f7b4c888b",
    ("depo", '{"n_min": 40, "n_max": 75, "K": 16}', "train"): "95b027a30196aebb",
    ("depo", '{"n_min": 40, "n_max": 75, "K": 16}', "test"): "c54e915629587499",
}
RULE110_TRAIN_0_0 = [  # build_task("rule110").example_at("train", 0, 0).tokens
    0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0,
    0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0,
    1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0,
    0, 1, 0, 2, 0, 5, 11, 1, 1, 1, 0,
]


@pytest.mark.parametrize(("name", "kw", "split"), list(GOLDEN), ids=str)
def test_numpy_sampler_unchanged(name: str, kw: str, split: str) -> None:
    """The first samples of seed 3 (tokens, masks, depths) hash to the values recorded
    before the counter sampler was added; sampler='numpy' is the default."""
    for task in (build_task(name, **json.loads(kw)),
                 build_task(name, sampler="numpy", **json.loads(kw))):
        h = hashlib.sha256()
        for i in range(8):
            ex = task.example_at(split, 3, i)
            h.update(repr((ex.tokens, ex.loss_mask, ex.answer_depths)).encode())
        assert h.hexdigest()[:16] == GOLDEN[(name, kw, split)]
    tokens = build_task("rule110").example_at("train", 0, 0).tokens
    assert tokens == RULE110_TRAIN_0_0


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "kw", "count"), [
    ("rule110", {"t_min": 32, "t_max": 32}, 512),
    ("rule110", RULE110[2], 256),
    ("rule110", RULE110[5], 64),
    ("depo", {"n_min": 40, "n_max": 75, "K": 16, "context_len": 150, "n_queries": 42}, 128),
    ("depo", DEPO[1], 256),
])
def test_cuda_batch_equals_cpu_batch(name: str, kw: dict, count: int) -> None:
    """The CUDA batch equals the CPU batch (and the reference on a few rows); a call syncs
    with the host once (the miss check)."""
    task = build_task(name, sampler="counter", **kw)
    for split in ("train", "test"):
        for seed, start in [(0, 0), (5, 10**12)]:
            gpu = device_batch(task, split, seed, start, count, "cuda")
            cpu = device_batch(task, split, seed, start, count, "cpu")
            assert_batch_equal(gpu, (cpu.tokens, cpu.loss_mask, cpu.answer_depths))
        assert_batch_equal(device_batch(task, split, 1, 77, 3, "cuda"),
                           stacked(task, split, 1, range(77, 80)))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            device_batch(task, "train", 2, 3, count, "cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


# ----------------------------------------------------------------------------------------------
# Trainer data path and evaluation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["counter", "numpy"])
def test_task_data_batches_follow_the_index_mapping(sampler: str) -> None:
    """TaskData's micro-batches hold examples step * global_batch + (micro * dp_size + rank) *
    batch_size + j of the train stream, on the device path (counter) as on the host path."""
    from types import SimpleNamespace

    from sleeptrain.train.data import TaskData

    task = build_task("rule110", sampler=sampler, t_min=0, t_max=5, width=8)
    cfg = SimpleNamespace(train=SimpleNamespace(seed=9, grad_accum=3),
                          data=SimpleNamespace(batch_size=4))
    for rank in (0, 1):
        info = SimpleNamespace(device=torch.device("cpu"), dp_size=2, dp_rank=rank)
        data = TaskData(task, cfg, info)
        assert data.on_device == (sampler == "counter")
        micro = data.step_batches(5, 3)
        assert len(micro) == 3
        for m, (tokens, mask, doc_starts) in enumerate(micro):
            first = 5 * 24 + (m * 2 + rank) * 4
            ref = stacked(task, "train", 9, range(first, first + 4))
            assert doc_starts is None
            assert torch.equal(tokens, ref[0]) and torch.equal(mask, ref[1])


def _tiny_eval_setup(name: str):
    from conftest import tiny_model

    kw = ({"t_min": 0, "t_max": 3, "width": 8, "n_states": 2} if name == "rule110" else
          {"n_min": 3, "n_max": 6, "n_names": 10, "K": 3, "test_k": [1, 3], "window_len": 8,
           "n_queries": 3})
    task = build_task(name, sampler="counter", **kw)
    cfg, model = tiny_model("sleep.window_len=8", "sleep.passes=2")
    return task, cfg, model


@pytest.mark.parametrize("name", ["rule110", "depo"])
def test_evaluate_task_device_path_equals_host_path(name: str) -> None:
    """On a counter task the device path (device_batch, counts on the device) returns exactly
    the host path's result, loss fields included; the losses are the answer tokens' mean
    cross-entropy, overall and per depth."""
    from sleeptrain.eval.tasks import eval_record, evaluate_task
    from sleeptrain.sleep.runner import windowed_loss

    task, cfg, model = _tiny_eval_setup(name)
    host = evaluate_task(model, task, cfg.sleep, 13, 5, 2, "cpu", path="host")
    device = evaluate_task(model, task, cfg.sleep, 13, 5, 2, "cpu")
    assert device == host
    assert model.training  # restored
    assert set(host["by_depth"]) == set(task.depth_values("test"))
    assert host["n"] == 13 and sum(r["tokens"] for r in host["by_depth"].values()) == 13 * len(
        task.answer_positions)
    # independent losses: all answers at once, and one answer token at a time
    tokens, mask, depths = stacked(task, "test", 2, range(13))
    with torch.no_grad():
        full = windowed_loss(model, tokens, mask, cfg.sleep)
        per_token: dict[int, list[float]] = {}
        for row in range(13):
            for a, pos in enumerate(task.answer_positions):
                one = torch.zeros_like(mask)
                one[row, pos] = 1
                per_token.setdefault(int(depths[row, a]), []).append(
                    float(windowed_loss(model, tokens, one, cfg.sleep).loss))
    assert host["loss"] == pytest.approx(float(full.loss), rel=1e-9)
    for d, r in host["by_depth"].items():
        assert r["loss"] == pytest.approx(sum(per_token[d]) / len(per_token[d]), rel=1e-9)
    rec = eval_record(host)
    for d in host["by_depth"]:
        assert rec[f"eval_loss_depth{d}"] == round(host["by_depth"][d]["loss"], 6)
        assert rec[f"eval_example_acc_depth{d}"] == round(host["by_depth"][d]["example_acc"], 6)
        assert rec[f"eval_acc_depth{d}"] == round(host["by_depth"][d]["token_acc"], 6)
    assert rec["eval_loss"] == round(host["loss"], 6)
    assert rec["eval_example_acc"] == round(host["example_acc"], 6)


def test_evaluate_task_counts_with_a_known_answerer(monkeypatch) -> None:
    """Accuracy counts against predictions we control: right on the depth-1 answers of the
    first 4 examples and on every answer of example 0; both paths count as expected."""
    import sleeptrain.eval.tasks as ev

    task, cfg, model = _tiny_eval_setup("depo")
    tokens, _, depths = stacked(task, "test", 0, range(10))
    pos = torch.tensor(task.answer_positions)

    def fake_forward(model, toks, masks, sleep_cfg, heads, autocast):
        preds = torch.full((toks.shape[0], toks.shape[1] - 1), -1)
        for r in range(toks.shape[0]):
            row = next(i for i in range(10) if torch.equal(tokens[i], toks[r]))
            good = pos if row == 0 else pos[depths[row] == 1] if row < 4 else pos[:0]
            preds[r, good - 1] = toks[r, good]
        return preds, torch.zeros(len(masks), dtype=torch.float64)

    monkeypatch.setattr(ev, "_forward", fake_forward)
    results = [ev.evaluate_task(model, task, cfg.sleep, 10, 3, 0, "cpu", path=p)
               for p in ("host", "device")]
    assert results[0] == results[1]
    res = results[0]
    ones, threes = (depths == 1).sum(1), (depths == 3).sum(1)
    assert 0 < threes[0] < 3 and (threes[1:4] > 0).all()  # the case is not degenerate
    d1, d3 = res["by_depth"][1], res["by_depth"][3]
    assert (d1["tokens"], d3["tokens"]) == (int(ones.sum()), int(threes.sum()))
    assert d1["token_acc"] == int(ones[:4].sum()) / int(ones.sum())
    assert d1["example_acc"] == int((ones[:4] > 0).sum()) / int((ones > 0).sum())
    assert d3["token_acc"] == int(threes[0]) / int(threes.sum())
    assert d3["example_acc"] == 1 / int((threes > 0).sum())
    assert res["example_acc"] == 1 / 10
    assert res["token_acc"] == (int(ones[:4].sum()) + int(threes[0])) / 30
