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
from raysens.corpus.reader import CorpusError
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


def _default_sigint():
    """In the child: SIGINT at its default, so that Python raises KeyboardInterrupt even when the
    suite runs as a background job (``cmd &`` starts with SIGINT ignored, and a child inherits it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "raysens.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _ray_env(**extra) -> dict:
    env = {**os.environ, **extra}
    env.pop("RAY_ADDRESS", None)  # an embedded Ray of the child's own
    return env


def _wait(paths, n: int, p) -> None:
    t0 = time.time()
    while len(paths()) < n:
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 300, "no partials appeared"
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "interrupted by SIGTERM")])
def test_a_signal_on_ray_is_interrupted_and_the_rerun_is_identical(tiny_model, tmp_path, bundled_texts, sig, code,
                                                                   what):
    """Issue 17: whatever line the main thread (or a Ray Data thread) is on when the signal lands, the
    manifest is marked, one line says how to resume, and the exit status is the signal's."""
    src = _corpus(tmp_path / "c.jsonl", bundled_texts[:12])
    out = tmp_path / "run"
    args = ["run", "jobs/configs/quickstart.yaml", f"--model.name={tiny_model}", f"--data.source={src}",
            "--data.max_seq_len=10", "--layers=[1,-1]", "--cluster.use_ray=true", "--cluster.batch_size=2",
            "--cluster.num_actors=1", "--output.plots=false", "--data.limit=null", f"--output.dir={out}",
            "--cluster.ship_every_units=1",  # a partial per unit: the signal lands after two of six
            "--sensitivity.num_probes=1"]  # the reference's K (quickstart.yaml runs K=2)
    p = _cli(args, _ray_env(**{faults.UNIT_DELAY: "1.5"}))
    _wait(lambda: list((out / "partials").glob("unit_*.npz")), 2, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=180)
    lines = [ln for ln in err.splitlines() if ln.startswith("raysens run:")]
    assert p.returncode == code, err
    assert lines[0] == f"raysens run: error: {what}"
    assert lines[1].endswith(f"units are saved in {out}; rerun the same command to resume")
    assert "Traceback" not in err and "core worker has already been shutdown" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["error"] == what and 2 <= m["units"]["done"] < 6
    assert not (out / "lease.json").exists()
    p = subprocess.run([sys.executable, "-m", "raysens.cli", *args], cwd=ROOT, env=_ray_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    ref = run_local(config(tiny_model, tmp_path / "ref", f"--data.source={src}", "--cluster.batch_size=2"))
    assert_same_stats(raysens.load_run(out), ref.load(), rtol=0.0)  # exact state: bit for bit


def test_ctrl_c_on_a_sweep_on_ray_marks_every_unfinished_point(tmp_path, bundled_texts):
    import yaml

    src = _corpus(tmp_path / "c.jsonl", bundled_texts[:8])
    out = tmp_path / "sweep"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "t", "dir": str(out),
        "base": {"data": {"limit": None, "source": str(src)}, "cluster": {"use_ray": True, "num_actors": 1, "batch_size": 2,
                                                      "tokenize_cpus": 1, "ship_every_units": 1},
                 "output": {"plots": False, "progress_every_s": 0}},
        "grid": {"models": ["random:tiny-llama"], "seq_lens": [8, 10], "layers": [-1]}}))
    p = _cli(["sweep", str(spec)], _ray_env(**{faults.UNIT_DELAY: "1.5"}))
    _wait(lambda: list(out.glob("*/partials/unit_*.npz")), 2, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.startswith("raysens sweep:")]
    assert lines[0] == "raysens sweep: error: interrupted (Ctrl-C)", err
    assert lines[1].endswith("rerun the same command to resume") and "Traceback" not in err
    state = json.loads((out / "sweep.json").read_text())
    assert state["status"] == "interrupted"
    assert all(pt["status"] == "interrupted" for pt in state["points"])  # one pass: nothing finished yet
    for pt in state["points"]:
        m = json.loads((out / pt["name"] / "manifest.json").read_text())
        assert m["status"] == "interrupted" and m["error"] == "interrupted (Ctrl-C)"


def test_wind_down_stops_every_ray_data_thread_of_an_abandoned_pass(ray_session):
    """The cause of issue 17: after an interrupted iteration, Ray Data's threads (the iterator's
    worker, the prefetcher, the streaming executor) live on, and one that touches the core worker
    after ``ray.shutdown()`` ends the process with status 1. ``wind_down`` leaves none alive."""
    import threading

    from raysens.backends import ray_pool

    def _slow(batch):  # defined here: pickled by value (the test module is not importable in workers)
        time.sleep(0.3)
        return batch

    before = set(threading.enumerate())
    ds = ray_session.data.range(200, override_num_blocks=100).map_batches(_slow, batch_size=1)
    it = iter(ds.iter_batches(batch_size=1, prefetch_batches=1))
    next(it)  # the pass is under way, then abandoned
    ours = [t for t in set(threading.enumerate()) - before if ray_pool._ray_owned(t)]
    names = {t.name for t in ours}
    assert any(n.startswith("StreamingExecutor") for n in names) and "iter_threaded" in names, names
    it.close()
    assert ray_pool.wind_down(set(threading.enumerate()) - before, timeout=60) == []
    assert not [t.name for t in ours if t.is_alive()]


def test_signals_are_held_during_the_wind_down_and_delivered_after():
    from raysens.backends import ray_pool

    # Python's own handler, as in a terminal: a suite started as a background job inherits SIGINT ignored
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ray_pool._signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # a handler that raised would have raised here
                held = True
        assert held and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
