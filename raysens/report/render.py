"""A tiny document model rendered twice: self-contained HTML (PNG embedded as base64) and Markdown
(PNG files beside it). :mod:`raysens.report.content` builds the blocks; nothing here knows about runs."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Doc:
    title: str
    blocks: list[tuple] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # relative path -> PNG bytes

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str, cls: str = "") -> None:
        self.blocks.append(("p", text, cls))

    def table(self, headers: list[str], rows: list[list[Any]], cls: str = "") -> None:
        self.blocks.append(("table", headers, rows, cls))

    def kv(self, pairs: list[tuple[str, Any]]) -> None:
        self.blocks.append(("table", ["", ""], [[k, v] for k, v in pairs], "kv"))

    def img(self, name: str, png: bytes, caption: str) -> None:
        self.images[name] = png
        self.blocks.append(("img", name, caption))


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


CSS = """
body{font:15px/1.5 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1f2328;margin:0;background:#fafafa}
main{max-width:1280px;margin:0 auto;padding:24px 32px 64px;background:#fff;box-shadow:0 0 12px #0001}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:21px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:40px}
h3{font-size:17px;margin-top:28px}h4{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13.5px}
th,td{padding:4px 10px;border-bottom:1px solid #e5e5e5;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
table.kv td:first-child{font-weight:600;color:#555;white-space:nowrap}table.kv th{display:none}
figure{margin:12px 0 24px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#555;margin-top:4px}
p.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px}
p.muted{color:#666;font-size:13px}nav{font-size:13.5px;columns:3}nav a{color:#0a58ca;text-decoration:none}
"""


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    from .analysis import fmt

    return fmt(v) if _is_num(v) or v is None or hasattr(v, "dtype") else str(v)


def to_html(doc: Doc) -> str:
    esc = html.escape
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(doc.title)}</title>",
           f"<style>{CSS}</style></head><body><main>", f"<h1>{esc(doc.title)}</h1>"]
    heads = [b for b in doc.blocks if b[0] == "h" and b[1] == 2]
    if len(heads) > 2:
        out.append("<nav>" + "<br>".join(f"<a href='#{_anchor(b[2])}'>{esc(b[2])}</a>" for b in heads) + "</nav>")
    seen: dict[str, int] = {}
    for b in doc.blocks:
        if b[0] == "h":
            a = _anchor(b[2])
            seen[a] = seen.get(a, 0) + 1
            a = a if seen[a] == 1 else f"{a}-{seen[a]}"
            out.append(f"<h{b[1]} id='{a}'>{esc(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p class='{b[2]}'>{esc(b[1])}</p>" if b[2] else f"<p>{esc(b[1])}</p>")
        elif b[0] == "table":
            _, headers, rows, cls = b
            out.append(f"<table class='{cls}'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td class='num'>{esc(_cell(v))}</td>" if _is_num(v)
                                            else f"<td>{esc(_cell(v))}</td>" for v in r) + "</tr>")
            out.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode(doc.images[b[1]]).decode("ascii")
            out.append(f"<figure><img alt='{esc(b[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(b[2])}</figcaption></figure>")
    out.append("</main></body></html>")
    return "\n".join(out)


def _md_text(text: Any) -> str:
    """Text as Markdown shows it literally: no raw HTML (``&``, ``<``, ``>`` as entities), no links
    or images (``[``, ``]`` escaped) — manifest strings (model names, paths, errors) are data."""
    out = html.escape(str(text), quote=False).replace("[", "\\[").replace("]", "\\]")
    return out.replace("\r", " ").replace("\n", " ")


def _md_escape(v: Any) -> str:
    return _md_text(_cell(v)).replace("|", "\\|")


def to_markdown(doc: Doc) -> str:
    out = [f"# {_md_text(doc.title)}", ""]
    for b in doc.blocks:
        if b[0] == "h":
            out += ["#" * b[1] + " " + _md_text(b[2]), ""]
        elif b[0] == "p":
            out += [("> " if b[2] == "note" else "") + _md_text(b[1]), ""]
        elif b[0] == "table":
            _, headers, rows, cls = b
            if cls == "kv":
                headers = ["field", "value"]
            out.append("| " + " | ".join(_md_escape(h) for h in headers) + " |")
            out.append("|" + "|".join("---:" if rows and _is_num(rows[0][k]) else "---" for k in range(len(headers))) + "|")
            out += ["| " + " | ".join(_md_escape(v) for v in r) + " |" for r in rows]
            out.append("")
        elif b[0] == "img":
            out += [f"![{_md_text(b[2])}]({b[1]})", "", f"*{_md_text(b[2])}*", ""]
    return "\n".join(out)
