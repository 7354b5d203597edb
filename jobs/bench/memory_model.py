"""Peak host memory of engine units sized by the memory model (issue 31, ``raysens.core.memory.sizing``).

Each measurement is a fresh child process (``jobs.harness.run_child``; its ``ru_maxrss`` is that run's
alone): a 28-block tiny Llama (hidden 16) whose engine runs the real unit bookkeeping — host sums
(``UnitSums``), probes drawn for every position, the in-place mean/variance, masks, the NaN check and, with ``--fold``, the
fold of the result into one ``CellStats`` per layer in ``samples_per_fold`` slices — while the
tangent passes themselves are replaced by one in-place addition per pass over the sums (a real
forward-mode pass at S=2048 over 28 layers takes hours on 2 CPU cores; its working memory is the
chunks', bounded by the budget separately). The unit size is ``plan_unit``'s for the budget.

    python -m jobs.bench.memory_model --seq 2048 --layers 28 --budget-gib 4            # no state
    python -m jobs.bench.memory_model --seq 512 --layers 28 --budget-gib 4 --fold      # with the state
    ... --baseline-tree /work/wt/mem-base --batch 2     # the same stub on another checkout, fixed batch
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.harness import REPO, log, maxrss_mib, run_child


def child(spec: dict) -> dict:
    import numpy as np
    import torch
    import transformers as tf

    from raysens.core import engine as engmod
    from raysens.core.engine import SensitivityConfig, SensitivityEngine
    from jobs.bench.common import core_module

    draw_forward_probes = core_module("passes.probes", "probes").draw_forward_probes

    torch.set_num_threads(1)
    seq, layers = spec["seq"], spec["layers"]
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=seq,
                         attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()

    def stub_run(self, batch, sids, lengths):  # batch: cotangents.PassData
        c = self.config
        for sid, n in zip(np.asarray(sids).tolist(), np.asarray(lengths).tolist()):  # the real probe draw
            draw_forward_probes(c.probe_distribution, c.seed, sid, n, c.num_probes, self.d_model)
        for L, t in batch.total.items():  # every page of the pass's sums written, as the accumulation does
            t.add_(1.0 + L)
        for L, t in (batch.sumsq or {}).items():
            t.add_(2.0 + L)

    engmod.SensitivityEngine._run_forward = stub_run
    eng = SensitivityEngine(model, SensitivityConfig(mode="forward", num_probes=spec["k"]))
    batch, fold, plan = spec.get("batch"), 0, None
    if batch is None:
        from jobs.bench.common import core_module

        sizing = core_module("memory.sizing", "sizing")
        ModelShape, plan_unit = sizing.ModelShape, sizing.plan_unit

        work = dict(seq=seq, target_layers=layers, k=spec["k"], mode="forward",
                    state_cell_bytes=None if spec["fold"] else 0)
        budget = int(spec["budget_gib"] * (1 << 30))
        if hasattr(sizing, "Workload"):  # issue 28's signature; a baseline tree before it takes loose keywords
            plan = plan_unit(ModelShape.from_model(model), sizing.Workload(**work), budget=budget)
        else:
            plan = plan_unit(ModelShape.from_model(model), budget=budget, **work)
        batch, fold = plan.samples_per_unit, plan.samples_per_fold
    ids = torch.randint(3, 100, (batch, seq))
    before = int(maxrss_mib() * 2**20)
    r = eng.compute(ids, layers=list(range(1, layers + 1)), sample_ids=list(range(batch)))
    if spec["fold"]:
        from raysens.stats.cells import CellStats

        states = {L: CellStats.empty(seq) for L in r.layers}
        for L in r.layers:
            for f0 in range(0, batch, max(1, fold)):
                f1 = min(batch, f0 + max(1, fold))
                states[L].update(r.values[L][f0:f1], r.mask[f0:f1], None if r.noise is None else r.noise[L][f0:f1],
                                 r.sample_ids[f0:f1])
    peak = int(maxrss_mib() * 2**20)
    out = {"seq": seq, "layers": layers, "k": spec["k"], "batch": batch, "fold": fold, "peak_rss": peak,
           "rss_before_compute": before, "budget": int(spec["budget_gib"] * (1 << 30))}
    if plan is not None:
        out["plan"] = {k: (v if not isinstance(v, float) else round(v, 3)) for k, v in plan.__dict__.items()}
    return out


def run(tree: Path, spec: dict) -> dict:
    """One measurement in a child process whose raysens comes from ``tree``."""
    return run_child("jobs.bench.memory_model:child", spec, tree=tree)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.memory_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--fold", action="store_true", help="fold into a CellStats state per layer (the state counts)")
    ap.add_argument("--batch", type=int, default=None, help="fixed unit size instead of the plan's")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="also run this checkout (same stub, same batch)")
    a = ap.parse_args(argv)
    spec = {"seq": a.seq, "layers": a.layers, "k": a.k, "budget_gib": a.budget_gib, "fold": a.fold, "batch": a.batch}
    res = run(REPO, spec)
    log(json.dumps({"tree": str(REPO), **res}))
    if a.baseline_tree:
        base = run(a.baseline_tree, {**spec, "batch": res["batch"], "fold": False})
        log(json.dumps({"tree": str(a.baseline_tree), **base}))
        log(f"peak RSS new / baseline at batch {res['batch']}: {res['peak_rss'] / base['peak_rss']:.2f}")


if __name__ == "__main__":
    main()
