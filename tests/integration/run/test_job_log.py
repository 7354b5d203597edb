"""A job's log reads like a log (issue 27): where stdout is not a terminal (``ray job submit``, CI, a
redirected log) Ray Data's periodic multi-line progress blocks stay out and raysens' one-line progress
is what shows; ``RAYSENS_RAY_DATA_PROGRESS=1`` brings Ray Data's display back for debugging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.ray
BLOCK_MARKERS = ("Total Progress", "Active & requested resources")  # Ray Data's non-terminal block


def _job(tmp_path, name: str, env: dict) -> subprocess.CompletedProcess:
    out = tmp_path / name
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
model: {{name: "random:tiny-llama"}}
data: {{limit: 12, max_seq_len: 8}}
layers: [1]
cluster: {{num_actors: 1, batch_size: 3}}
output: {{dir: {out}, plots: false, progress_every_s: 0.01}}
""")
    e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS")}
    e.update(env)
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "run.py"), str(cfg)], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)  # pipes: stdout is not a terminal


def test_log_has_raysens_progress_and_no_ray_data_blocks(tmp_path):
    p = _job(tmp_path, "quiet", {})
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "[raysens] 12/12 samples (100%)" in log
    for marker in BLOCK_MARKERS:
        assert marker not in log, f"Ray Data's progress block ({marker!r}) in the job's log"
    assert "Progress bars disabled" not in log  # Ray Data's own hint names a Python setting; ours is documented

    p = _job(tmp_path, "debug", {"RAYSENS_RAY_DATA_PROGRESS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Total Progress" in p.stdout + p.stderr  # the switch works (and the check above can fail)
