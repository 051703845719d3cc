"""The front as people read it: a markdown table (summary.md), a PNG and an offline HTML plot.

The front's math (which trials are on it, feasibility, hypervolume) is
:mod:`search.results.pareto`; this module only draws what it computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from search.results.pareto import HV_ACCURACY_SPAN, within_drop

__all__ = ["front_markdown", "plot_front", "write_html"]


def front_markdown(front: pd.DataFrame, max_drop: float, metric: str = "accuracy") -> list[str]:
    """Markdown tables of a ``readable_front``'s rows: those within ``max_drop`` first, the
    rest of the front below them under their own heading (listed, not hidden)."""
    usable = front["within_drop"] if "within_drop" in front else pd.Series(True, index=front.index)
    lines = [f"Within {max_drop:g} point(s) of the reference, fastest first:", ""]
    lines += _markdown_rows(front[usable], metric)
    if (~usable).any():
        lines += ["", f"The rest of the front, more than {max_drop:g} point(s) below the reference:",
                  ""] + _markdown_rows(front[~usable], metric)
    return lines


def _markdown_rows(rows: pd.DataFrame, metric: str = "accuracy") -> list[str]:
    """One row per point; with a re-measurement, its side-by-side speedup beside the trial's
    own (the trial's was measured alone, at another moment of a possibly busy machine)."""
    side = "speedup_remeasured" in rows and rows["speedup_remeasured"].notna().any()
    extra = (" side by side |", "---|") if side else ("", "")
    unit = " %" if metric == "accuracy" else ""
    lines = [f"| trial | {metric}{unit} | latency ms | speedup |{extra[0]} precisions |",
             f"|---|---|---|---|{extra[1]}---|"]
    for _, r in rows.iterrows():
        label = f" ({r['baseline']})" if r.get("baseline") else ""
        again = ""
        if side:
            v = r["speedup_remeasured"]
            again = f" {v:.2f}x |" if pd.notna(v) else " - |"
        lines.append(f"| {r['trial']}{label} | {r['accuracy']:.2f} | {r['latency_ms']:.3f} | "
                     f"{r['speedup']:.2f}x |{again} {r['precisions']} |")
    return lines


def plot_front(df: pd.DataFrame, path: Path, title: str, max_drop: float | None = None,
               metric: str = "accuracy") -> Path:
    """Accuracy against latency, the front highlighted, written as a PNG."""
    import matplotlib.pyplot as plt

    fig = _draw_front(df, title, max_drop, metric)
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_front(df: pd.DataFrame, title: str, max_drop: float | None,  # noqa: ANN202
                metric: str = "accuracy"):
    """The figure of ``plot_front``. Latency on a log axis: one slow trial no longer squashes
    the fast region; accuracies far below the reference sit on the bottom edge as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = _accuracy_floor(df, max_drop)
    low = df["accuracy"] < floor if floor is not None else pd.Series(False, index=df.index)
    shown = df[~low]
    ax.scatter(shown["latency_ms"], shown["accuracy"], c="#bbbbbb", label="trial")
    front = shown[shown["on_front"]].sort_values("latency_ms")
    usable = within_drop(front, df, max_drop) if max_drop is not None else front["on_front"]
    ax.plot(front["latency_ms"], front["accuracy"], "-", c="#d62728", alpha=0.5)
    ax.plot(front.loc[usable, "latency_ms"], front.loc[usable, "accuracy"], "o", c="#d62728",
            label="Pareto front" + (f", within {max_drop:g} point(s)" if max_drop is not None else ""))
    if (~usable).any():
        ax.plot(front.loc[~usable, "latency_ms"], front.loc[~usable, "accuracy"], "o", mfc="none",
                c="#d62728", label="Pareto front, beyond the allowed drop")
    for _, row in front.iterrows():
        ax.annotate(f"#{row['trial']}", (row["latency_ms"], row["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    _mark_baselines(ax, df)
    _mark_allowed_drop(ax, df, max_drop)
    if low.any():
        ax.set_ylim(bottom=floor - 1)
        ax.scatter(df.loc[low, "latency_ms"], [floor - 0.5] * int(low.sum()), marker="v", c="#555555",
                   label=f"{int(low.sum())} below {floor:.0f} % (drawn at the edge)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    source = ", ".join(sorted(set(df["latency_source"].dropna()))) or "n/a"
    ax.set_xlabel(f"latency, ms, log scale ({source})")
    ax.set_ylabel(f"validation {metric}" + (", %" if metric == "accuracy" else ", points"))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def _accuracy_floor(df: pd.DataFrame, max_drop: float | None) -> float | None:
    """Below this accuracy a point only stretches the axis: ``HV_ACCURACY_SPAN`` (or five
    allowed drops) under the reference."""
    base = df.loc[df["reference"], "accuracy"]
    if base.empty:
        return None
    return float(base.iloc[0]) - max(HV_ACCURACY_SPAN, 5 * (max_drop or 0.0))


def _mark_baselines(ax, df: pd.DataFrame) -> None:  # noqa: ANN001
    for _, row in df[df["baseline"] != ""].iterrows():
        ax.scatter([row["latency_ms"]], [row["accuracy"]], marker="s", s=40, facecolors="none",
                   edgecolors="#1f77b4", zorder=3)
        ax.annotate(row["baseline"], (row["latency_ms"], row["accuracy"]), fontsize=8,
                    color="#1f77b4", xytext=(4, -10), textcoords="offset points")


def _mark_allowed_drop(ax, df: pd.DataFrame, max_drop: float | None) -> None:  # noqa: ANN001
    base = df.loc[df["reference"], "accuracy"]
    if max_drop is None or base.empty:
        return
    ax.axhline(float(base.iloc[0]) - max_drop, ls="--", lw=0.8, c="#2ca02c",
               label=f"allowed drop ({max_drop:g} point(s))")


def write_html(df: pd.DataFrame, path: Path, title: str, metric: str = "accuracy") -> Path:
    """An interactive accuracy/latency plot that works offline: inline SVG, no external script.

    Hovering a point shows its trial, accuracy, latency, speedup and precisions;
    the front is drawn as a line; clicking a column header sorts the table.
    """
    from html import escape

    svg = _plot_svg(df, metric)
    cols = ["trial", "accuracy", "test_accuracy", "latency_ms", "latency_source", "speedup",
            "size_mb", "precisions", "sparsity", "on_front", "baseline"]
    cols = [c for c in cols if c in df.columns]
    head = "".join(f"<th>{escape(c.replace('accuracy', metric))}</th>" for c in cols)
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(f'{r[c]:.3f}' if isinstance(r[c], float) else str(r[c]))}"
                         "</td>" for c in cols) + "</tr>"
        for _, r in df.sort_values("latency_ms").iterrows()
    )
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} svg text{{font-size:11px}}
.pt:hover{{stroke:#000;stroke-width:2}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}} th{{cursor:pointer;background:#eee}}
</style></head><body>
<h2>{escape(title)}</h2>
<p>Validation {escape(metric)} against latency; red: Pareto front. Hover a point for details.</p>
{svg}
<h3>Trials</h3><table id="trials"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
<script>
document.querySelectorAll('#trials th').forEach((th, i) => th.onclick = () => {{
  const body = th.closest('table').tBodies[0];
  const rows = Array.from(body.rows);
  const num = rows.every(r => !isNaN(parseFloat(r.cells[i].textContent)));
  rows.sort((a, b) => num ? parseFloat(a.cells[i].textContent) - parseFloat(b.cells[i].textContent)
                          : a.cells[i].textContent.localeCompare(b.cells[i].textContent));
  rows.forEach(r => body.appendChild(r));
}});
</script></body></html>
"""
    path.write_text(html)
    return path


def _plot_svg(df: pd.DataFrame, metric: str = "accuracy") -> str:
    """Accuracy against latency as inline SVG: every trial a point (its details on hover),
    the front red and joined by a line."""
    from html import escape

    width, height, pad = 720, 420, 56
    lat = df["latency_ms"].astype(float)
    acc = df["accuracy"].astype(float)
    x0, x1 = float(lat.min()) * 0.9, float(lat.max()) * 1.05
    y0, y1 = max(0.0, float(acc.min()) - 2), min(100.0, float(acc.max()) + 1)

    def sx(v: float) -> float:
        return pad + (v - x0) / max(x1 - x0, 1e-12) * (width - 2 * pad)

    def sy(v: float) -> float:
        return height - pad - (v - y0) / max(y1 - y0, 1e-12) * (height - 2 * pad)

    points = []
    for _, r in df.iterrows():
        tip = (f"trial {r['trial']}: {metric} {r['accuracy']:.2f}"
               f"{'%' if metric == 'accuracy' else ''}, latency "
               f"{r['latency_ms']:.3f} ms ({r['latency_source']}), speedup {r['speedup']:.2f}x, "
               f"{r['precisions']}")
        color = "#d62728" if r["on_front"] else "#9e9e9e"
        points.append(f'<circle cx="{sx(r["latency_ms"]):.1f}" cy="{sy(r["accuracy"]):.1f}" '
                      f'r="{6 if r["on_front"] else 4}" fill="{color}" class="pt" '
                      f'data-trial="{r["trial"]}"><title>{escape(tip)}</title></circle>')
    front = df[df["on_front"]].sort_values("latency_ms")
    line = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(front["latency_ms"],
                                                              front["accuracy"], strict=True))
    ticks = "".join(
        f'<text x="{sx(v):.1f}" y="{height - pad + 18}" text-anchor="middle">{v:.3g}</text>'
        for v in np.linspace(x0, x1, 6)
    ) + "".join(
        f'<text x="{pad - 8}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>'
        for v in np.linspace(y0, y1, 6)
    )
    return f"""<svg width="{width}" height="{height}" role="img" aria-label="Pareto front">
<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none"
 stroke="#888"/>{ticks}
<polyline points="{line}" fill="none" stroke="#d62728" stroke-width="1.5"/>
{''.join(points)}
<text x="{width / 2}" y="{height - 12}" text-anchor="middle">latency, ms</text>
<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})"
 text-anchor="middle">{escape(metric)}{', %' if metric == 'accuracy' else ''}</text></svg>"""
