"""Draw the chart of docs/benchmarks.md from the JSON of ``python -m forkserver bench --json``.

    python docs/bench_chart.py RUN.json OUT.svg

One panel per scenario, one bar per contender: the median, with a whisker
up to the p90, on a log scale (a 100x gap and a 10 % gap both stay
visible), and each contender's ratio to forkserver beside it.  Any scenario
and contender the run has is drawn, so new ones (PPE, loky, ...) appear
without changes here.  ``docs/conf.py`` calls ``draw`` at every build.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import List

OURS = "#1f6fb2"
THEIRS = "#a7adb5"


def _drawn_rows(scenario: dict) -> List[dict]:
    return [row for row in scenario["contenders"] if row.get("median")]


def draw(json_path: str, out_path: str) -> None:
    """Read one bench run and write its chart (SVG or PNG, by the suffix of ``out_path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        run = json.load(f)
    panels = [sc for sc in run["scenarios"].values() if _drawn_rows(sc)]
    sizes = [len(_drawn_rows(sc)) for sc in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8.5, 0.42 * sum(sizes) + 0.9 * len(panels) + 0.6),
        gridspec_kw={"height_ratios": sizes}, squeeze=False,
    )
    for ax, scenario in zip(axes[:, 0], panels):
        _panel(ax, scenario)
    m = run["machine"]
    fig.suptitle(
        f"python -m forkserver bench, {m['date']}: {m['cpus']} CPUs, {m['python']}, "
        f"preload {m['preload']} (bars: median, whiskers: p90)", fontsize=9, x=0.01, ha="left",
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    metadata = {"Date": None} if out_path.endswith(".svg") else {}
    fig.savefig(out_path, metadata=metadata)
    plt.close(fig)


def _panel(ax, scenario: dict) -> None:
    from matplotlib.ticker import NullFormatter

    rows = _drawn_rows(scenario)
    medians = [row["median"] for row in rows]
    p90s = [max(row["p90"], row["median"]) for row in rows]
    # Bars start at a power of ten at least half a decade below the smallest median.
    floor = 10 ** math.floor(math.log10(min(medians)) - 0.5)
    ys = list(range(len(rows)))
    colours = [OURS if row["contender"].startswith("forkserver") else THEIRS for row in rows]
    ax.barh(ys, [m - floor for m in medians], left=floor, color=colours, height=0.6)
    ax.errorbar(medians, ys, xerr=[[0] * len(rows), [p - m for p, m in zip(p90s, medians)]],
                fmt="none", ecolor="#333333", capsize=3, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(floor, max(p90s) * 4)
    ax.set_yticks(ys)
    ax.set_yticklabels([row["contender"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(scenario["title"], loc="left", fontsize=9)
    ax.set_xlabel(scenario["unit"], fontsize=8, labelpad=1)
    ax.tick_params(axis="x", labelsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: no crowded minor labels
    for y, row, p90 in zip(ys, rows, p90s):
        ratio = "" if row.get("ratio") is None else f"  {row['ratio']:.2f}x"
        ax.text(p90 * 1.08, y, f"{row['median']:.3g} {row['unit']}{ratio}", va="center", fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    draw(sys.argv[1], sys.argv[2])
