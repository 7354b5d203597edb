"""Fused reverse pass against eager and against the older tool's loop (issue 30, reverse target).

    python -m jobs.bench.reverse_fusion                                 # SmolLM2 + MiniLM, S=32, last layer
    python -m jobs.bench.reverse_fusion --models minilm --rounds 3 --samples 8 --seed-samples 2 --json out.json
    python -m jobs.bench.reverse_fusion --kernels                       # each fused kernel on one block's shapes

One process per model in turn (the inductor cache a fresh temporary directory per run: cold compiles).
In it: an engine with ``fusion: eager`` and one with ``fusion: compile`` (``mode: reverse``,
Hutchinson K=1: S VJPs per sample, as the older loop's S VJPs; strategy auto = ``manual``), the
older tool's loop (``jobs.bench.common.seed_loop`` on its bf16 model copy). The fused engine's
construction time minus the eager one's is the trial compile; each engine warms up once
on the timed batches (the fused warm-up minus the eager one: compiles for the real shapes). Then ``--rounds`` rounds
alternate seed loop (``--seed-samples``), eager and fused (``--samples`` each, in batches of
``--batch``), each after ``quiet_wait``, with the other processes' load recorded. Printed per
variant: median and range of s/sample; the ratios seed/eager, seed/fused (the issue's target) and
eager/fused; the fused vs eager map distance; compile time and break-even samples (compile s /
saving per sample). No Ray.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from jobs.bench.common import Contention, make_inputs, quiet_wait, rel_fro, seed_loop, seed_model_copy
from jobs.harness import log, write_json

DEFAULT_BATCH = {"smollm2": 16, "minilm": 8}  # the batches of jobs/bench/cpu.py


def bench_model(name: str, args) -> dict:
    from raysens.core.engine import SensitivityConfig, SensitivityEngine
    from raysens.core.models import load_model

    lm = load_model(name)
    model = lm.model
    cfg = dict(estimator="hutchinson", num_probes=1, mode="reverse")
    t0 = time.perf_counter()
    eager = SensitivityEngine(model, SensitivityConfig(**cfg))
    t1 = time.perf_counter()
    fused = SensitivityEngine(model, SensitivityConfig(fusion="compile", **cfg))
    t2 = time.perf_counter()
    assert fused.reverse_fusion_used == "compile" and eager.reverse_fusion_used == "eager"
    trial_s = (t2 - t1) - (t1 - t0)
    seed_m = seed_model_copy(model)
    n, batch = args.samples, args.batch or DEFAULT_BATCH[name]
    ids, am = make_inputs(lm.tokenizer, n, args.seq_len)
    sids, sam = make_inputs(lm.tokenizer, args.seed_samples, args.seq_len, offset=31)

    def run_engine(eng, x, m):
        maps = []
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            r = eng.compute(x[s:s + batch], m[s:s + batch], layers=-1, sample_ids=list(range(s, min(len(x), s + batch))))
            maps.append(next(iter(r.values.values())))
        return (time.perf_counter() - t) / len(x), np.concatenate(maps)

    def run_seed():
        tm = {}
        seed_loop(seed_m, sids, sam, -1, timings=tm)
        return tm["loop_s"] / len(sids) + tm["convert_s"] / 32  # as jobs/bench/cpu.py charges the conversion

    t = time.perf_counter()
    run_engine(eager, ids, am)  # warm-up on the timed batches themselves (the fused one: every shape key compiles)
    warm_eager = time.perf_counter() - t
    t = time.perf_counter()
    run_engine(fused, ids, am)
    warm_fused = time.perf_counter() - t
    graphs = {k: getattr(fused._manual.bkern, k).graphs() for k in ("rms_add", "rms", "ln_add", "ln", "softmax", "sqnorm")}
    run_seed()  # warm-up
    times = {"seed": [], "eager": [], "fused": []}
    load = {k: [] for k in times}
    maps = {}
    for r in range(args.rounds):
        for tag in ("seed", "eager", "fused"):
            quiet_wait(args.max_wait)
            with Contention() as c:
                if tag == "seed":
                    ps = run_seed()
                else:
                    ps, maps[tag] = run_engine(eager if tag == "eager" else fused, ids, am)
            times[tag].append(ps)
            load[tag].append(c.value)
            log(f"   {name} round {r + 1}: {tag:5s} {ps:.3f} s/sample (other processes {c.value:.2f} cores)")
    med = {k: statistics.median(v) for k, v in times.items()}
    compile_s = trial_s + max(0.0, warm_fused - warm_eager)
    saving = med["eager"] - med["fused"]
    res = {"model": name, "seq_len": args.seq_len, "samples": n, "batch": batch, "seed_samples": args.seed_samples,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "s_per_sample": times, "median": med,
           "other_cores": load, "seed_over_eager": med["seed"] / med["eager"], "seed_over_fused": med["seed"] / med["fused"],
           "eager_over_fused": med["eager"] / med["fused"],
           "per_round_eager_over_fused": [e / f for e, f in zip(times["eager"], times["fused"])],
           "fused_vs_eager_map_rel": rel_fro(maps["fused"], maps["eager"]),
           "compiled_keys": graphs, "trial_compile_s": trial_s, "warmup_extra_s": warm_fused - warm_eager, "compile_s": compile_s,
           "break_even_samples": compile_s / saving if saving > 0 else None}
    log(f"== {name}: median s/sample seed {med['seed']:.3f}  eager {med['eager']:.3f}  fused {med['fused']:.3f}; "
        f"seed/eager {res['seed_over_eager']:.2f}x  seed/fused {res['seed_over_fused']:.2f}x  "
        f"eager/fused {res['eager_over_fused']:.3f}x (per round {[round(x, 3) for x in res['per_round_eager_over_fused']]}); "
        f"maps fused vs eager {res['fused_vs_eager_map_rel']:.1e}; compile {compile_s:.1f} s "
        f"(trial {trial_s:.1f} + shapes {warm_fused - warm_eager:.1f}), break-even {res['break_even_samples']}")
    return res


def bench_kernels(args) -> list[dict]:
    """Each fused kernel against the eager ops it replaces, on the shapes of one SmolLM2 / MiniLM
    block backward (``[chunk, batch, b, d_model]`` cotangents), ``args.calls`` alternating calls each."""
    from raysens.core.passes import backward_fusion as bf
    from raysens.core.stacks.formulas import ln_backward
    from raysens.core.stacks.llama import _norm_backward

    kern = bf.pick_backward_kernels("compile", torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    out = []
    # (model, chunk, batch, b, S, d_model, kv_heads, group): SmolLM2's 2-row suffix segments at a
    # mid prefix; MiniLM's one 32-position segment
    for name, c, bsz, b, seq, d, kvh, grp in (("smollm2", 2, 16, 16, 32, 576, 3, 3), ("minilm", 8, 8, 32, 32, 384, 12, 1)):
        g, gn = torch.randn(c, bsz, b, d, generator=gen), torch.randn(c, bsz, b, d, generator=gen)
        xn, r, w = torch.randn(bsz, seq, d, generator=gen), torch.rand(bsz, seq, 1, generator=gen) + 0.5, torch.randn(d)
        gp, p = torch.randn(bsz, kvh, grp, b, c, b, generator=gen), torch.rand(bsz, kvh, grp, b, b, generator=gen)
        norm = _norm_backward if name == "smollm2" else ln_backward
        fused_norm = kern.rms_add if name == "smollm2" else kern.ln_add
        pairs = {
            "norm backward + residual": (lambda: g.clone().add_(norm(gn.clone(), xn[:, :b], r[:, :b], w)),
                                         lambda: fused_norm(g, gn, xn, r[..., 0], w)),
            "softmax backward": (lambda: gp.clone().sub_((gp * p.unsqueeze(-2)).sum(-1, keepdim=True))
                                 .mul_(p.unsqueeze(-2) * 0.125), lambda: kern.softmax(gp, p, 0.125, torch.float32)),
            "squared norms": (lambda: g.float().pow(2).sum(-1).double().transpose(0, 1), lambda: kern.sqnorm(g)),
        }
        with torch.no_grad():
            for kname, (fe, ff) in pairs.items():
                fe(), ff()  # warm-up (the fused one compiles its key)
                te, tf = [], []
                for _ in range(args.calls):
                    for f, ts in ((fe, te), (ff, tf)):
                        t = time.perf_counter()
                        f()
                        ts.append(time.perf_counter() - t)
                # eager timings include the clone that keeps the inputs (one extra pass): timed alone too
                tc = []
                for _ in range(args.calls):
                    t = time.perf_counter()
                    g.clone(), gn.clone()
                    tc.append(time.perf_counter() - t)
                row = {"model": name, "kernel": kname, "shape": [c, bsz, b, d], "eager_ms": 1e3 * statistics.median(te),
                       "fused_ms": 1e3 * statistics.median(tf), "clones_ms": 1e3 * statistics.median(tc)}
                out.append(row)
                log(f"   {name} {kname:26s} eager {row['eager_ms']:.3f} ms (incl. input clones {row['clones_ms']:.3f}) "
                    f"fused {row['fused_ms']:.3f} ms")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", choices=["smollm2", "minilm"], default=["smollm2", "minilm"])
    ap.add_argument("--samples", type=int, default=8, help="samples per timed engine run")
    ap.add_argument("--seed-samples", type=int, default=2, help="samples per timed run of the older loop")
    ap.add_argument("--batch", type=int, default=None, help="engine batch (default 16 SmolLM2, 8 MiniLM)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-wait", type=float, default=10.0, help="wait up to this long for a quiet machine per run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", action="store_true", help="per kernel on one block's shapes instead of whole runs")
    ap.add_argument("--calls", type=int, default=50, help="--kernels: alternating calls per kernel")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="i30rev_inductor_"))
    out = bench_kernels(args) if args.kernels else [bench_model(m, args) for m in args.models]
    if args.json:
        write_json({"results": out}, args.json)


if __name__ == "__main__":
    main()
