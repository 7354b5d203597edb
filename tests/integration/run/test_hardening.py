"""Issue 13: a resume never mixes inputs, bad input is refused before anything is written, and every
failure ends in one clear line with the manifest marked ``failed`` or ``interrupted``. In-process
(no Ray) except where a test says so; the Ray cases are in ``test_hardening_ray.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import raysens
from pipeline_util import KEEP, assert_same_stats, config
from raysens.config import ConfigError
from raysens.run.runner import run_local
from raysens.corpus.reader import CorpusError
from raysens.store.rundir import RunError
from raysens.testing import faults

ROOT = Path(__file__).resolve().parents[3]


def _corpus(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def texts(bundled_texts):
    return bundled_texts[:12]


def _cfg(model, out, src, *extra):
    return config(model, out, f"--data.source={src}", "--cluster.use_ray=false", "--cluster.batch_size=3", *extra)


# ---------------------------------------------------------------------- 1. content identity
def test_changed_corpus_is_refused_on_resume_and_on_rerun_of_a_complete_run(tiny_model, tmp_path, texts, monkeypatch):
    src = _corpus(tmp_path / "c.jsonl", texts)
    ref = run_local(_cfg(tiny_model, tmp_path / "ref", src))
    out = tmp_path / "run"
    monkeypatch.setenv(faults.INTERRUPT, "2")
    with pytest.raises(faults.SimulatedInterrupt):
        run_local(_cfg(tiny_model, out, src))
    monkeypatch.delenv(faults.INTERRUPT)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["inputs"]["corpus"]["rows"] == 12
    assert m["inputs"]["corpus"]["files"][0]["path"] == str(src)
    before = _snapshot(out)
    _corpus(src, texts[:5] + ["A different fifth text, same path, same config."] + texts[6:])
    with pytest.raises(RunError, match=r"computed from other inputs: corpus .*c\.jsonl.* changed \(records_sha256 "):
        run_local(_cfg(tiny_model, out, src))
    assert _snapshot(out) == before  # untouched: no lease, no manifest rewrite, no partial moved
    _corpus(src, texts)  # the original bytes again: the resume is accepted and equals an uninterrupted run
    run_local(_cfg(tiny_model, out, src))
    assert_same_stats(raysens.load_run(out), ref.load())
    _corpus(src, texts[:11])  # a complete run rerun after the corpus changed is refused too
    with pytest.raises(RunError, match=r"rows 12 -> 11"):
        run_local(_cfg(tiny_model, out, src))


def test_changed_weights_are_refused(tiny_model, tmp_path, texts):
    import torch

    from raysens.core.models import load_model

    lm = load_model(tiny_model)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    lm.tokenizer.save_pretrained(mdir)
    src = _corpus(tmp_path / "c.jsonl", texts[:6])
    out = tmp_path / "run"
    run_local(_cfg(str(mdir), out, src))
    files = {f["file"] for f in json.loads((out / "manifest.json").read_text())["inputs"]["model"]["files"]}
    assert {"config.json", "model.safetensors"} <= files
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[5] += 1.0
    lm.model.save_pretrained(mdir)
    before = _snapshot(out)
    with pytest.raises(RunError, match=r"model weights of .*model.* changed \(model\.safetensors: size \d+ -> \d+ bytes, "
                                       r"SHA-256 [0-9a-f]{12}… -> [0-9a-f]{12}…\)"):
        run_local(_cfg(str(mdir), out, src))
    assert _snapshot(out) == before


def test_relative_paths_from_another_directory_do_not_alias(tiny_model, tmp_path, texts, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _corpus(a / "c.jsonl", texts[:6])
    _corpus(b / "c.jsonl", texts[6:12])
    out = tmp_path / "run"
    monkeypatch.chdir(a)
    run_local(_cfg(tiny_model, out, "c.jsonl"))
    assert json.loads((out / "manifest.json").read_text())["corpus"]["source"] == str(a / "c.jsonl")
    monkeypatch.chdir(b)
    with pytest.raises(RunError, match=r"corpus '.*/b/c\.jsonl' \(was '.*/a/c\.jsonl'\) changed"):
        run_local(_cfg(tiny_model, out, "c.jsonl"))


# ---------------------------------------------------------------------- 2. a foreign manifest.json
@pytest.mark.parametrize("content, what", [('{"name": "my notes"}', "format None"), ("[1, 2]", "a JSON list"),
                                           ("not json", "not readable JSON")])
def test_a_manifest_that_is_not_raysens_is_never_overwritten(tiny_model, tmp_path, texts, content, what):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    with pytest.raises(RunError, match=f"has a manifest.json that is not a raysens run's \\({what}"):
        run_local(_cfg(tiny_model, out, _corpus(tmp_path / "c.jsonl", texts[:3])))
    assert (out / "manifest.json").read_text() == content and sorted(os.listdir(out)) == ["manifest.json"]


# ---------------------------------------------------------------------- 4. strict UTF-8
def test_undecodable_text_lines_are_skipped_as_not_utf8_and_binary_or_utf16_files_refused(tiny_model, tmp_path, texts):
    src = tmp_path / "c.txt"
    src.write_bytes(texts[0].encode() + b"\n\xff\xfe\x80 binary \x9f\n\x00\n" + texts[1].encode() + b"\n")
    s = run_local(_cfg(tiny_model, tmp_path / "run", src))
    assert s.manifest["samples"]["computed"] == 2
    assert s.manifest["samples"]["skipped_ids"] == {"not_utf8": [1, 2]}
    assert "not UTF-8" in s.manifest["samples"]["skip_reasons"]["not_utf8"]
    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes("one line\nanother line\n".encode("utf-16"))
    with pytest.raises(CorpusError, match=r"is UTF-16 \(byte-order mark\)"):
        run_local(_cfg(tiny_model, tmp_path / "r16", utf16))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(128, 256)) * 4 + b"\n\x00\x01\n")
    with pytest.raises(CorpusError, match=r"is not UTF-8 text: none of its 2 lines decodes"):
        run_local(_cfg(tiny_model, tmp_path / "rbin", binary))
    bad = _corpus(tmp_path / "bad.jsonl", texts[:2])
    bad.write_bytes(bad.read_bytes() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 3 is not UTF-8"):
        run_local(_cfg(tiny_model, tmp_path / "rbad", bad))
    assert not any((tmp_path / d).exists() for d in ("r16", "rbin", "rbad"))


# ---------------------------------------------------------------------- 5. memory follows observed lengths
def test_huge_max_seq_len_finishes_with_memory_of_the_observed_length(tiny_model, tmp_path, texts):
    cfg = _cfg(tiny_model, tmp_path / "run", _corpus(tmp_path / "c.jsonl", texts[:6]),
               "--data.max_seq_len=100000", "--layers=[-1]")
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        s = run_local(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seq = s.manifest["seq_len"]
    assert s.manifest["max_seq_len"] == 100000 and 50 < seq < 2000  # bundled texts: a few hundred tokens
    assert raysens.load_run(s.run_dir)[2].mean.shape == (seq, seq)
    assert peak < 2 * 1024 ** 3  # one 100000² float64 array alone would be 80 GB
    assert time.perf_counter() - t0 < 300


# ---------------------------------------------------------------------- 7. / 11. validation before writing
@pytest.mark.parametrize("override, match", [
    ("--sensitivity.num_probes='2'", r"sensitivity: num_probes must be an integer, got '2' \(str\)"),
    ("--sensitivity.num_probes=2.7", r"num_probes must be an integer, got 2.7"),
    ("--sensitivity.seed=abc", r"sensitivity: seed must be an integer in \[0, 2\*\*64\), got 'abc'"),
    ("--sensitivity.seed=1.5", r"seed must be an integer in \[0, 2\*\*64\), got 1.5"),
    ("--sensitivity.seed=-1", r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    ("--sensitivity.seed=18446744073709551616", r"got 18446744073709551616"),
    ("--sensitivity.fused_norms=maybe", r"fused_norms must be true or false, got 'maybe'"),
    ("--sensitivity.chunk_size=true", r"chunk_size must be an integer or null, got True"),
    ("--model.device=tpu", r"model.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("--data.shuffle_seed=-3", r"data.shuffle_seed must be >= 0"),
])
def test_config_values_are_type_checked(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        config("random:tiny-llama", tmp_path / "run", override)


def test_cuda_without_a_gpu_and_broken_weights_fail_before_writing(tiny_model, tmp_path, texts):
    import torch

    from raysens.core.models import ModelLoadError, load_model

    src = _corpus(tmp_path / "c.jsonl", texts[:3])
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match=r"model.device is 'cuda' but this machine has no GPUs"):
            run_local(_cfg(tiny_model, tmp_path / "r1", src, "--model.device=cuda"))
    lm = load_model(tiny_model)
    mdir = tmp_path / "model"
    lm.model.save_pretrained(mdir)
    lm.tokenizer.save_pretrained(mdir)
    w = mdir / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors' is truncated"):
        run_local(_cfg(str(mdir), tmp_path / "r2", src))
    w.unlink()
    with pytest.raises(ModelLoadError, match=r"has no safetensors weights"):
        run_local(_cfg(str(mdir), tmp_path / "r3", src))
    assert not any((tmp_path / d).exists() for d in ("r1", "r2", "r3"))


# ---------------------------------------------------------------------- 8. storage
def test_output_dir_that_is_a_file_or_unwritable_subdirs_fail_before_compute(tiny_model, tmp_path, texts):
    src = _corpus(tmp_path / "c.jsonl", texts[:3])
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(RunError, match=r"output.dir '.*afile' is a file, not a directory"):
        run_local(_cfg(tiny_model, f, src))
    for sub in ("partials", "stats"):  # a path that cannot be a directory (read-only dirs do not stop root)
        out = tmp_path / f"run-{sub}"
        out.mkdir()
        (out / sub).write_text("in the way")
        with pytest.raises(RunError, match=f"cannot write to '.*run-{sub}/{sub}'"):
            run_local(_cfg(tiny_model, out, src))
        assert not (out / "manifest.json").exists() and not (out / "lease.json").exists()
        assert not list(out.rglob("*.npz"))  # nothing computed
    assert f.read_text() == "mine"


# ---------------------------------------------------------------------- 10. Ctrl-C / SIGTERM in-process
def default_sigint():
    """In the child: SIGINT back to its default, so that Python installs KeyboardInterrupt even when
    the tests run in a background job of a non-interactive shell (``cmd &`` starts with SIGINT
    ignored, and a process that inherits SIG_IGN keeps it: Ctrl-C would never reach the run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, env=None, cwd=ROOT):
    return subprocess.Popen([sys.executable, "-m", "raysens.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def _wait_for_partials(out: Path, n: int, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(list((out / "partials").glob("unit_*.npz"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it was interrupted: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no partials appeared")


@pytest.mark.parametrize("sig, code, what", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "interrupted by SIGTERM")])
def test_interrupt_marks_the_manifest_says_how_to_resume_and_the_rerun_is_identical(
        tiny_model, tmp_path, texts, sig, code, what):
    src = _corpus(tmp_path / "c.jsonl", texts)
    out = tmp_path / "run"
    args = ["run", "jobs/configs/quickstart.yaml", f"--model.name={tiny_model}", f"--data.source={src}",
            "--data.max_seq_len=10", "--layers=[1,-1]", "--cluster.use_ray=false", "--cluster.batch_size=2",
            "--output.plots=false", "--data.limit=null", f"--output.dir={out}",
            "--cluster.ship_every_units=1",  # a partial per unit: the signal lands after two
            "--sensitivity.num_probes=1"]  # the reference's K (quickstart.yaml runs K=2)
    env = {**os.environ, faults.UNIT_DELAY: "1.0"}
    p = _cli(args, env)
    _wait_for_partials(out, 2, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("raysens run:")]
    assert p.returncode == code, err
    assert lines[0] == f"raysens run: error: {what}"
    assert lines[1].startswith("raysens run: ") and lines[1].endswith(
        f"units are saved in {out}; rerun the same command to resume")
    assert "Traceback" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["error"] == what and 2 <= m["units"]["done"] < 6
    assert not (out / "lease.json").exists()
    p = _cli(args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    ref = run_local(_cfg(tiny_model, tmp_path / "ref", src, "--cluster.batch_size=2"))
    assert_same_stats(raysens.load_run(out), ref.load())


def test_a_failure_after_the_manifest_marks_it_failed_with_the_reason(tiny_model, tmp_path, texts):
    """The corpus changes between planning and the workers' read: the run refuses to mix them."""
    from raysens.run.runner import Runner

    src = _corpus(tmp_path / "c.jsonl", texts[:6])
    cfg = _cfg(tiny_model, tmp_path / "run", src)
    runner = Runner(use_ray=False)
    runner.open("run", cfg, "now")
    _corpus(src, texts[6:12])
    with pytest.raises(CorpusError, match="changed since the run was planned") as ei:
        runner.run()
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and "changed since the run was planned" in m["error"]
    assert ei.value.resume_hint.endswith("rerun the same command to resume")
    assert not (tmp_path / "run" / "lease.json").exists()


# ---------------------------------------------------------------------- 12. messages
def test_misleading_messages_are_fixed(tmp_path, capsys):
    from raysens.cli import main
    from raysens.core.models import ModelLoadError, load_tokenizer_and_config

    assert main(["run", str(tmp_path)]) == 2
    assert f"config file '{tmp_path}' is a directory, not a YAML file" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match=r"model path './no/such/model' does not exist") as ei:
        load_tokenizer_and_config("./no/such/model")
    assert "hub" not in str(ei.value)


