"""Build raysens/data/corpus.jsonl, the bundled English corpus the quick start uses.

The text is derived from what is already on every machine that runs raysens: the Python Language
Reference topics shipped with CPython (``pydoc_data.topics``) and the docstrings of the standard
library (module, class and function documentation written in English prose).
Each sample is one or more consecutive prose paragraphs of one docstring, cleaned (whitespace
collapsed, code examples, tables, option lists and reST markup dropped), 160-700 characters long,
deduplicated. The output is deterministic for a given Python version; rows are sorted by a hash
of the text so neighbouring samples come from different modules.

From the repository root::

    python -m jobs.tools.make_corpus [--out raysens/data/corpus.jsonl] [--max-rows 2000]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip",
             "tkinter", "pydoc_data", "encodings", "config-3.11-x86_64-linux-gnu"}
MIN_CHARS, MAX_CHARS = 160, 700
_WORD = re.compile(r"[A-Za-z][a-z]+")


def docstrings(path: Path):
    """(qualified name, docstring) for the module and every class/function in one file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for n in nodes:
        doc = ast.get_docstring(n, clean=True)
        if doc:
            yield doc


def is_prose(par: str) -> bool:
    """A paragraph of English sentences, not code, a table, a signature or a list of options."""
    lines = par.splitlines()
    if any(l.lstrip().startswith((">>>", "...", "$ ", "-", "*", "+", "|", "=", ":", "#", "..", "%")) for l in lines):
        return False
    if any(l.startswith((" ", "\t")) for l in lines):  # indented: code or definition list
        return False
    text = " ".join(l.strip() for l in lines)
    if not (MIN_CHARS // 2 <= len(text) <= MAX_CHARS) or not text[0].isupper() or text[-1] not in ".!?":
        return False
    if re.search(r"[{}<>\\`@]|::|__|==|->|http", text):
        return False
    words = text.split()
    alpha = sum(bool(_WORD.fullmatch(w.strip(".,;:!?\"'()"))) for w in words)
    return len(words) >= 12 and alpha / len(words) >= 0.8 and text.count(". ") + 1 >= 1


def samples(doc: str):
    """Consecutive prose paragraphs of a docstring merged into samples of MIN..MAX characters."""
    pars = [p for p in re.split(r"\n\s*\n", doc) if is_prose(p)]
    cur = ""
    for p in pars:
        text = re.sub(r"\s+", " ", p).strip()
        if cur and len(cur) + 1 + len(text) > MAX_CHARS:
            if len(cur) >= MIN_CHARS:
                yield cur
            cur = ""
        cur = f"{cur} {text}".strip()
        if len(cur) >= MIN_CHARS * 2:
            yield cur
            cur = ""
    if len(cur) >= MIN_CHARS:
        yield cur


def documents():
    """Language Reference topics, then stdlib docstrings (deterministic order)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            yield from docstrings(path)


def build(max_rows: int) -> list[str]:
    seen, out = set(), []
    for doc in documents():
        for s in samples(doc):
            key = re.sub(r"\W+", " ", s.lower()).strip()
            if key not in seen:
                seen.add(key)
                out.append(s)
    out.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    return out[:max_rows]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.tools.make_corpus", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "raysens" / "data" / "corpus.jsonl"))
    ap.add_argument("--max-rows", type=int, default=2000)
    args = ap.parse_args(argv)
    rows = build(args.max_rows)
    with open(args.out, "w", encoding="utf-8") as f:
        for s in rows:
            f.write(json.dumps({"text": s}, ensure_ascii=False) + "\n")
    size = Path(args.out).stat().st_size
    print(f"wrote {len(rows)} samples ({size / 1024:.0f} KiB) to {args.out}")


if __name__ == "__main__":
    main()
