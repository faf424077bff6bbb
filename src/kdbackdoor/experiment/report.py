"""Reports of many runs: tables in the papers' layouts, plots and image grids, as HTML or Markdown.

``write_report(paths, out, fmt)`` reads the complete runs of results folders (see
``summary.load_runs``) and writes

- ``html``: one self-contained file (CSS and PNGs inline as base64) that opens in a browser;
- ``md``: a Markdown file, its PNGs in ``<out stem>_files/`` beside it.

Contents, in reading order: a summary (one row per run, or the caller's own table, such as the
demo's), one table per kind of experiment (named runs, only the settings that vary, ACC, ASR,
target without trigger, defense cost), filter audits when the caller has them, the ABD layout and
the attack's factor tables where the runs allow them, the plots ASR vs λ and ACC vs ASR (legends
name only what varies), and image grids of the triggers, the poisons beside their clean sources,
and data-free synthetic samples. The HTML page fits a 1280 px window: tables wrap their cells,
plots are shown at their natural width or the page's.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from kdbackdoor.atomic import atomic_path, write_bytes
from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.summary import (Run, Table, abd_table, attack_tables, condition_keys, experiment_tables,
                                           group, load_runs,
                                           mean_std, metric_values, run_name, settings_text, summary_table,
                                           varied_keys)

FORMATS = ("html", "md")
MAX_IMAGES = 12  # per image section
LEGEND_WIDTH = 48  # characters per legend line: a legend never widens a plot past the page


@dataclass
class Figure:
    """A PNG with a title (``name`` is its file name in Markdown reports)."""

    name: str
    title: str
    png: bytes


def write_report(paths: Iterable[str | Path], out: str | Path, fmt: Literal["html", "md"] | None = None, *,
                 summary: Table | None = None, audits: list[dict] | None = None) -> Path:
    """Write the report of the runs under ``paths`` to ``out``; return its path.

    ``fmt`` defaults to the suffix of ``out`` (.md: Markdown, else HTML). ``summary`` replaces the
    default one-row-per-run summary; ``audits`` are filter detection reports (``name``, ``set``,
    ``auroc``, ``tpr_at_5fpr``, ``flagged``, ``poisons``, ``true_positives``, ``precision``,
    ``recall``), shown as a filter-audit table.
    """
    out = Path(out)
    fmt = fmt or ("md" if out.suffix.lower() == ".md" else "html")
    if fmt not in FORMATS:
        raise KDBackdoorError(f"unknown report format {fmt!r}; choose from {', '.join(FORMATS)}")
    paths = [Path(p) for p in paths]
    runs = load_runs(paths)
    if not runs:
        raise KDBackdoorError(f"no complete run under {', '.join(map(str, paths))}")
    tables = [summary or summary_table(runs), *experiment_tables(runs), *([audit_table(audits)] if audits else []),
              *filter(None, [abd_table(runs)]), *attack_tables(runs)]
    plots = list(filter(None, [asr_vs_lambda(runs), acc_vs_asr(runs)]))
    images = image_sections(runs)
    title = f"kdbackdoor report: {len(runs)} runs"
    sources = ", ".join(map(str, paths))
    if fmt == "html":
        text = render_html(title, sources, tables, plots, images)
    else:
        text = render_markdown(title, sources, tables, plots, images, out)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def audit_table(audits: list[dict]) -> Table:
    """Filter audits against the provenance: ranking quality, and what the filter's own rule caught."""
    rows = [[audit.get("name", "?"), audit.get("set", ""), f"{audit['auroc']:.3f}", f"{100 * audit['tpr_at_5fpr']:.1f}",
             str(audit["flagged"]), f"{audit['true_positives']} of {audit['poisons']}",
             f"{100 * audit['precision']:.1f}", f"{100 * audit['recall']:.1f}"] for audit in audits]
    return Table("Filter audits", ["filter", "set", "AUROC", "TPR at 5% FPR", "rule flagged", "poisons caught",
                                   "precision", "recall"], rows,
                 "scores against the set's provenance (the filter never reads it); AUROC and TPR rank all samples, "
                 "precision and recall (percent) are of the samples the filter's own rule flags")


