"""A run report as one self-contained HTML page (``graphopt run --report r.html``, ``graphopt report r.json -o
r.html``): the passes, the artifacts, the pictures the run drew (placement, bench), the bench table and every
explanation. Styles are inline and pictures are data URIs, so the page reads from a file, offline, with no server."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable

from graphopt.emit import write_atomic, write_json_atomic
from graphopt.errors import UsageError

from .console import human_bytes, human_count

PICTURES = {".svg": "image/svg+xml", ".png": "image/png"}
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #1b1f24; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.status { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff; font-weight: 600; }
.ok { background: #1a7f37; } .failed { background: #cf222e; }
.error { background: #ffebe9; border: 1px solid #cf222e; padding: 8px 12px; border-radius: 6px; }
table { border-collapse: collapse; margin: 4px 0 12px; }
th { background: #24425e; color: #fff; text-align: right; padding: 5px 10px; font-weight: 600; }
td { border-bottom: 1px solid #d0d7de; text-align: right; padding: 4px 10px; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child, #artifacts td:nth-child(2) { text-align: left; }
tr.bad td { background: #ffebe9; } tr.failed-pass td { background: #fff8c5; }
code, pre { font: 12.5px ui-monospace, monospace; } pre { background: #f6f8fa; padding: 8px; overflow-x: auto; }
.meta { color: #57606a; } figure { margin: 8px 0 16px; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
details { margin: 4px 0; } summary { cursor: pointer; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(table_id: str, head: Iterable[str], rows: Iterable[tuple[str, list[str]]]) -> str:
    """A table: ``rows`` are ``(css class, cells)``, cells already HTML."""
    head_html = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for cls, cells in rows)
    return f'<table id="{table_id}"><thead><tr>{head_html}</tr></thead><tbody>{body}</tbody></table>'


def _folded(label: str, data: Any) -> str:
    """``data`` as indented JSON behind a ``label`` to unfold (nothing when empty)."""
    text = json.dumps(data, indent=1, default=str) if data else ""
    return f"<details><summary>{_e(label)}</summary><pre>{_e(text)}</pre></details>" if text else ""


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _passes(report: dict) -> str:
    model = report["model"]
    rows = [("captured", ["(captured)", "", "", "", _e(model.get("nodes", "")), human_count(model.get("params", 0)),
                          human_count(model.get("macs", 0)), human_bytes(model.get("bytes", 0)), "", "", "", ""])]
    for p in report["passes"]:
        rows.append(("" if p["verified"] else "bad", [
            f"<code>{_e(p['name'])}</code>", _e(p.get("group") or ""), _e(p.get("effect", "")), f"{p['seconds']:.2f} s",
            "yes" if p["modified"] else "no", _e(p["nodes"]), human_count(p["params"]), human_count(p["macs"]),
            human_bytes(p["bytes"]), _num(p.get("max_abs_err"), ".2e"), _num(p.get("cosine"), ".6f"),
            _folded("stats", p.get("stats"))]))
    if report.get("failed_pass"):
        rows.append(("failed-pass", [f"<code>{_e(report['failed_pass'])}</code>", "", "", "", "failed",
                                     "", "", "", "", "", "", ""]))
    return _table("passes", ("pass", "group", "effect", "time", "changed", "nodes", "params", "MACs", "size",
                             "max abs err", "cosine", "details"), rows)


def _artifacts(report: dict) -> str:
    rows = []
    for a in report["artifacts"]:
        path = a.get("path")
        verdict = "yes" if a["verified"] else "NO: " + _e("; ".join(a.get("problems", [])))
        rows.append(("" if a["verified"] else "bad", [
            f"<code>{_e(a['format'])}</code>", _e(path or "(not written)"),
            human_bytes(a["bytes"]) if a.get("bytes") is not None else "-", _num(a.get("max_abs_err"), ".2e"),
            _num(a.get("cosine"), ".6f"), _e(a.get("inputs", "")), f"{a.get('seconds', 0):.2f} s", verdict,
            _folded("meta", a.get("meta"))]))
    return _table("artifacts", ("format", "file", "size", "max abs err", "cosine", "input sets", "time",
                                "verified", "details"), rows)


def _bench(report: dict) -> str:
    rows = [("", [_e(r["label"]), human_bytes(r["bytes"]) if r.get("bytes") else "-", _num(r["median_ms"], ".3f"),
                  f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}",
                  f"{r['speedup']:.2f}x vs {_e(r['baseline'])}" if r.get("speedup") else "-",
                  _num(r.get("max_rel_err"), ".1e"), _num(r.get("accuracy"), ".2%")]) for r in report["bench"]]
    first = report["bench"][0]
    return (f'<p class="meta">{_e(first["threads"])} thread(s), {_e(first["runs"])} runs each, round-robin</p>'
            + _table("bench", ("artifact", "size", "median ms", "p10-p90 ms", "speed-up", "max rel err", "accuracy"),
                     rows))


def _pictures(report: dict, base: Path) -> str:
    """The run's pictures (``report["files"]`` under ``report["out"]``), inlined, SVG rather than PNG of one
    picture; a missing one is named."""
    out = Path(report.get("out") or base)
    out = out if out.is_absolute() else base / out
    files = [f for f in report.get("files", []) if Path(f).suffix.lower() in PICTURES]
    svg = {Path(f).stem for f in files if f.lower().endswith(".svg")}
    parts = []
    for name in files:
        path, kind = out / name, PICTURES[Path(name).suffix.lower()]
        if kind == "image/png" and Path(name).stem in svg:
            continue
        if not path.is_file():
            parts.append(f'<p class="meta">{_e(name)}: no longer in {_e(out)}</p>')
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f'<figure><img alt="{_e(name)}" src="data:{kind};base64,{data}">'
                     f'<figcaption class="meta">{_e(name)}</figcaption></figure>')
    return "".join(parts)


def explained(report: dict) -> list[tuple[str, str, list[str]]]:
    """``(pass, group, explanation lines)`` of every pass the report holds: the pipeline's, then each
    emitter's preparing passes (``partition (preparing pte)``)."""
    return [(p["name"], p.get("group") or "", p.get("explanations") or []) for p in report["passes"]] + [
        (f"{p['pass']} (preparing {a['format']})", p.get("group") or "", p.get("explanations") or [])
        for a in report["artifacts"] for p in a.get("meta", {}).get("prepared", [])]


