"""A planned run's plan (``sensitivity.target_rel_se`` / ``budget``; docs/DESIGN.md §1.11): made
once by a pilot in this process and kept in the run directory (``plan.json``), so that a resume
reuses it and never re-plans. No Ray.

``attach_plan(job)`` gives the job's workers the plan (its config's ``sensitivity.layer_plan``; the
fingerprint stays the one of the config as written) and puts the plan into the job's manifest.
A sweep calls it once per point (every point is a job of the one runner): one pilot and one
``plan.json`` per point; ``plan_summary`` is the compact form ``sweep.json`` lists per point.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time

from .._log import log
from ..store import results
from ..store.rundir import RunError

PLAN_FILE = "plan.json"


def read_plan(run_dir: str) -> dict | None:
    """The run directory's ``plan.json`` (None when it has none)."""
    fs, base = results.resolve(run_dir)
    p = posixpath.join(base, PLAN_FILE)
    return json.loads(results.read_bytes(fs, p)) if results.exists(fs, p) else None


def write_plan(run_dir: str, plan: dict) -> None:
    fs, base = results.resolve(run_dir)
    results.write_bytes(fs, posixpath.join(base, PLAN_FILE), json.dumps(plan, indent=2).encode())


def attach_plan(job) -> dict | None:
    """For a planned job (``job.config.sensitivity.planned``): read ``plan.json`` or, when there is
    none, run the pilot and write it; then set ``job.config``'s ``sensitivity.layer_plan`` (what the
    workers run) and ``job.manifest["plan"]``. Returns the plan (None for a job that is not planned).

    A plan file of another fingerprint is refused (the run directory already refuses such a run)."""
    sens = job.config.sensitivity
    if not sens.planned:
        return None
    plan = read_plan(job.plan.run_dir)
    if plan is not None:
        if plan.get("fingerprint") != job.plan.fingerprint:
            raise RunError(f"{job.plan.run_dir}/{PLAN_FILE} belongs to another configuration (fingerprint "
                           f"{plan.get('fingerprint')}, this config {job.plan.fingerprint}); use another output.dir")
        log(f"{job.name}: reusing the plan in {PLAN_FILE} (no pilot)")
        job.plan_source = PLAN_FILE
    else:
        plan = make_run_plan(job.config, job.plan)
        plan["fingerprint"] = job.plan.fingerprint
        write_plan(job.plan.run_dir, plan)
        job.plan_source = "pilot"
    log(f"{job.name}: plan {' '.join(plan['layer_plan'])} (predicted worst relative SE "
        f"{plan['worst_predicted']:.3g}, cost {plan['cost']['relative_to_auto_k1']:.2f}x mode auto K=1)")
    job.config = dataclasses.replace(job.config, sensitivity=dataclasses.replace(sens, layer_plan=tuple(plan["layer_plan"])))
    job.manifest["plan"] = plan
    return plan


def make_run_plan(config, run_plan) -> dict:
    """Tokenize the first ``pilot_samples`` computable samples of the run's selection (in sample_id
    order, as the run tokenizes them), load the model here and run the pilot (``core.pilot.run_pilot``)."""
    from ..backends.units import get_tokenizer, tokenize_unit
    from ..core.engine import SensitivityEngine
    from ..core.models import load_model
    from ..core.pilot import run_pilot
    from ..core.synthetic import SyntheticEngine, is_synthetic

    t0 = time.perf_counter()
    sens, d, m = config.sensitivity, config.data, config.model
    tok = get_tokenizer(m.name, m.trust_remote_code)
    ids, toks = [], []
    for unit in run_plan.units:
        u = tokenize_unit(unit, run_plan.corpus.texts(unit), tok, d.max_seq_len, d.min_tokens, d.add_special_tokens)
        for sid, t in zip(u["run_ids"], u["input_ids"]):
            if len(ids) < sens.pilot_samples:
                ids.append(int(sid)), toks.append(list(t))
        if len(ids) >= sens.pilot_samples:
            break
    if len(ids) < 2:
        raise RunError(f"sensitivity.target_rel_se/budget: the planner's pilot needs 2 computable samples, the run "
                       f"selects {len(ids)}")
    device = m.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"planning: pilot of {len(ids)} samples (sample_ids {ids[0]}..{ids[-1]}) in both modes")
    lm = load_model(m.name, device=device, trust_remote_code=m.trust_remote_code)
    plan = run_pilot(lm.model, sens, toks, ids, run_plan.layers, n=run_plan.n_selected, max_seq_len=d.max_seq_len,
                     device=device, engine_cls=SyntheticEngine if is_synthetic(m.name) else SensitivityEngine)
    plan["pilot"]["wall_s"] = round(time.perf_counter() - t0, 3)
    return plan


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