def _legend_labels(groups: dict[tuple, list[Run]], keys: list[str]) -> dict[tuple, str]:
    """What tells plotted conditions apart: their run names when each condition has its own, else the
    settings that vary (a defense's own settings only for defended runs); wrapped to ``LEGEND_WIDTH``."""
    import textwrap
    names = {values: {run_name(run) for run in members} for values, members in groups.items()}
    by_name = all(len(n) == 1 for n in names.values()) and len({next(iter(n)) for n in names.values()}) == len(names)
    texts = {values: next(iter(names[values])) if by_name else settings_text(members[0], keys)
             for values, members in groups.items()}
    return {values: "\n".join(textwrap.wrap(text, LEGEND_WIDTH, max_lines=3, placeholder=" …")) or "all runs"
            for values, text in texts.items()}


def asr_vs_lambda(runs: list[Run]) -> Figure | None:
    """Student ASR (mean ± std over seeds) against λ, one line per other condition; None if λ is not varied."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "distill.kd.kd_lambda"
    runs = [run for run in runs if run.metric("asr") is not None]
    if key not in varied_keys(runs):
        return None
    other = [k for k in condition_keys(runs) if k != key]
    figure, axis = plt.subplots(figsize=(6, 4))
    lines = group(runs, other)
    labels = _legend_labels(lines, other)
    for values, members in lines.items():
        points = [(lam, mean_std(metric_values(cell, "asr"))) for (lam,), cell in group(members, [key]).items()]
        xs = [lam for lam, _ in points]
        axis.errorbar(xs, [100 * m for _, (m, _) in points], yerr=[100 * s for _, (_, s) in points], marker="o",
                      capsize=3, label=labels[values])
        baseline = [(lam, mean_std(metric_values(cell, "baseline_asr"))) for (lam,), cell in
                    group(members, [key]).items() if metric_values(cell, "baseline_asr")]
        if baseline:
            axis.plot([lam for lam, _ in baseline], [100 * m for _, (m, _) in baseline], linestyle="--",
                      marker="x", color="grey", label="unpoisoned" + (f" ({labels[values]})" if other else ""))
    axis.set_xlabel("λ (weight of the KD term)")
    axis.set_ylabel("student ASR (%)")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return Figure("asr_vs_lambda.png", "Student ASR vs λ (mean ± std over seeds)", _png(figure))


def acc_vs_asr(runs: list[Run]) -> Figure | None:
    """Each condition's student ACC against its ASR (mean ± std); None when no run measured ASR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in runs if run.metric("asr") is not None]
    if not runs:
        return None
    keys = condition_keys(runs)
    groups = group(runs, keys)
    figure, axis = plt.subplots(figsize=(6, 4))
    labels = _legend_labels(groups, keys)
    for values, members in groups.items():
        (acc, acc_std), (asr, asr_std) = mean_std(metric_values(members, "acc")), mean_std(metric_values(members, "asr"))
        axis.errorbar(100 * asr, 100 * acc, xerr=100 * asr_std, yerr=100 * acc_std, marker="o", capsize=3,
                      label=labels[values] if len(groups) <= 12 else None)
    axis.set_xlabel("student ASR (%)")
    axis.set_ylabel("student ACC (%)")
    axis.set_xlim(-2, 102)
    axis.grid(alpha=0.3)
    if len(groups) <= 12:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return Figure("acc_vs_asr.png", "Student ACC vs ASR, one point per condition", _png(figure))


