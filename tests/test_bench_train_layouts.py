"""tools/bench_train.py's layout strings: TP, PP and CP sizes and the DP that remains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layouts_parse_and_name():
    bt = _tool()
    assert bt.parse_layout("tp2", 8) == {"tp": 2, "pp": 1, "cp": 1, "dp": 4}
    assert bt.parse_layout("tp2pp2", 8) == {"tp": 2, "pp": 2, "cp": 1, "dp": 2}
    assert bt.parse_layout("tp1cp4", 8) == {"tp": 1, "pp": 1, "cp": 4, "dp": 2}
    assert bt.layout_name(bt.parse_layout("tp2pp2", 8)) == "TP2 x PP2 x DP2"
    assert bt.layout_name(bt.parse_layout("tp8", 8)) == "TP8 x DP1"
    with pytest.raises(ValueError, match="does not divide --gpus 8"):
        bt.parse_layout("tp3", 8)
    with pytest.raises(ValueError, match="is not tp<T>"):
        bt.parse_layout("pp2", 8)
