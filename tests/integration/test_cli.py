"""`raysens run` / `python jobs/run.py` / `python jobs/quickstart.py` as a user types them:
exit codes, messages, the printed result locations, and the report subcommands' dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model.name=random:tiny-llama", "--data.max_seq_len=8", "--layers=[1,-1]", "--cluster.use_ray=false"]


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_raysens_run_in_process_and_show(tmp_path):
    out = tmp_path / "run"
    p = _run("-m", "raysens.cli", "run", "jobs/configs/quickstart.yaml", *TINY, "--data.limit=6",
             f"--output.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"results: {out}" in p.stdout and f"{out}/stats/layer_002.npz" in p.stdout
    assert "heatmap:" in p.stdout and (out / "plots" / "layer_002_heatmap.png").exists()
    assert "6/6 samples (100%)" in p.stderr
    from raysens.cli import main

    assert main(["show", str(out)]) == 0  # dispatched to raysens.report


def test_job_entrypoints_take_the_same_arguments(tmp_path):
    out = tmp_path / "run"
    p = _run("jobs/run.py", "jobs/configs/quickstart.yaml", *TINY, "--data.limit=3", f"--output.dir={out}",
             "--output.plots=false")
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run("jobs/quickstart.py", *TINY, "--data.limit=3", f"--output.dir={out}", "--output.plots=false")
    assert p.returncode == 0 and "already done" in p.stderr  # same config: resumed, nothing recomputed


def test_errors_have_exit_codes_and_name_the_problem(tmp_path, capsys):
    from raysens.cli import main  # the console script is sys.exit(main())

    def err(*args):
        code = main(["run", "jobs/configs/quickstart.yaml", *map(str, args)])
        return code, capsys.readouterr().err

    code, e = err("--data.lmit=3")
    assert code == 2 and "data.lmit" in e and "limit" in e
    code, e = err("--data.max_seq_len=0")
    assert code == 2 and "max_seq_len must be >= 1" in e
    code, e = err(*TINY, f"--data.source={tmp_path}/missing.jsonl", f"--output.dir={tmp_path}/r")
    assert code == 1 and "does not exist" in e
    code, e = err(*TINY, "--layers=[12]", f"--output.dir={tmp_path}/r")
    assert code == 1 and "layer 12 out of range" in e
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2 and "does not exist" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_output_to_a_uri(tmp_path):
    """output.dir as a pyarrow.fs URI (file:// here; s3:// and gs:// go through the same code)."""
    import raysens
    from raysens.config import load_config
    from raysens.run.runner import run_local

    uri = f"file://{tmp_path}/uri-run"
    s = run_local(load_config(None, [*TINY, "--data.limit=4", f"--output.dir={uri}", "--output.plots=false"]))
    assert s.run_dir == uri and (tmp_path / "uri-run" / "manifest.json").exists()
    assert raysens.load_run(uri)[2].count == 4