def image_sections(runs: list[Run]) -> list[tuple[str, list[Figure]]]:
    """The runs' pictures, each kind once per distinct source: triggers, poisons, synthetic samples."""
    def distinct(kind: str, caption) -> list[Figure]:
        """One figure of ``kind`` per distinct caption (the caption names what made the picture)."""
        figures, seen = [], set()
        for run in runs:
            name = (run.record.get("artifacts") or {}).get(kind)
            if not name or not (run.folder / name).is_file() or len(figures) >= MAX_IMAGES:
                continue
            key = caption(run)
            if key not in seen:
                seen.add(key)
                figures.append(Figure(f"{kind}-{len(figures)}.png", key, (run.folder / name).read_bytes()))
        return figures

    def trigger(run: Run) -> str:
        c = run.config
        return c.get("evaluation.trigger") or c.get("poison.trigger") or c.get("teacher.backdoor.trigger") or ""

    sections = [
        ("Triggers (rows: clean, triggered, difference)", distinct("trigger", trigger)),
        ("Poisons (rows: clean source, poison, difference)",
         distinct("poisons", lambda run: f"{run.config.get('poison.method')} poisons, {run.config.get('poison.trigger')}, "
                  f"rate {run.config.get('poison.rate')}, set {run.record['stages']['poisoned_set']['key']}")),
        ("Synthetic samples of data-free distillation",
         distinct("synthetic", lambda run: f"{run.config.get('distill.method')}, defense "
                  f"{run.config.get('distill.defense')}, teacher {trigger(run) or 'clean'}")),
    ]
    return [(title, figures) for title, figures in sections if figures]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;overflow-wrap:anywhere}
th{background:#f0f0f0}td:first-child,th:first-child,td.text{text-align:left}.note{color:#666;font-size:90%}
figure{display:inline-block;margin:0.5em;vertical-align:top;max-width:100%}
figcaption{font-size:85%;color:#444;max-width:420px}
img{max-width:100%}img.grid{image-rendering:pixelated;max-width:560px}"""


def render_html(title: str, sources: str, tables: list[Table], plots: list[Figure],
                images: list[tuple[str, list[Figure]]]) -> str:
    """One self-contained HTML page (no external resource)."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}</h1><p class='note'>from {e(sources)}; generated {_now()}</p>"]
    for table in tables:
        parts.append(f"<h2>{e(table.title)}</h2><p class='note'>{e(table.note)}</p><table><thead><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr></thead><tbody>")
        text_columns = {i for i, c in enumerate(table.columns) if c.startswith("settings") or c == "set"}
        parts.extend("<tr>" + "".join(f"<td class='text'>{e(cell)}</td>" if i in text_columns else f"<td>{e(cell)}</td>"
                                      for i, cell in enumerate(row)) + "</tr>" for row in table.rows)
        parts.append("</tbody></table>")
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(_html_figure(f, "plot") for f in plots))
    for section, figures in images:
        parts.append(f"<h2>{e(section)}</h2>" + "".join(_html_figure(f, "grid") for f in figures))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_figure(figure: Figure, kind: str) -> str:
    data = base64.b64encode(figure.png).decode()
    return (f"<figure><img class='{kind}' alt='{html.escape(figure.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(figure.title)}</figcaption></figure>")


def render_markdown(title: str, sources: str, tables: list[Table], plots: list[Figure],
                    images: list[tuple[str, list[Figure]]], out: Path) -> str:
    """Markdown text; the PNGs are written to ``<out stem>_files/`` and linked relatively."""
    folder = out.with_name(out.stem + "_files")
    lines = [f"# {title}", "", f"from {sources}; generated {_now()}", ""]
    for table in tables:
        lines += [f"## {table.title}", "", f"_{table.note}_", "", "| " + " | ".join(table.columns) + " |",
                  "|" + "|".join("---" for _ in table.columns) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
        lines.append("")
    for section, figures in [("Plots", plots), *images]:
        if figures:
            lines += [f"## {section}", ""]
        for figure in figures:
            write_bytes(folder / figure.name, figure.png)
            lines += [f"![{figure.title}]({os.path.relpath(folder / figure.name, out.parent)})", "", figure.title, ""]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
