"""The tests' own tree: unit tests mirror the package (``tests/unit/<x>/`` for ``raysens/<x>/`` or
``raysens/<x>.py``, or a folder of the repository such as ``jobs/`` and ``deploy/``; a single file
``tests/unit/test_<x>.py`` for a top-level module ``raysens/<x>.py`` or ``raysens/_<x>.py``), no test edits
``sys.path`` (pyproject's ``pythonpath`` puts the root and tests/unit's helpers on it), and test file
names are unique across tests/ (pytest's default import mode imports each by its base name)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tests" / "unit"
# tests of the whole tree, not of one package, that stay at the top of tests/unit
TOP_LEVEL = {"test_layering.py", "test_signatures.py", "test_test_tree.py"}
EDIT = re.compile(r"sys\.path\.(insert|append|extend|remove|pop)\(|sys\.path\s*(\+?=|\[)")


def test_unit_test_folders_mirror_the_package_or_a_repository_folder():
    raysens = ROOT / "raysens"
    for d in sorted(p for p in UNIT.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        mirrored = (raysens / d.name).is_dir() or (raysens / f"{d.name}.py").is_file() or (ROOT / d.name).is_dir()
        assert mirrored, f"tests/unit/{d.name}/ mirrors neither raysens/{d.name} nor a folder of the repository"


def test_no_theme_named_tests_at_the_top_of_tests_unit():
    def mirrors_a_module(name: str) -> bool:
        stem = name[len("test_"):-len(".py")]
        return (ROOT / "raysens" / f"{stem}.py").is_file() or (ROOT / "raysens" / f"_{stem}.py").is_file()

    top = {p.name for p in UNIT.glob("test_*.py") if not mirrors_a_module(p.name)}
    assert top <= TOP_LEVEL, f"move {sorted(top - TOP_LEVEL)} into the folder of the module they test"


def test_no_test_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
                 if p != Path(__file__).resolve() and EDIT.search(p.read_text())]
    assert not offenders, f"sys.path edited in {offenders}: use pyproject's pytest pythonpath or a package import"


def test_test_file_names_are_unique():
    names = Counter(p.name for p in (ROOT / "tests").rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], [n for n, c in names.items() if c > 1]


def test_the_sys_path_pattern_finds_an_edit():
    assert EDIT.search("sys.path.insert(0, str(HERE))") and EDIT.search("sys.path[:0] = [x]")
    assert not EDIT.search('if "sys.path" in p.read_text()')