# ---------------------------------------------------------------------- 14. lease
def test_a_second_driver_is_refused_while_the_lease_is_live(tiny_model, tmp_path, texts):
    from raysens.store import lease

    src = _corpus(tmp_path / "c.jsonl", texts[:3])
    out = tmp_path / "run"
    out.mkdir()
    rec = {"owner": "alice", "host": "other-host", "pid": 4242, "token": "t", "acquired": time.time(),
           "heartbeat": time.time(), "stale_after_s": 60}
    (out / "lease.json").write_text(json.dumps(rec))
    with pytest.raises(RunError, match=r"in use by another raysens driver \(pid 4242 on host other-host, user alice, "
                                       r"last heartbeat [\d.]+s ago\)"):
        run_local(_cfg(tiny_model, out, src))
    assert sorted(os.listdir(out)) == ["lease.json"]
    (out / "lease.json").write_text(json.dumps({**rec, "heartbeat": time.time() - 61}))  # stale: taken over
    run_local(_cfg(tiny_model, out, src))
    assert not (out / "lease.json").exists()  # released at the end
    (out / "lease.json").write_text(json.dumps({**rec, "host": lease.socket.gethostname(), "pid": 2 ** 22 + 7}))
    run_local(_cfg(tiny_model, out, src))  # this host, a process that no longer exists: free


