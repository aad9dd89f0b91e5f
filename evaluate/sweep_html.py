"""sweep.html: the sweep as one page to read or send, beside sweep.json in the output folder.

One table, a section per task (a row per encoder × head × aggregator: each metric as mean [95% CI] and its
difference to the task's reference row [95% CI], the reference row marked, a row that could not be fitted with its
reason, resamples skipped counted with the reason as a footnote), after one forest plot (sweep_forest.png: per task, each row's primary metric, Harrell's C or QWK, with its interval and the
reference's value as a vertical line). Every text is escaped; the picture is linked by its file name, so the
folder can be moved; no script.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from evaluate.sweep import GRADE_COLUMNS, SURVIVAL_COLUMNS, SweepRow

FOREST = "sweep_forest.png"
LABELS = {"harrell_c": "Harrell's C", "uno_c": "Uno's C", "mean_auc": "mean AUC(t)", "ibs": "IBS (lower is better)",
          "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1", "qwk": "QWK", "auc": "AUC"}
STYLE = """body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1500px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 0.6em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; vertical-align: top; }
th { background: #f2f2f2; } td.text { text-align: left; }
small { color: #666; } sup { color: #a33; }
td.clear { font-weight: 600; } td.clear small { color: #222; }
tr.reference td { background: #fff6d5; font-weight: 600; }
tr.error td.why, span.why { color: #a33; white-space: normal; text-align: left; font-size: 12px; }
span.why { display: block; max-width: 22em; }
p.note, ol.notes { max-width: 70em; font-size: 13px; }"""


class _Notes:
    """Footnotes of one table: a reason given once, its number in every cell it concerns."""

    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}

    def mark(self, reason: str) -> str:
        number = self.reasons.setdefault(reason, len(self.reasons) + 1)
        return f"<sup>{number}</sup>"

    def html(self) -> str:
        if not self.reasons:
            return ""
        items = "".join(f"<li>{html.escape(reason)}</li>" for reason in self.reasons)
        return f'<ol class="notes">{items}</ol>'


def primary_metric(task: str) -> str:
    return "qwk" if task == "grade" else "harrell_c"


def aggregator(pooling: str) -> str:
    """How a row's slides become the head's input: a pooling, the tiles themselves (MIL), or a slide-embedding set."""
    return "tiles (MIL)" if pooling == "tiles" else pooling


def _first_reason(row: SweepRow, metric: str, record: dict[str, Any]) -> str:
    folds = (row.metrics.get(metric) or {}).get("not_computed_in_folds") or {}
    return next(iter(folds.values()), None) or record.get("not_computed") or "not computed"


def _interval_cell(row: SweepRow, metric: str, notes: _Notes) -> str:
    if metric not in row.metrics:
        return "<td></td>"
    value, interval = row.metrics[metric], row.intervals.get(metric) or {}
    if value.get("mean") is None:
        return f'<td>n/a<span class="why">{html.escape(_first_reason(row, metric, interval))}</span></td>'
    ci = interval.get("ci95")
    bounds = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"
    if interval.get("not_computed"):
        bounds += notes.mark(f"no interval: {interval['not_computed']}")
    elif interval.get("skipped"):  # the count in the cell, the reason once below the table
        bounds += f" {interval['skipped']} skipped" + notes.mark(
            f"resamples (of {interval['resamples']}) skipped: "
            f"{interval.get('skipped_because') or 'the metric was undefined on them'}")
    return f"<td>{value['mean']:.3f}<br><small>{bounds}</small></td>"


def _difference_cell(row: SweepRow, metric: str) -> str:
    if metric not in row.metrics:
        return "<td></td>"
    if row.is_reference:
        return '<td class="text">reference</td>'
    delta = row.difference.get(metric) or {}
    if delta.get("difference") is None:
        return f'<td>n/a<span class="why">{html.escape(delta.get("not_computed", "not computed"))}</span></td>'
    ci = delta.get("ci95")
    clear = bool(ci) and (ci[0] > 0 or ci[1] < 0)  # the interval excludes 0: shown in bold
    bounds = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[n/a]"
    return f'<td{" class=clear" if clear else ""}>{delta["difference"]:+.3f}<br><small>{bounds}</small></td>'


def task_table(rows: Sequence[SweepRow], encoder: str = "") -> str:
    """The rows of one task: its own metrics, each as mean over folds [95% CI] and Δ to the reference [95% CI]."""
    metrics = [m for m in (*SURVIVAL_COLUMNS, *GRADE_COLUMNS) if any(m in r.metrics for r in rows)]
    lead = ["encoder", "head", "aggregator", "patients"]  # the task is the section's
    head = "".join(f'<th rowspan="2">{html.escape(c)}</th>' for c in lead)
    head += "".join(f'<th colspan="2">{html.escape(LABELS[m])}</th>' for m in metrics)
    head += "</tr><tr>" + "<th>mean [95% CI]</th><th>Δ to reference</th>" * len(metrics)
    notes = _Notes()
    body = []
    for r in rows:
        cells = "".join(f'<td class="text">{html.escape(v)}</td>' for v in (r.encoder or encoder or "-", r.head,
                                                                          aggregator(r.pooling)))
        if r.error:
            body.append(f'<tr class="error">{cells}<td>-</td><td class="why" colspan="{max(1, 2 * len(metrics))}">'
                        f"could not be fitted: {html.escape(r.error)}</td></tr>")
            continue
        cells += f"<td>{r.patients}</td>" + "".join(_interval_cell(r, m, notes) + _difference_cell(r, m)
                                                    for m in metrics)
        mark = ' class="reference"' if r.is_reference else ""
        body.append(f"<tr{mark}>{cells}</tr>")
    return (f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n"
            + notes.html())


def table(rows: Sequence[SweepRow], encoder: str = "") -> str:
    """One section per task (a survival endpoint's metrics are not a grade's), in the order the sweep ran them."""
    sections = []
    for task in dict.fromkeys(r.task for r in rows):
        title = "grade" if task == "grade" else f"{task} (survival)"
        sections.append(f"<h2>{html.escape(title)}</h2>\n" + task_table([r for r in rows if r.task == task], encoder))
    return "\n".join(sections)


def forest_plot(rows: Sequence[SweepRow], path: Path) -> None:
    """Per task, each row's primary metric with its 95% interval; the reference row's value a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows)) or ["(no rows)"]
    sizes = [max(1, sum(r.task == t for r in rows)) for t in tasks]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(7.5, 1.2 * len(tasks) + 0.32 * sum(sizes)), dpi=110,
                             squeeze=False, gridspec_kw={"height_ratios": [s + 1.5 for s in sizes]})
    for ax, task in zip(axes[:, 0], tasks):
        metric = primary_metric(task)
        of_task = [r for r in rows if r.task == task]
        labels = []
        for y, r in enumerate(of_task):
            mean = (r.metrics.get(metric) or {}).get("mean")
            ci = r.ci95(metric)
            name = "/".join(p for p in (r.encoder, r.head, aggregator(r.pooling)) if p)
            labels.append(name + (" (reference)" if r.is_reference else "") + ("" if mean is not None else " (n/a)"))
            if mean is None:
                continue
            colour = "#c0392b" if r.is_reference else "#2a7ab0"
            if ci:
                ax.plot(ci, [y, y], color=colour, linewidth=1.6)
            ax.plot([mean], [y], "s", color=colour, markersize=5)
            if r.is_reference:
                ax.axvline(mean, color=colour, linestyle="--", linewidth=0.9)
        ax.set_yticks(range(len(of_task)), labels, fontsize=8)
        ax.set_ylim(len(of_task) - 0.5, -0.5)
        ax.set_title(f"{task}: {LABELS[metric]}, mean over folds [95% CI]", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        if not of_task:
            ax.text(0.5, 0.5, "no row", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_html(out: Path, rows: Sequence[SweepRow], bootstrap: dict[str, Any], encoder: str = "") -> Path:
    """sweep.html and sweep_forest.png in `out`; the page's path. `encoder`: the one store's, for rows without one."""
    forest_plot(rows, out / FOREST)
    references = {r.task: r.name for r in rows if r.is_reference}
    note = (f"Intervals: percentile bootstrap 95%, {bootstrap.get('resamples', '?')} resamples of each fold's held-out "
            f"patients (seed {bootstrap.get('seed', '?')}), the mean over the folds that define the metric. Δ: the row "
            "minus its task's reference row on the patients both hold out, resampled jointly. Reference rows: "
            + (", ".join(f"{task}: {name}" for task, name in references.items()) or "none")
            + ". A difference in bold: its interval excludes 0. n/a: not computable (the reason below it); every "
              "fold's reasons are in sweep.json.")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>slidecache sweep</title>
<style>
{STYLE}
</style></head>
<body>
<h1>Sweep: {len(rows)} rows</h1>
<p class="note">{html.escape(note)}</p>
<p><a href="{FOREST}"><img src="{FOREST}" alt="forest plot: per task, each row's Harrell's C or QWK with its 95% interval"></a></p>
{table(rows, encoder)}
</body>
</html>
"""
    path = out / "sweep.html"
    path.write_text(page, encoding="utf-8")
    return path
