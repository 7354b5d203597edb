"""What is decided before any work starts: the prepared run (``PreparedRun``: the validated config, its
units, its layers, its inputs) and its manifest. (A "layer plan" is something else: ``run.planning``.)

``prepare(config)`` reads the corpus's row count and the model's config (not its weights), resolves
the target layers and cuts the selected sample_ids into work units; it writes nothing. No Ray.
The model's content identity (``core.weights.model_identity``) is computed here for an in-process
run; a Ray run's driver reads no weight file: ``prepare(config, model_identity=False)`` leaves it
out and the runner adopts the one a Ray task computed next to the weights (``adopt_model_identity``).
"""

from __future__ import annotations

import functools
import os
import platform
import posixpath
import re
from dataclasses import dataclass

import numpy as np

from .._log import log
from ..config import RunConfig
from ..errors import detail_of
from ..corpus.reader import Corpus
from ..store.partials import STATE_FORMAT
from ..store.rundir import RunDir, RunError, RunIdentity
from .layout import unit_layout


@dataclass
class PreparedRun:
    """Everything decided before any work starts (validated; nothing written yet)."""

    config: RunConfig
    fingerprint: str
    run_dir: str
    corpus: Corpus
    n_rows: int
    units: list[np.ndarray]  # every unit of the run (ascending sample_ids), in the order of their first sample_ids
    layers: tuple[int, ...]  # absolute hidden_states indices
    model_config: dict  # model_type, num_hidden_layers, hidden_size (from the config only)
    inputs: dict | None = None  # content identity of corpus and weights (manifest "inputs"; checked on resume)
    paired: dict | None = None  # a paired run's checked side b (run/paired.py: check_paired); None: an ordinary run
    unit_lengths: dict | None = None  # unit key -> its longest text (characters) when units are grouped by length (dispatch order); None: consecutive units

    @property
    def n_selected(self) -> int:
        return int(sum(len(u) for u in self.units))

    @functools.cached_property
    def by_key(self) -> dict[int, np.ndarray]:
        """unit key (first sample_id) -> the unit's sample_ids"""
        return {int(u[0]): u for u in self.units}