# ---------------------------------------------------------------------- 15. only partials are moved
def test_only_partial_files_are_ever_moved_aside(tiny_model, tmp_path, texts):
    src = _corpus(tmp_path / "c.jsonl", texts[:6])
    out = tmp_path / "run"
    run_local(_cfg(tiny_model, out, src, KEEP))
    user = tmp_path / "precious.npz"
    user.write_bytes(b"the user's own file")
    pdir = out / "partials"
    (pdir / "notes.txt").write_text("mine")
    (pdir / "unit_0000000099-0123456789abcdef.npz").symlink_to(user)
    (pdir / "real.npz").symlink_to(user)
    for p in sorted(pdir.glob("unit_*.npz"))[:1]:
        if not p.is_symlink():
            p.write_bytes(b"corrupt")  # a real corrupt partial is still set aside
    run_local(_cfg(tiny_model, out, src, KEEP))
    assert (pdir / "notes.txt").read_text() == "mine" and user.read_bytes() == b"the user's own file"
    assert (pdir / "unit_0000000099-0123456789abcdef.npz").is_symlink() and (pdir / "real.npz").is_symlink()
    moved = [p.name for p in (pdir / "corrupt").iterdir()]
    assert len(moved) == 1 and moved[0].startswith("unit_0000000000-")
