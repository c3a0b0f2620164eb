"""Bar charts of ``bench.run``'s figures: sql+ against db+ and Redis, as ratios.

``python -m bench.plots [--json FILE | --from-markdown FILE] [--out PNG]``. ``bench.run
--out`` draws the chart itself from the figures it has just measured (and keeps them as
JSON beside the report); ``--json`` draws it again from such a file, ``--from-markdown``
from the tables of a report written before bench.run kept JSON (the published
``docs/benchmarks.md``), and says so on the chart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from . import config
from .config import Sizes
from .report import Results, figures, ratio

__all__ = ["Ratios", "draw_bars", "from_markdown", "from_results", "load_results", "save_results"]

#: Per database title, per figure: (label, sql+ over db+, sql+ over Redis); > 1: sql+ better.
Ratios = dict[str, list[tuple[str, float | None, float | None]]]

BARS = "benchmarks-bars.png"
_COLORS = {"db": "#d62728", "redis": "#2ca02c"}


def from_results(results: Results, kinds: list[str], sizes: Sizes) -> Ratios:
    """The ratios of the report's tables (``report.table``), computed from the figures."""
    out: Ratios = {}
    for kind in kinds:
        rows = []
        for fig in figures(sizes):
            ours, db, red = (results.value(kind, b, fig.key_for(b)) for b in config.BACKENDS)
            if ours is None and fig.others is not None:
                continue
            if red is None and fig.own is not None:
                continue
            rows.append((fig.label, ratio(fig, ours, db), ratio(fig, ours, red)))
        out[config.DB_TITLES[kind]] = rows
    return out


def _ratio_cell(cell: str) -> float | None:
    cell = cell.strip()
    return float(cell[:-1]) if cell.endswith("x") else None


def from_markdown(text: str) -> Ratios:
    """The ratio columns of each ``## <database>`` table in a ``bench.run`` report."""
    out: Ratios = {}
    title = None
    for line in text.splitlines():
        heading = re.match(r"## (.+)", line)
        if heading:
            title = heading.group(1).strip()
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if title is None or len(cells) != 6 or not re.match(r"\d+\. ", cells[0]):
            continue
        out.setdefault(title, []).append((cells[0], _ratio_cell(cells[4]), _ratio_cell(cells[5])))
    return {t: rows for t, rows in out.items() if t in config.DB_TITLES.values()}


def save_results(results: Results, kinds: list[str], quick: bool, path: Path) -> None:
    """``bench.run``'s figures as JSON, to draw (or read) again without measuring."""
    data = {"kinds": kinds, "quick": quick, "results": dataclasses.asdict(results)}
    path.write_text(json.dumps(data, indent=1))


def load_results(path: Path) -> tuple[Results, list[str], Sizes]:
    data = json.loads(path.read_text())
    sizes = Sizes.quick() if data["quick"] else Sizes.full()
    return Results(**data["results"]), list(data["kinds"]), sizes


def _short(label: str, width: int = 58) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def draw_bars(ratios: Ratios, path: Path, source: str) -> bool:
    """One panel per database: each figure's sql+/db+ and sql+/Redis on a log scale.

    False (nothing written) when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bar chart (pip install matplotlib)")
        return False
    titles = list(ratios)
    labels: list[str] = []  # every figure of any database, in the report's order
    for rows in ratios.values():
        labels += [label for label, _, _ in rows if label not in labels]
    height = 0.4
    fig, axes = plt.subplots(
        1, len(titles), figsize=(5 + 3.6 * len(titles), 0.32 * len(labels) + 1.8), sharey=True
    )
    axes_list: list[Any] = list(axes) if len(titles) > 1 else [axes]
    ys = list(range(len(labels)))
    for ax, title in zip(axes_list, titles, strict=True):
        by_label = {label: (db, red) for label, db, red in ratios[title]}
        for j, (key, name) in enumerate((("db", "sql+ / db+"), ("redis", "sql+ / Redis"))):
            values = [by_label.get(label, (None, None))[j] for label in labels]
            offsets = [y + (j - 0.5) * height for y in ys]
            # From 1: a bar to the right is sql+ better, to the left worse.
            widths = [0.0 if v is None else v - 1.0 for v in values]
            ax.barh(offsets, widths, height, left=1.0, label=name, color=_COLORS[key])
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("ratio (> 1: sql+ better; log scale)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes_list[0].set_yticks(ys, [_short(label) for label in labels])
    axes_list[0].invert_yaxis()
    axes_list[0].legend(loc="lower right")
    fig.suptitle(f"sql+ against db+ and Redis, per figure ({source})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", type=Path, help="figures kept by bench.run --out")
    source.add_argument("--from-markdown", type=Path, help="a bench.run report's tables")
    parser.add_argument("--out", type=Path, default=config.ROOT / "docs" / BARS)
    args = parser.parse_args(argv)
    if args.json is not None:
        results, kinds, sizes = load_results(args.json)
        ratios, what = from_results(results, kinds, sizes), f"figures of {args.json.name}"
    else:
        ratios = from_markdown(args.from_markdown.read_text())
        what = f"read from the tables of {args.from_markdown.name}"
        if not ratios:
            parser.error(f"{args.from_markdown}: no bench.run tables found")
    if not draw_bars(ratios, args.out, what):
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
