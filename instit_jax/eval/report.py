"""Markdown report + PNG chart: our four Inst-IT Bench numbers beside the published ones, and details.

Inputs are result files written by `python -m instit_jax.eval score` (one per split × format).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from instit_jax.eval.chart import bar_chart
from instit_jax.eval.published import CHART_ROWS, COLUMN_TITLES, COLUMNS, PUBLISHED

MAX_CELL = 300  # characters of a prediction / answer shown per details cell


def load_result(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    needed = ("format", "split", "accuracy", "total_num", "valid_num", "model_predictons")
    if not isinstance(result, dict) or any(k not in result for k in needed):
        raise ValueError(f"{path}: not a result file of `instit_jax.eval score` (needs {needed})")
    if (result["split"], result["format"]) not in COLUMNS:
        raise ValueError(f"{path}: unknown subset {result['split']}/{result['format']}")
    return result


def _cell(text: Any, limit: int = MAX_CELL) -> str:
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "…"
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _unofficial(result: Mapping[str, Any]) -> bool:
    return result["format"] == "oe" and not result.get("judge", {}).get("official", False)


def _ours_cell(result: Mapping[str, Any] | None) -> str:
    if result is None:
        return "–"
    return _num(result["accuracy"]) + ("†" if _unofficial(result) else "")


def _run_row(path: str, r: Mapping[str, Any]) -> str:
    title = COLUMN_TITLES[(r["split"], r["format"])]
    if r["format"] == "mc":
        counts = f"{r['correct_num']} correct / {r['valid_num']} valid / {r['total_num']} total " \
                 f"(correct/total {_num(r.get('accuracy_over_total'))})"
        judge = "official extraction rules"
    else:
        counts = f"{r['valid_num']} judged / {r['total_num']} total, {r.get('failed_num', 0)} judge failures"
        j = r.get("judge", {})
        judge = (f"GPT judge {j.get('model')}, cost ${j.get('report', {}).get('cost_usd', 0):.4f}"
                 if j.get("kind") == "gpt" else "rule judge (NOT the official metric)")
    return f"| {title} | `{_cell(os.path.basename(path))}` | {_num(r['accuracy'])} | {counts} | {judge} |"


def _details(r: Mapping[str, Any]) -> list[str]:
    if r["format"] == "mc":
        lines = ["| question_id | ground truth | extracted | correct | prediction |", "|---|---|---|---|---|"]
        for p in r["model_predictons"]:
            mark = "✓" if p["correct"] else ("invalid" if not p["valid"] else "✗")
            lines.append(f"| {_cell(p['question_id'])} | {p['ground_truth']} | {p['extracted_model_prediction'] or '–'}"
                         f" | {mark} | {_cell(p['model_prediction'])} |")
    else:
        lines = ["| question_id | score | question | ground truth | prediction |", "|---|---|---|---|---|"]
        for p in r["model_predictons"]:
            score = f"{p['score']:.2f}" if p["valid"] else f"failed: {_cell(p['error_in_gpt_eval'], 80)}"
            lines.append(f"| {_cell(p['question_id'])} | {score} | {_cell(p['question'])} | {_cell(p['ground_truth'])}"
                         f" | {_cell(p['model_prediction'])} |")
    return lines


def write_report(result_paths: Sequence[str], out_dir: str, *, name: str = "ours") -> dict[str, str]:
    """report.md, report.png and summary.json in `out_dir`; returns their paths."""
    from tools.annotate.client import atomic_write, atomic_write_json

    by_column: dict[tuple[str, str], tuple[str, dict]] = {}
    for path in result_paths:
        r = load_result(path)
        column = (r["split"], r["format"])
        if column in by_column:
            raise ValueError(f"{path} and {by_column[column][0]} both hold {COLUMN_TITLES[column]} results")
        by_column[column] = (path, r)
    if not by_column:
        raise ValueError("no result files given")
    ours = [by_column.get(c, (None, None))[1] for c in COLUMNS]

    md = [f"# Inst-IT Bench: {name}", "",
          "| Model | LLM | #IT samples | " + " | ".join(COLUMN_TITLES[c] for c in COLUMNS) + " |",
          "|---|---|---|" + "---|" * len(COLUMNS),
          f"| **{_cell(name)} (this run)** | | | " + " | ".join(_ours_cell(r) for r in ours) + " |"]
    md += [f"| {m} | {llm} | {n} | " + " | ".join(_num(v) for v in values) + " |" for m, llm, n, values in PUBLISHED]
    md += ["", "Published rows: Inst-IT paper Table 2 (NeurIPS 2025 / arXiv 2412.03565v3); \"(page)\" rows "
           "from the project page. MC = accuracy over valid answers (official rule); OE = mean GPT-4o judge "
           "score × 100 over judged items."]
    if any(r is not None and _unofficial(r) for r in ours):
        md += ["", "† Open-ended score from the rule-based judge (token-overlap F1 with [ID]/<t> matching): "
               "**NOT the official metric**, not comparable with the published numbers."]
    md += ["", "![Inst-IT Bench](report.png)", "", "## Runs", "",
           "| Subset | result file | score | counts | scoring |", "|---|---|---|---|---|"]
    md += [_run_row(*by_column[c]) for c in COLUMNS if c in by_column]
    md += ["", "## Per-question details"]
    for c in COLUMNS:
        if c in by_column:
            md += ["", f"### {COLUMN_TITLES[c]}", ""] + _details(by_column[c][1])

    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "chart": os.path.join(out_dir, "report.png"),
             "summary": os.path.join(out_dir, "summary.json")}
    atomic_write(paths["markdown"], ("\n".join(md) + "\n").encode("utf-8"))
    label = f"{name} (this run)"
    if any(r is not None and _unofficial(r) for r in ours):
        label += ": OE by the rule judge, NOT the official metric"
    series = [(label, [None if r is None else r["accuracy"] for r in ours])]
    for model, llm, _, values in PUBLISHED:
        if (model, llm) in CHART_ROWS:
            series.append((f"{model} {llm} (published)", list(values)))
    bar_chart(paths["chart"], [COLUMN_TITLES[c] for c in COLUMNS], series,
              title=f"Inst-IT Bench: {name} vs published (Inst-IT paper, Table 2)")
    atomic_write_json(paths["summary"], {
        "name": name,
        "scores": {f"{s}_{f}": (None if r is None else r["accuracy"]) for (s, f), r in zip(COLUMNS, ours)},
        "official_metric": {f"{s}_{f}": (r is not None and not _unofficial(r)) for (s, f), r in zip(COLUMNS, ours)},
        "results": {f"{s}_{f}": p for (s, f), (p, _) in by_column.items()},
    })
    return paths
