"""Issue 13: pieces checked without a run — Ray's exceptions unwrapped to the cause (item 6),
report.md escaping (item 16), compat's argument checks (items 12, 13), ``raysens report`` /
``compare`` without matplotlib (item 9), the one-line command failures (item 10)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysens.report.render import Doc, to_html, to_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_ray_errors_are_unwrapped_to_the_cause():
    from raysens.backends.errors import unwrap
    from raysens.corpus.reader import CorpusError
    from raysens.store.rundir import RunError

    class UserCodeException(Exception):  # shaped like Ray's wrappers: the cause in .cause / __cause__
        pass

    class RayTaskError(Exception):
        def __init__(self, cause):
            super().__init__("ray::MapBatches(tokenize_batch)() (pid=1, ip=x)\n  70 lines of traceback ...")
            self.cause = cause

    cause = CorpusError("corpus 'c.jsonl': line 3 is not valid JSON")
    outer = UserCodeException("UDF failed")
    outer.__cause__ = RayTaskError(cause)
    assert unwrap(outer) is cause
    other = UserCodeException("x")
    other.__cause__ = RayTaskError(ZeroDivisionError("division by zero"))
    err = unwrap(other)
    assert isinstance(err, RunError) and str(err) == "a Ray worker failed: ZeroDivisionError: division by zero"


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


def test_compat_refuses_what_it_used_to_coerce():
    from refs import random_ids, tiny_model
    from raysens.compat import EstablishedAnalysisMethods

    model = copy.deepcopy(tiny_model("gpt2"))
    an = EstablishedAnalysisMethods(model)
    ids = random_ids(4, 0)[None]
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=r"probes must be >= 1, got 0"):
        an.compute_position_jacobian(ids, probes=0)
    with pytest.raises(ValueError, match=r"probes must be an integer, got 2.5"):
        an.compute_position_jacobian(ids, probes=2.5)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got 1.5"):
        an.compute_position_jacobian(ids, seed=1.5)
    with pytest.raises(ValueError, match=r"inputs must be integer token ids, got dtype torch.float"):
        an.compute_position_jacobian(ids.float() + 0.5)
    with pytest.raises(ValueError, match=r"inputs must be integer token ids"):
        an.compute_position_jacobian(np.array([[1.0, np.nan, 2.0]]))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\).*got ids from -1"):
        an.compute_position_jacobian(np.array([[1, -1, 2]]))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\).*to {vocab}"):
        an.compute_position_jacobian(np.array([[1, vocab, 2]]))
    with pytest.raises(ValueError, match=r"unknown estimator 'frob'; choose from \['exact', 'hutchinson', 'projection'\]"):
        an.compute_position_jacobian(ids, estimator="frob")


NO_MPL = "import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib` raises ImportError


@pytest.mark.parametrize("cmd", ["report", "compare"])
def test_report_and_compare_without_matplotlib_say_so_in_one_line(cmd, tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "tests" / "unit" / "report"))
    try:
        from test_report import make_run
    finally:
        sys.path.pop(0)
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


def test_command_failures_are_one_line_with_exit_codes(capsys):
    from raysens.cli import _failure
    from raysens.config import ConfigError
    from raysens.run.signals import Terminated
    from raysens.store.rundir import RunError
    from raysens.testing.faults import SimulatedInterrupt

    known = (ConfigError, (RunError,))
    err = RunError("storage error: PermissionError: [Errno 13]\n denied")
    err.resume_hint = "3/9 units are saved in /x; rerun the same command to resume"
    cases = [(ConfigError("sensitivity: seed must be ..."), 2, "raysens run: error: sensitivity: seed must be ..."),
             (err, 1, "raysens run: error: storage error: PermissionError: [Errno 13] denied"),
             (KeyboardInterrupt(), 130, "raysens run: error: interrupted (Ctrl-C)"),
             (SimulatedInterrupt("x"), 130, "raysens run: error: interrupted (Ctrl-C)"),
             (Terminated("SIGTERM"), 143, "raysens run: error: interrupted by SIGTERM")]
    for exc, code, line in cases:
        assert _failure("run", exc, *known) == code
        lines = capsys.readouterr().err.splitlines()
        assert lines[0] == line
        assert lines[1:] == (["raysens run: 3/9 units are saved in /x; rerun the same command to resume"]
                             if exc is err else [])
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        _failure("run", ZeroDivisionError("x"), *known)


def test_actor_fault_settings_carry_the_unit_delay_and_the_kill(monkeypatch, tmp_path):
    """The actor hooks are off unless armed; a delay alone sleeps before each unit and never kills."""
    import time

    from raysens.testing import faults

    for k in (faults.ACTOR_KILL, faults.ACTOR_MARKER, faults.ACTOR_DELAY):
        monkeypatch.delenv(k, raising=False)
    assert faults.actor_settings() == {}
    faults.actor_unit_start(10**6, {})  # unarmed: returns
    monkeypatch.setenv(faults.ACTOR_DELAY, "0.2")
    settings = faults.actor_settings()
    assert settings == {"delay_s": 0.2}
    t0 = time.perf_counter()
    faults.actor_unit_start(10**6, settings)  # sleeps, does not exit
    assert time.perf_counter() - t0 >= 0.2
    monkeypatch.setenv(faults.ACTOR_KILL, "3")
    monkeypatch.setenv(faults.ACTOR_MARKER, str(tmp_path / "m"))
    assert faults.actor_settings() == {"kill_after": 3, "kill_marker": str(tmp_path / "m"), "delay_s": 0.2}