def _explanations(report: dict) -> str:
    return "".join(f"<details open><summary><code>{_e(name)}</code>: {len(lines)} decision(s)</summary><ul>"
                   + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul></details>"
                   for name, _, lines in explained(report) if lines)


def to_html(report: dict, base: Path = Path(".")) -> str:
    """The page for ``report`` (a run report as ``--report`` writes it); ``base``: where a relative ``out`` is."""
    model = report["model"]
    ok = bool(report.get("ok"))
    title = f"graphopt: {model.get('name', '?')}"
    inputs = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in model.get("inputs", []))
    body = [f"<h1>{_e(title)} <span class=\"status {'ok' if ok else 'failed'}\">{'ok' if ok else 'failed'}</span></h1>",
            f'<p class="meta">model <code>{_e(model.get("spec", ""))}</code>'
            + (f", inputs {_e(inputs)}" if inputs else "") + f"; graphopt {_e(report.get('graphopt', '?'))}; "
            f"{report.get('seconds', 0):.1f} s</p>",
            f"<p>pipeline <code>{_e(report.get('pipeline') or '(none)')}</code></p>"]
    if report.get("error"):
        body.append(f'<p class="error" id="error">{_e(report["error"])}</p>')
    body += ["<h2>Passes</h2>", _passes(report)]
    if report["artifacts"]:
        body += ["<h2>Artifacts</h2>", _artifacts(report)]
    if report.get("bench"):
        body += ["<h2>Bench</h2>", _bench(report)]
    pictures = _pictures(report, base)
    if pictures:
        body += ["<h2>Pictures</h2>", pictures]
    explained = _explanations(report)
    if explained:
        body += ["<h2>Explanations</h2>", explained]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(path: Path, report: dict) -> None:
    """``report`` as HTML when ``path`` ends in .html/.htm, else as JSON; written atomically."""
    if path.suffix.lower() in (".html", ".htm"):
        write_atomic(path, to_html(report, path.parent).encode())
    else:
        write_json_atomic(path, report)


def load_report(path: Path) -> dict:
    """A run report JSON, or a UsageError saying what is wrong with the file."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no report at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a report JSON: {str(exc).splitlines()[0]}") from None
    missing = [k for k in ("model", "passes", "artifacts", "ok") if not isinstance(report, dict) or k not in report]
    if missing:
        raise UsageError(f"{path} is not a graphopt run report (no {', '.join(missing)})")
    return report
