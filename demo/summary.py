"""One HTML page for a demo run: what ran (and that both models are random stand-ins), the QC thumbnails,
the Kaplan-Meier plot, the confusion matrix, metric tables and a few generated reports. Pictures are
linked by relative path, so the folder can be moved or zipped whole."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from evaluate.grounding import BLIND_CHANGE, FOLLOWS_DONOR

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
         ".thumbs img{height:110px;margin:2px;border:1px solid #ddd}.warn{background:#fff4d6;padding:.6em}")


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict) and "mean" in value:
        if value["mean"] is None:
            return "not computed: " + "; ".join(sorted(set((value.get("not_computed_in_folds") or {}).values())))
        return f"{value['mean']:.3f} ± {value.get('std', 0):.3f}"
    return str(value)


def _examples(path: Path, n: int = 6) -> str:
    if not path.is_file():
        return ""
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    cells = "".join(f"<tr><td>{escape(r['id'])}</td><td>{escape(r['text'])}</td><td>{escape(r['reference'])}</td></tr>"
                    for r in rows)
    return f"<table><tr><th>slide</th><th>generated</th><th>reference</th></tr>{cells}</table>"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _grounding(grounding: dict[str, Any] | None, references: dict[str, str], n: int = 5) -> str:
    """The grounding check: a table per condition and a few held-out reports under each."""
    if not grounding:
        return ""
    head = "<h2>Does the reporter read the slide? The grounding check</h2>"
    if "error" in grounding:
        return head + f"<p class='warn'>not run: {escape(grounding['error'])}</p>"
    s, donors, texts = grounding["scores"], grounding["donors"], grounding["texts"]
    rows = [("own slide", s["original"], None), ("another patient's slide, of another grade", s["swapped"], "swapped"),
            ("blank tiles (the training mean)", s["blank"], "blank")]
    cells = "".join(
        f"<tr><td>{escape(name)}</td><td>{_pct(r['grade_stated_rate'])}</td><td>{_pct(r['agrees_with_own_grade'])}</td>"
        f"<td>{_pct(r.get('agrees_with_donor_grade'))}</td><td>{_pct(r.get('text_changed'))}</td>"
        f"<td>{_pct(r.get('grade_changed'))}</td><td>{_pct(r.get('risk_changed'))}</td></tr>" for name, r, _ in rows)
    table = ("<table><tr><th>tiles given</th><th>states a grade</th><th>states the slide's own grade</th>"
             "<th>states the donor's grade</th><th>report changed</th><th>stated grade changed</th>"
             "<th>stated risk changed</th></tr>" + cells + "</table>")
    examples = "".join(
        f"<tr><td>{escape(i)}</td><td>{escape(references.get(i, ''))}</td><td>{escape(texts['original'][i])}</td>"
        f"<td>{escape(donors[i])}: {escape(references.get(donors[i], ''))}</td><td>{escape(texts['swapped'][i])}</td>"
        f"<td>{escape(texts['blank'][i])}</td></tr>" for i in sorted(donors)[:n])
    return (head + f"<p>Verdict: <b>{escape(grounding['verdict'])}</b>. Each of the {grounding['n']} held-out reports "
            "was written again with the tiles of another held-out patient whose reference states another grade (the "
            "donor), and with blank tiles; a reporter that reads the slide states the donor's grade. A falling "
            "training loss cannot show this: every word but the grade and risk is learnable without the image. The "
            "own grade is the one the slide's reference report states; the reports here are written again from the "
            "trained checkpoint (greedy); blank tiles are each the training folds' mean tile (no image). Verdict "
            f"rules: <i>follows the slide</i> when at least {FOLLOWS_DONOR:.0%} of the swapped reports state the "
            f"donor's grade, <i>image-blind</i> when under {BLIND_CHANGE:.0%} state another grade than before; a "
            "report guessing among the three grades would state a given one about a third of the time.</p>"
            + table
            + "<table><tr><th>slide</th><th>reference</th><th>report</th><th>donor: its reference</th>"
              "<th>report with the donor's tiles</th><th>report with blank tiles</th></tr>" + examples + "</table>")


def _references(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return {r["id"]: r["reference"] for r in map(json.loads, path.read_text().splitlines())}


def write_summary(out: Path, result: dict[str, Any]) -> Path:
    qc = sorted((out / "qc" / "slides").glob("*.png"))[:24]
    parts = [f"<!doctype html><meta charset='utf-8'><title>slidecache demo</title><style>{STYLE}</style>",
             "<h1>slidecache demo run</h1>",
             f"<p class='warn'>Encoder: {escape(result['encoder'])}.<br>"
             + (f"LLM: {escape(result['llm'])}.<br>" if "llm" in result else "")
             + "The cohort is synthetic with a planted signal (nuclear density sets grade and hazard): the metrics "
             "show the pipeline finds it, not clinical performance.</p>",
             "<h2>Extraction</h2>",
             _table([("store", result["store"]), ("slides in store", result["slides_in_store"]),
                     ("extracted in this run", result["extracted_now"]),
                     ("skipped (already complete)", result["skipped_complete"]), ("failed", len(result["failed"])),
                     ("tiles", result["tiles_in_store"]), ("verify problems", len(result["verify_problems"])),
                     ("run time (s)", result.get("seconds", "?"))]),
             "<h3>QC thumbnails (tissue mask and tiles)</h3><div class='thumbs'>"
             + "".join(f"<a href='qc/slides/{p.name}'><img src='qc/slides/{p.name}' title='{escape(p.stem)}'></a>" for p in qc)
             + "</div><p><a href='qc/summary.md'>full QC summary</a></p>"]
    evaluation = result.get("evaluation")
    if evaluation:
        survival, grade, reports = evaluation["survival"], evaluation["grade"], evaluation["reports"]
        parts.append("<h2>Survival (OS), Coxnet on stored slide vectors, patient-level CV</h2>")
        if "error" in survival:
            parts.append(f"<p class='warn'>not estimated: {escape(survival['error'])}</p>")
        else:
            parts += [_table([(k, v) for k, v in survival["summary"].items()] + [("log-rank p", survival["logrank_p"])]),
                      "<img src='evaluation/km.png' alt='Kaplan-Meier plot'>"]
        parts.append("<h2>Grade, logistic regression</h2>")
        if "error" in grade:
            parts.append(f"<p class='warn'>not estimated: {escape(grade['error'])}</p>")
        else:
            parts += [_table([(k, v) for k, v in grade["summary"].items() if k != "chance"]
                             + [(f"chance {k}", v) for k, v in grade["summary"]["chance"].items()]),
                      "<img src='evaluation/confusion.png' alt='confusion matrix'>"]
        parts += [f"<h2>Generated reports, held-out fold {reports['fold']} ({reports['n']} slides)</h2>",
                  _table(list(reports["caption"].items()) + list(reports["clinical"].items())),
                  "".join(f"<p>note: {escape(n)}</p>" for n in reports["notes"]),
                  _examples(Path(result["generated"])),
                  _grounding(evaluation.get("grounding"), _references(Path(result["generated"]))),
                  f"<p>training loss {_fmt(result.get('train_loss_first'))} → {_fmt(result.get('train_loss_last'))}; "
                  f"run folder <code>{escape(result['train_dir'])}</code></p>"]
    parts.append("<p>Everything above was computed from the cache; the run's config, code and package versions are in "
                 "<a href='run_manifest.json'>run_manifest.json</a>.</p>")
    path = out / "summary.html"
    path.write_text("\n".join(parts))
    return path
