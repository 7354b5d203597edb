"""Issue 13 on local Ray: a worker's error is one line (Ray's wrappers unwrapped to the cause) with
the manifest marked failed; Ctrl-C ends ``interrupted`` and the rerun gives identical statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import raysens
from pipeline_util import assert_same_stats, config
from raysens.run.runner import Runner, run_local
from raysens.store.corpus import CorpusError
from raysens.testing import faults

ROOT = Path(__file__).resolve().parents[3]


def _corpus(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_a_worker_error_under_ray_is_the_cause_and_marks_the_manifest_failed(ray_session, tiny_model, tmp_path,
                                                                             bundled_texts):
    src = _corpus(tmp_path / "c.jsonl", bundled_texts[:6])
    cfg = config(tiny_model, tmp_path / "run", f"--data.source={src}", "--cluster.batch_size=3")
    runner = Runner(use_ray=True)
    runner.open("run", cfg, "now")
    _corpus(src, bundled_texts[6:12])  # changed after planning: the tokenize task refuses it
    with pytest.raises(CorpusError, match=r"^corpus '.*c\.jsonl' changed since the run was planned") as ei:
        runner.run()
    assert "Traceback" not in str(ei.value) and "\n" not in str(ei.value)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == str(ei.value)


def test_ctrl_c_on_ray_is_interrupted_and_the_rerun_is_identical(tiny_model, tmp_path, bundled_texts):
    src = _corpus(tmp_path / "c.jsonl", bundled_texts[:12])
    out = tmp_path / "run"
    args = ["run", "jobs/configs/quickstart.yaml", f"--model.name={tiny_model}", f"--data.source={src}",
            "--data.max_seq_len=10", "--layers=[1,-1]", "--cluster.use_ray=true", "--cluster.batch_size=2",
            "--cluster.num_actors=1", "--output.plots=false", "--data.limit=null", f"--output.dir={out}"]
    env = {**os.environ, faults.UNIT_DELAY: "1.5", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    p = subprocess.Popen([sys.executable, "-m", "raysens.cli", *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(list((out / "partials").glob("unit_*.npz"))) < 2:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=180)
    lines = [ln for ln in err.splitlines() if ln.startswith("raysens run:")]
    assert p.returncode == 130, err
    assert lines[0] == "raysens run: error: interrupted (Ctrl-C)"
    assert lines[1].endswith(f"units are saved in {out}; rerun the same command to resume")
    assert "Traceback" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and 2 <= m["units"]["done"] < 6
    env.pop(faults.UNIT_DELAY)
    p = subprocess.run([sys.executable, "-m", "raysens.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    ref = run_local(config(tiny_model, tmp_path / "ref", f"--data.source={src}", "--cluster.batch_size=2"))
    assert_same_stats(raysens.load_run(out), ref.load(), rtol=0.0)  # exact state: bit for bit
