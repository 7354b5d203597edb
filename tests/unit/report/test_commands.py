"""The report commands (``raysens.report.commands``, issue 13 item 9): ``raysens report`` / ``compare``
without matplotlib and ``raysens show`` / ``report`` on a manifest that is not an object fail in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

NO_MPL = "import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib` raises ImportError


@pytest.mark.parametrize("cmd", ["report", "compare"])
def test_report_and_compare_without_matplotlib_say_so_in_one_line(cmd, tmp_path):
    pytest.importorskip("matplotlib")
    from test_report import make_run  # tests/unit/report/test_report.py: a finished tiny run
    run = make_run(tmp_path / "run")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_MPL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}
    args = [run] if cmd == "report" else [run, run, "--out", str(tmp_path / "cmp")]
    p = subprocess.run([sys.executable, "-m", "raysens.cli", cmd, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == (f"raysens {cmd}: error: plots need matplotlib, which is not installed: "
                                "pip install 'raysens[plots]' (or pip install matplotlib)")


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"'])
def test_a_manifest_that_is_not_an_object_is_one_line_in_show_and_report(tmp_path, capsys, content):
    from raysens.report.commands import main_report, main_show

    (tmp_path / "manifest.json").write_text(content)
    assert main_show([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysens show: error: cannot load run") and "is not a raysens manifest" in err
    assert "\n" not in err
    assert main_report([str(tmp_path)]) == 1
    assert "is not a raysens manifest" in capsys.readouterr().err
