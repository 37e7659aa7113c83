"""What `cart eval` shows: the metrics table (plain text and HTML), `hits.jsonl` (each query's ranked items
and the rank of its first right answer) and `report.html` (the table and sample queries' thumbnails)."""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path

from cart import files
from cart.config import Config
from cart.retrieve.scoring import METRICS, first_right


def table_rows(summary: dict):
    """(method, query set, its metrics, latency p50 in ms) for every row of the metrics table."""
    for method, sets in summary["methods"].items():
        for name, m in sets.items():
            if name != "latency_ms_batch_1":
                yield method, name, m, sets["latency_ms_batch_1"]["p50"]


def table(summary: dict) -> str:
    """The metrics as a plain-text table: one row per method and query set."""
    lines = [f"{'method':<15}{'set':<5}{'queries':>8}" + "".join(f"{k:>8}" for k in METRICS) + f"{'ms/query':>10}"]
    for method, name, m, p50 in table_rows(summary):
        lines.append(f"{method:<15}{name:<5}{m['queries']:>8}" + "".join(f"{m[k]:>8.3f}" for k in METRICS) + f"{p50:>10.1f}")
    return "\n".join(lines)


def write_hits(path: Path, query_sets: dict, relevant: dict, ranked: dict, records: list[dict]) -> None:
    lines = []
    methods = list(dict.fromkeys(method for method, _ in ranked))
    for set_name, queries in query_sets.items():
        ranks = {m: first_right(ranked[m, set_name][0], relevant[set_name]) for m in methods}
        for i, (query, source) in enumerate(queries):
            row = {"set": set_name, "query": query, "source": records[source]["id"],
                   "relevant": sorted(records[r]["id"] for r in relevant[set_name][i])}
            for m in methods:
                items, scores = ranked[m, set_name]
                kept = items[i] >= 0
                row[m] = {"ids": [records[r]["id"] for r in items[i][kept]],
                          "scores": [round(float(s), 4) for s in scores[i][kept]], "rank": int(ranks[m][i])}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    files.write_text(path, "".join(lines))


def thumbnail(record: dict, size: int = 48) -> str:
    if record["modality"] != "image":
        return f"<div class='media'>{html.escape(record['modality'])}</div>"
    from cart.data.images import load_rgb

    image = load_rgb(record["path"])
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}' alt=''>"


def write_report(path: Path, summary: dict, query_sets: dict, relevant: dict, ranked: dict, records: list[dict],
                  cfg: Config) -> None:
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>cart eval: {esc(cfg.run)}</title><style>",
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:4px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}td.q{text-align:left}.hit{display:inline-block;"
             "margin:2px;text-align:center;font-size:11px;border:3px solid}.right{border-color:#2a2}"
             ".wrong{border-color:#d33}.media{width:48px;height:48px}</style>",
             f"<h1>cart eval: {esc(cfg.run)}</h1><p>Beam width {summary['beam_width']}; a query's right answers are "
             f"its source item and every item with a text of kind {esc(', '.join(cfg.eval.relevant_kinds))} equal "
             f"to it. Held-out queries only.</p><h2>Metrics</h2><table><tr><th>method</th><th>set</th>"
             "<th>queries</th><th>R@1</th><th>R@5</th><th>R@10</th><th>MRR@10</th><th>ms/query (batch 1, p50)</th></tr>"]
    for method, name, m, p50 in table_rows(summary):
        parts.append(f"<tr><td class=q>{esc(method)}</td><td>{esc(name)}</td><td>{m['queries']}</td>"
                     + "".join(f"<td>{m[k]:.3f}</td>" for k in METRICS) + f"<td>{p50:.1f}</td></tr>")
    parts.append("</table><h2>Sample queries: CART's top 5</h2><p>Green: a right answer; red: wrong. "
                 "Scores are log-probabilities of the identifier.</p><table>")
    rng = random.Random(cfg.seed)
    for set_name, queries in query_sets.items():
        for i in sorted(rng.sample(range(len(queries)), min(cfg.eval.report_queries, len(queries)))):
            items, scores = ranked["CART", set_name]
            cells = "".join(
                f"<div class='hit {'right' if r in relevant[set_name][i] else 'wrong'}' title='{esc(records[r]['id'])}'>"
                f"{thumbnail(records[r])}<br>{s:.2f}</div>" for r, s in zip(items[i][:5], scores[i][:5]) if r >= 0)
            parts.append(f"<tr><td class=q>{esc(set_name)}: {esc(queries[i][0])}</td><td class=q>{cells}</td></tr>")
    parts.append("</table>")
    if cfg.corpus.source == "emoji":
        parts.append("<p>Emoji artwork: <a href='https://github.com/twitter/twemoji'>Twemoji</a> by Twitter, Inc. "
                     "and other contributors, CC-BY 4.0, via the npm package emoji-datasource-twitter.</p>")
    files.write_text(path, "".join(parts) + "\n")