def default_run_dir(config: RunConfig) -> str:
    name = config.model.name.rstrip("/").replace("\\", "/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name[:-5] if name.endswith(".gguf") else name)
    return posixpath.join("runs", f"{name}-{config.fingerprint()}")


def _run_dir(config: RunConfig) -> str:
    """output.dir as given for URIs; local paths made absolute (and a warning inside a Ray job,
    where a relative path lands in the job's temporary copy of the working directory)."""
    d = config.output.dir or default_run_dir(config)
    if "://" in d:
        return d
    if not os.path.isabs(os.path.expanduser(d)) and "job_submission_id" in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
        log(f"warning: output.dir {d!r} is relative; inside a Ray job it resolves to {os.path.abspath(d)} on the node "
            "running the driver (a temporary copy of the working dir). Pass --output.dir=s3://... (or a shared path) "
            "to read the results from elsewhere.")
    return os.path.abspath(os.path.expanduser(d))


def check_device(device: str, gpus: float | None = None) -> None:
    """``model.device`` is usable: ``cuda`` needs a GPU here (``gpus`` None: this process) or on the
    Ray cluster (``gpus``: its GPU count). Raises ``RunError``."""
    if not device.startswith("cuda"):
        return
    if gpus is None:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        where = "this machine"
    else:
        have, where = int(gpus), "the Ray cluster"
    index = int(device.split(":")[1]) if ":" in device else 0
    if have <= index:
        raise RunError(f"model.device is {device!r} but {where} has {have or 'no'} GPU{'s' if have != 1 else ''}; "
                       "use model.device: auto or cpu")


def check_precision(config: RunConfig) -> None:
    """``sensitivity.precision: tf32`` needs the model on a GPU (decided by the config, as ``on_gpu``, or
    for an in-process ``auto`` device by this machine). Raises ``RunError`` before anything is written."""
    if config.sensitivity.precision.value != "tf32" or config.on_gpu:
        return
    if not config.cluster.use_ray and config.model.device == "auto":
        import torch

        if torch.cuda.is_available():
            return
    raise RunError("sensitivity.precision is 'tf32' (a CUDA tensor-core format) but this run's model is on the "
                   "CPU; use precision fp32 or bf16, or put the model on a GPU (model.device: cuda, or "
                   "cluster.gpus_per_actor > 0 with Ray)")


def prepare(config: RunConfig, model_identity: bool = True) -> PreparedRun:
    """Validate the corpus (every record), the model (its config; its weights and their identity
    unless ``model_identity`` is False: a Ray driver, which reads no weight file), the device and the
    layers, and plan the units. Writes nothing."""
    from ..core.models.structure import resolve_layer_indices
    from ..core.models.model_config import model_shape
    from ..core.models import load_tokenizer_and_config
    from ..core.models.identity import model_identity as identity

    corpus = Corpus(config.data)
    n_rows = corpus.num_rows()
    selected = corpus.select(n_rows)
    if not config.cluster.use_ray:
        check_device(config.model.device)
    check_precision(config)
    m = config.model
    if model_identity:  # in process: tokenizer, config and weights checked here
        _, mcfg = load_tokenizer_and_config(m.name, trust_remote_code=m.trust_remote_code)
        shape = {"model_type": getattr(mcfg, "model_type", None), "num_hidden_layers": int(mcfg.num_hidden_layers),
                 "hidden_size": int(getattr(mcfg, "hidden_size", 0) or 0)}
    else:  # a Ray driver: config.json only (no transformers, no torch); the rest in a Ray task (runner)
        shape = model_shape(m.name, trust_remote_code=m.trust_remote_code)
    inputs = {"corpus": corpus.identity()}
    if model_identity:
        inputs["model"] = identity(m.name, trust_remote_code=m.trust_remote_code)
    n_layers = shape["num_hidden_layers"]
    try:
        layers = resolve_layer_indices(list(config.layers), n_layers)
    except ValueError as exc:
        raise RunError(f"layers: {detail_of(exc)}") from None
    paired = None
    if config.paired is not None:  # tokenizers and configs only (run/paired.py)
        from .paired import check_paired, side_b_name

        paired = check_paired(config, corpus, selected, shape, layers, in_process=model_identity)
        if model_identity and not paired["same_model"]:
            name_b, trust_b = side_b_name(config)
            inputs["model_b"] = identity(name_b, trust_remote_code=trust_b)
    units, longest = unit_layout(config, corpus, selected)
    return PreparedRun(config, config.fingerprint(), _run_dir(config), corpus, n_rows, units, layers, shape, inputs,
                       paired, unit_lengths=longest)


def adopt_model_identity(prepared: PreparedRun, rdir: RunDir, identity: dict, key: str = "model") -> None:
    """Record the model identity computed elsewhere (a Ray task, next to the weights) in the prepared run's
    ``inputs`` (the manifest's ``inputs`` and the run directory's are the same dict), after checking
    it against the run directory's manifest, as ``RunDir.open`` checks the corpus. Raises ``RunError``
    (nothing is written) when the directory was computed from other weights. ``key``: ``model``, or
    ``model_b`` (side b of a paired run)."""
    from ..store import results
    from ..store.rundir import diff_inputs

    try:
        old = results.read_manifest(prepared.run_dir)
    except (OSError, ValueError):
        old = None
    before = (old or {}).get("inputs") if isinstance(old, dict) else None
    if isinstance(before, dict) and before.get(key):
        changed = diff_inputs({"model": before[key]}, {"model": identity})
        if changed:
            raise RunError(f"output directory {prepared.run_dir!r} was computed from other inputs: {'; '.join(changed)}. "
                           "Resuming would mix two datasets; restore the inputs or use another output.dir "
                           "(nothing was changed)")
    prepared.inputs[key] = identity
    rdir.inputs = prepared.inputs


def open_run_dir(prepared: PreparedRun) -> RunDir:
    """The prepared run's directory, opened: refuses a directory of another config, sets corrupt
    partials aside and collects the valid ones (``RunDir.open``)."""
    cfg = prepared.config
    check_layout(prepared)
    rdir = RunDir(prepared.run_dir, prepared.units,
                  RunIdentity(prepared.fingerprint, prepared.layers, cfg.data.max_seq_len, inputs=prepared.inputs),
                  cfg.output.resume, per_sample=cfg.output.per_sample)
    rdir.open()
    return rdir


def check_layout(prepared: PreparedRun) -> None:
    """Refuse, in one line naming why, a run directory written with units of consecutive sample_ids
    (raysens before units were grouped by length) when this config groups them: its partials hold
    other samples per unit. ``cluster.group_by_length: false`` resumes it (nothing is recomputed)."""
    cfg = prepared.config
    if not cfg.cluster.group_by_length:
        return
    from ..store import results

    try:
        old = results.read_manifest(prepared.run_dir)
    except (OSError, ValueError):
        return
    fp = old.get("fingerprint") if isinstance(old, dict) else None
    if fp is not None and fp != prepared.fingerprint and fp == cfg.legacy_fingerprint():
        raise RunError(f"output directory {prepared.run_dir!r} was written with units of consecutive sample_ids "
                       "(before raysens grouped units by length), so its partials hold other units; resume it with "
                       "--cluster.group_by_length=false, or use another output.dir (nothing was changed)")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("raysens", "torch", "transformers", "ray", "numpy", "pyarrow", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def base_manifest(prepared: PreparedRun, status: str, started: str) -> dict:
    cfg = prepared.config
    sens = cfg.sensitivity.to_dict()
    return {
        "format": "raysens-run/1", "state_format": STATE_FORMAT, "status": status, "fingerprint": prepared.fingerprint,
        "config": cfg.to_dict(), "versions": versions(),
        "model": {"name": cfg.model.name, **prepared.model_config},
        "estimator": sens["estimator"], "num_probes": sens["num_probes"], "seed": sens["seed"],
        "precision": sens["precision"],
        "layers": list(prepared.layers), "max_seq_len": cfg.data.max_seq_len,
        "corpus": {**prepared.corpus.describe(), "rows": prepared.n_rows},
        "inputs": prepared.inputs,
        "samples": {"corpus_rows": prepared.n_rows, "total": prepared.n_selected},
        "units": {"total": len(prepared.units), "batch_size": cfg.batch_size,
                  **({} if isinstance(cfg.cluster.batch_size, int) else
                     {"batch_size_rule": f"auto: {'GPU' if cfg.on_gpu else 'CPU'} default"})},
        "timings": {"started": started},
        **({"paired": _paired_key(prepared)} if prepared.paired is not None else {}),
    }


def _paired_key(prepared: PreparedRun) -> dict:
    from .paired import manifest_key

    return manifest_key(prepared.config, prepared)
