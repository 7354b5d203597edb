"""A planned run's plan (``sensitivity.target_rel_se`` / ``budget``; docs/DESIGN.md §1.11): made
once by a pilot and kept in the run directory (``plan.json``), so that a resume reuses it and never
re-plans. No Ray here: the pilot (``compute_pilot``: tokenize the pilot samples, load the model, run
both modes) runs where the caller says: in a Ray run one
task with a pool actor's resources (``raysens.backends.remote.on_worker``; the driver never loads
the model), in an in-process run this process. Same samples, same seeds: the same plan.

``attach_plan(job)`` gives the job's workers the plan (its config's ``sensitivity.layer_plan``; the
fingerprint stays the one of the config as written) and puts the plan into the job's manifest.
A sweep calls it once per point (every point is a job of the one runner): one pilot and one
``plan.json`` per point; ``plan_summary`` is the compact form ``sweep.json`` lists per point.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import time

import numpy as np

from .._log import log
from ..store import results
from ..store.rundir import RunError

PLAN_FILE = "plan.json"


def prepare_model_side(jobs: list, session: dict | None) -> None:
    """What needs the model before a pass, done where the weights are (issue 31): with a Ray session,
    one Ray task with a pool actor's resources computes each model's content identity and each
    planned job's pilot (``backends.remote.on_worker``: the driver reads no weight file and never
    runs the model); in process, here. Then each planned job gets its plan (``attach_plan``:
    plan.json, or the pilot). Called by the runner before it writes anything."""
    from ..core.models.identity import checked_identity, model_identity
    from .prepare import adopt_model_identity, check_device

    idents: dict[tuple, dict] = {}
    for job in jobs:
        m = job.config.model
        there = None
        if session is not None:
            from ..backends.remote import on_worker

            check_device(m.device, session["resources"].get("GPU", 0))  # before a task asks for the device
            there = functools.partial(on_worker, job.config.cluster, m.device)
        if "model" not in job.prepared.inputs:  # a Ray run's driver left it out (prepare.prepare)
            key = (m.name, m.trust_remote_code)
            if key not in idents:
                if there is not None:
                    idents[key] = there(checked_identity, m.name, trust_remote_code=m.trust_remote_code)
                else:  # no session (nothing to compute): the identity the results were made from
                    idents[key] = _recorded_model_identity(job.prepared.run_dir) or model_identity(
                        m.name, trust_remote_code=m.trust_remote_code)
            adopt_model_identity(job.prepared, job.rdir, idents[key])
        paired = job.prepared.paired
        if paired is not None and not paired["same_model"] and "model_b" not in job.prepared.inputs:
            from .paired import side_b_name  # side b of a paired run: its identity, where the weights are

            name_b, trust_b = side_b_name(job.config)
            key = (name_b, trust_b)
            if key not in idents:
                idents[key] = there(checked_identity, name_b, trust_remote_code=trust_b) if there is not None \
                    else (_recorded_model_identity(job.prepared.run_dir, "model_b")
                          or model_identity(name_b, trust_remote_code=trust_b))
            adopt_model_identity(job.prepared, job.rdir, idents[key], key="model_b")
        attach_plan(job, there)


def _recorded_model_identity(run_dir: str, key: str = "model") -> dict | None:
    """The model identity (``key``: ``model``, or side b's ``model_b``) in the run directory's manifest
    (None without one)."""
    try:
        m = results.read_manifest(run_dir)
    except (OSError, ValueError):
        return None
    inputs = m.get("inputs")
    return inputs.get(key) if isinstance(inputs, dict) and isinstance(inputs.get(key), dict) else None


def read_plan(run_dir: str) -> dict | None:
    """The run directory's ``plan.json`` (None when it has none)."""
    fs, base = results.resolve(run_dir)
    p = posixpath.join(base, PLAN_FILE)
    return json.loads(results.read_bytes(fs, p)) if results.exists(fs, p) else None


def write_plan(run_dir: str, plan: dict) -> None:
    fs, base = results.resolve(run_dir)
    results.write_bytes(fs, posixpath.join(base, PLAN_FILE), json.dumps(plan, indent=2).encode())


def attach_plan(job, remote=None) -> dict | None:
    """For a planned job (``job.config.sensitivity.planned``): read ``plan.json`` or, when there is
    none, run the pilot and write it; then set ``job.config``'s ``sensitivity.layer_plan`` (what the
    workers run) and ``job.manifest["plan"]``. Returns the plan (None for a job that is not planned).

    A plan file of another fingerprint is refused (the run directory already refuses such a run).
    ``remote``: ``remote(fn, *args)`` runs the pilot's model work elsewhere (a Ray task); None: here."""
    sens = job.config.sensitivity
    if not sens.planned:
        return None
    plan = read_plan(job.prepared.run_dir)
    if plan is not None:
        if plan.get("fingerprint") != job.prepared.fingerprint:
            raise RunError(f"{job.prepared.run_dir}/{PLAN_FILE} belongs to another configuration (fingerprint "
                           f"{plan.get('fingerprint')}, this config {job.prepared.fingerprint}); use another output.dir")
        log(f"{job.name}: reusing the plan in {PLAN_FILE} (no pilot)")
        job.plan_source = PLAN_FILE
    else:
        plan = make_layer_plan(job.config, job.prepared, remote)
        plan["fingerprint"] = job.prepared.fingerprint
        write_plan(job.prepared.run_dir, plan)
        job.plan_source = "pilot"
    log(f"{job.name}: plan {' '.join(plan['layer_plan'])} (predicted worst relative SE "
        f"{plan['worst_predicted']:.3g}, cost {plan['cost']['relative_to_auto_k1']:.2f}x mode auto K=1)")
    job.config = dataclasses.replace(job.config, sensitivity=dataclasses.replace(sens, layer_plan=tuple(plan["layer_plan"])))
    job.manifest["plan"] = plan
    return plan


def make_layer_plan(config, prepared, remote=None) -> dict:
    """Run the pilot (``compute_pilot``) in this process, or through ``remote(compute_pilot, ...)`` (a
    Ray task: the tokenizer and the model are loaded there, not here)."""
    t0 = time.perf_counter()
    log(f"planning: pilot of the first {config.sensitivity.pilot_samples} computable samples in both modes"
        + (" in a Ray task" if remote is not None else ""))
    args = (config, prepared.units, prepared.corpus, tuple(prepared.layers), prepared.n_selected)
    plan = compute_pilot(*args) if remote is None else remote(compute_pilot, *args)
    ids = plan["pilot"]["sample_ids"]
    log(f"planning: pilot of {len(ids)} samples (sample_ids {ids[0]}..{ids[-1]}) done")
    plan["pilot"]["wall_s"] = round(time.perf_counter() - t0, 3)
    plan["pilot"]["ran_in"] = "ray task" if remote is not None else "driver"
    return plan


def pilot_inputs(config, units, corpus) -> tuple[list[int], list[list[int]]]:
    """(sample_ids, token lists) of the first ``pilot_samples`` computable samples of the run's
    selection, in sample_id order, tokenized as the run tokenizes them (tokenizer only: no weights)."""
    from ..backends.units import get_tokenizer, tokenize_unit

    sens, d, m = config.sensitivity, config.data, config.model
    tok = get_tokenizer(m.name, m.trust_remote_code)
    ids, toks = [], []
    order = np.sort(np.concatenate([np.asarray(u, dtype=np.int64) for u in units])) if len(units) else []
    step = max(len(units[0]), 1) if len(units) else 1  # units grouped by length hold scattered ids: read in id order
    for s0 in range(0, len(order), step):
        chunk = order[s0:s0 + step]
        u = tokenize_unit(chunk, corpus.texts(chunk), tok, d.max_seq_len, d.min_tokens, d.add_special_tokens)
        for sid, t in zip(u["run_ids"], u["input_ids"]):
            if len(ids) < sens.pilot_samples:
                ids.append(int(sid)), toks.append(list(t))
        if len(ids) >= sens.pilot_samples:
            break
    if len(ids) < 2:
        raise RunError(f"sensitivity.target_rel_se/budget: the planner's pilot needs 2 computable samples, the run "
                       f"selects {len(ids)}")
    return ids, toks


def compute_pilot(config, units, corpus, layers: tuple[int, ...], n: int, device: str | None = None) -> dict:
    """Tokenize the pilot samples (``pilot_inputs``: the run's ``units`` of ``corpus``), load the model
    (on ``device``; None: ``model.device``, ``auto`` resolved where this runs) and run the pilot
    (``core.planning.pilot.run_pilot``); returns the plan (a small dict). The tokenizer and the model are
    loaded here, never on a Ray run's driver."""
    from ..core.engine import SensitivityEngine
    from ..core.models import load_model
    from ..core.planning.pilot import PilotSamples, run_pilot
    from ..core.models.synthetic import SyntheticEngine, is_synthetic

    ids, toks = pilot_inputs(config, units, corpus)
    m = config.model
    device = device or m.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_model(m.name, device=device, trust_remote_code=m.trust_remote_code)
    return run_pilot(lm.model, config.sensitivity, PilotSamples(toks, ids, config.data.max_seq_len), layers, n=n,
                     device=device, engine_cls=SyntheticEngine if is_synthetic(m.name) else SensitivityEngine)


def plan_summary(plan: dict, source: str | None = None) -> dict:
    """The compact form of a plan that ``sweep.json`` lists per point: ``layer_plan``, objective,
    feasibility, worst predicted relative SE, cost, and (``source``) whether this invocation ran the
    pilot (``pilot``) or reused the point's ``plan.json``."""
    out = {"layer_plan": list(plan.get("layer_plan") or []), "objective": plan.get("objective"),
           "feasible": plan.get("feasible"), "worst_predicted": plan.get("worst_predicted"),
           "relative_to_auto_k1": (plan.get("cost") or {}).get("relative_to_auto_k1")}
    if source is not None:
        out["this_run"] = source
    return out
