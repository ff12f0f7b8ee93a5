"""app.metrics.front_rejected: what nginx answered itself, from its tally logs."""

from __future__ import annotations

from pathlib import Path

from app import metrics


def test_front_rejected_counts_two_bytes_per_answer(tmp_path: Path) -> None:
    (tmp_path / "front-429.tally").write_bytes(b"x\n" * 7)
    family = metrics.front_rejected(tmp_path)
    values = {s.labels["status"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert values == {"429": 7, "503": 0}  # no 503 file yet: none refused
    text = metrics.render([family]).decode()
    assert 'ctr_farm_front_rejected_total{status="429"} 7.0' in text
