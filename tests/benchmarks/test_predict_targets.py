"""benchmarks/predict_targets.py: the three target ratios from one round's cells."""

from __future__ import annotations

from benchmarks.predict_targets import markdown, ratios


def test_ratios_use_the_best_farm_predict_cell_for_scaling() -> None:
    rows = [
        {"cell": "hello", "rps": 10_000.0},
        {"cell": "predict", "rps": 4000.0},
        {"cell": "nobatch", "rps": 5000.0},
        {"cell": "predict_1x1", "rps": 2500.0},
        {"cell": "peer", "rps": 2000.0},
    ]
    assert ratios(rows) == {"scaling": 2.0, "vs_hello": 0.4, "vs_peer": 2.0}


def test_missing_cells_give_no_ratio_and_the_table_has_medians() -> None:
    rounds = [ratios([{"cell": "predict", "rps": 3000.0}, {"cell": "peer", "rps": 1000.0}])]
    assert rounds[0] == {"scaling": None, "vs_hello": None, "vs_peer": 3.0}
    rounds.append({"scaling": None, "vs_hello": None, "vs_peer": 2.0})
    table = markdown([], rounds)
    assert "| median | None | None | 2.5 |" in table
