"""The bar chart of bench.run's figures: what it reads, from JSON or a published report."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import DB_TITLES, Sizes
from bench.plots import draw_bars, from_markdown, from_results, load_results, save_results
from bench.report import Results, render

SIZES = Sizes.quick()


def results() -> Results:
    return Results(
        redis={"store_client": 2000.0, "read": 100.0},
        per_db={
            "postgresql": {
                "sql": {"store_client": 3000.0, "read": 25.0},
                "db": {"store_client": 100.0, "read": 5000.0},
            }
        },
    )


def test_ratios_from_figures_and_from_their_report_agree() -> None:
    """Per figure, sql+ over db+ and Redis as the report's table prints them (> 1: better)."""
    ratios = from_results(results(), ["postgresql"], SIZES)
    rows = {label: (db, red) for label, db, red in ratios[DB_TITLES["postgresql"]]}
    assert rows["1. store_result, client"] == (30.0, 1.5)
    read = next(label for label in rows if label.startswith("3. read"))
    assert rows[read] == (200.0, 4.0)  # milliseconds: lower is better
    assert rows["2. store_result, prefork child"] == (None, None)
    text = render(results(), ["postgresql"], SIZES, "cmd", "today", {}, "1.0")
    parsed = from_markdown(text)
    assert list(parsed) == [DB_TITLES["postgresql"]]
    assert {label: (db, red) for label, db, red in parsed[DB_TITLES["postgresql"]]} == rows


def test_figures_kept_as_json_draw_the_same(tmp_path: Path) -> None:
    save_results(results(), ["postgresql"], True, tmp_path / "bench.json")
    again, kinds, sizes = load_results(tmp_path / "bench.json")
    assert again == results() and kinds == ["postgresql"] and sizes == SIZES
    pytest.importorskip("matplotlib")
    png = tmp_path / "bars.png"
    assert draw_bars(from_results(again, kinds, sizes), png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
