"""End to end: a real local Ray head (`ray start --head` on loopback, token authentication on), the
quick-start job submitted with `ray job submit --working-dir .`, its results read back; and the
quick start itself on the embedded local Ray with the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from cluster_util import BIN, ROOT, LocalCluster, clean_env

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_head(tiny_model_e2e):
    """A head node on loopback with token auth; yields (dashboard URL, token file, tmp dir)."""
    c = LocalCluster()
    try:
        c.start_head(num_cpus=4)
        yield c.url, c.token, c.tmp
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tiny_model_e2e():
    return "random:tiny-llama"  # seeded random weights, built identically in every process


def test_token_auth_is_on(ray_head):
    url, token, _ = ray_head
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert e.value.code == 401
    p = subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], capture_output=True, text=True,
                       env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), timeout=60)
    assert p.returncode != 0 and "Authentication failed" in p.stdout + p.stderr


def test_ray_job_submit_quickstart(ray_head, tiny_model_e2e):
    url, token, tmp = ray_head
    results = tmp / "results"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
           "python", "jobs/quickstart.py", f"--model.name={tiny_model_e2e}", "--data.limit=12",
           "--data.max_seq_len=8", "--layers=[1,-1]", f"--output.dir={results}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=480,
                       env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token)))
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "succeeded" in out, out[-4000:]
    assert f"results: {results}" in out and "heatmap:" in out

    import raysens

    run = raysens.load_run(str(results))
    m = run.manifest
    assert m["status"] == "complete" and m["samples"]["computed"] == 12
    assert m["backend"]["backend"] == "ray" and m["backend"]["address"] != "embedded local Ray"
    assert sorted(run.layers) == [1, 2] and run[2].count == 12 and run[2].mean.shape == (8, 8)
    assert any(name.endswith("heatmap.png") for name in os.listdir(results / "plots"))

    from raysens.run.runner import run_local
    from raysens.config import load_config

    ref = run_local(load_config(ROOT / "jobs" / "configs" / "quickstart.yaml", [
        f"--model.name={tiny_model_e2e}", "--data.limit=12", "--data.max_seq_len=8", "--layers=[1,-1]",
        f"--output.dir={tmp / 'ref'}", "--output.plots=false"]))
    assert ref.manifest["fingerprint"] == m["fingerprint"]
    for L in (1, 2):
        import numpy as np

        np.testing.assert_allclose(run[L].mean, ref.load()[L].mean, rtol=1e-12, equal_nan=True)


@pytest.mark.slow
def test_quickstart_with_smollm2_on_embedded_ray(tmp_path):
    """The README's first command, shortened: real SmolLM2-135M, bundled corpus, S=32."""
    out = tmp_path / "qs"
    p = subprocess.run([sys.executable, "jobs/quickstart.py", "--data.limit=4", "--cluster.batch_size=2",
                        f"--output.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900, env=clean_env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert f"results: {out}" in p.stdout and "heatmap:" in p.stdout
    m = json.load(open(out / "manifest.json"))
    assert m["model"]["model_type"] == "llama" and m["model"]["num_hidden_layers"] == 30
    assert m["samples"]["computed"] == 4 and m["seq_len"] == 32 and m["layers"] == list(range(1, 31))
    assert m["backend"]["modes"] == ["forward"]  # auto: all layers from one tangent pass
    assert m["backend"]["address"] == "embedded local Ray"
