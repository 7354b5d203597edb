"""Rendering a report (``raysens.report.render``, issue 13 item 16): report.md escapes manifest strings."""

from __future__ import annotations

from raysens.report.render import Doc, to_html, to_markdown


def test_report_markdown_escapes_manifest_strings():
    doc = Doc("raysens report — <script>alert(1)</script>")
    doc.h(2, "Run <b>x</b>")
    doc.p("model [click](javascript:alert(1)) & <img src=x onerror=alert(1)>")
    doc.kv([("model", "<iframe src=evil>|x"), ("path", "a\nb")])
    md = to_markdown(doc)
    for raw in ("<script>", "<b>", "<img", "<iframe", "[click](javascript"):
        assert raw not in md
    assert "# raysens report — &lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "\\[click\\](javascript:alert(1)) &amp; &lt;img" in md
    assert "| model | &lt;iframe src=evil&gt;\\|x |" in md and "| path | a b |" in md
    assert "<script>" not in to_html(doc)
