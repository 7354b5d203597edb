"""CPU mode of ``jobs.bench.benchmark``: the seed loop against raysens on real SmolLM2-135M and
MiniLM-L6 (offline model packages), and ``exact`` against a ``torch.func.jacrev`` baseline.

Launched through the dispatcher, from the repository root (raysens installed, ~6-9 min on 2 cores)::

    python -m jobs.bench.benchmark cpu                    # defaults: S=32, 2 timed rounds
    python -m jobs.bench.benchmark cpu --threads 2 --rounds 3 --json jobs/results/benchmark_cpu_2threads.json
    python -m jobs.bench.benchmark cpu --samples 4 --seq-len 32 --rounds 2 --json /tmp/bench_cpu.json

  1. seed loop vs raysens ``hutchinson`` K=1 (same number of VJPs per sample, S), alternating
     runs in one process after a warm-up, on SmolLM2 and MiniLM, target layer -1;
  2. raysens ``exact`` vs a ``torch.func.jacrev`` full-Jacobian baseline on MiniLM at S=16, each in
     its own child process (``jobs.harness.run_child`` of :func:`mem_child`) so that the peak RSS
     (``VmHWM``) belongs to one method only.

Why this module is long: one benchmark mode end to end: its arguments, the seed loop and raysens on
two real models, the jacrev baseline, the child-process memory probe and the summary.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import numpy as np
import torch

from raysens.core.engine import SensitivityConfig, SensitivityEngine

from jobs.harness import log, proc_status_mib, reset_peak_rss, run_child

from .common import (CLEAN, Contention, block_params, chunk_sizes, cpu_seconds, floor_flops, make_inputs,
                     matmul_gflops, quiet_wait, rel_fro, seed_loop, seed_model_copy)


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--samples", type=int, default=None, help="samples per timed run (default 16 SmolLM2, 16 MiniLM)")
    c.add_argument("--batch", type=int, default=None, help="raysens batch size (default 16 SmolLM2, 8 MiniLM; "
                                                          "the engine splits it into cache-sized groups on CPU)")
    c.add_argument("--seq-len", type=int, default=32)
    c.add_argument("--rounds", type=int, default=2, help="timed rounds (alternating seed, raysens)")
    c.add_argument("--models", nargs="*", choices=["smollm2", "minilm"], default=None)
    c.add_argument("--exact-seq-len", type=int, default=16)
    c.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core dev machines: 2)")
    c.add_argument("--skip-exact", action="store_true", help="skip exact-vs-jacrev")
    c.add_argument("--json", default=None, help="write the results here")
    c.add_argument("--max-wait", type=float, default=30.0,
                   help="before each timed run wait up to this many seconds for other processes to go quiet")


# ----------------------------------------------------------------------------- seed loop vs raysens
def bench_model_cpu(name: str, n: int, seq: int, rounds: int, batch: int, layer: int = -1,
                    max_wait: float = 30.0) -> dict:
    from raysens.core.models import load_model

    log(f"\n== {name}: loading ...")
    lm = load_model(name)
    model = lm.model
    engine = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1))
    chunks: list = []  # engine.chunks_used of every timed compute call
    seed_m = seed_model_copy(model)
    n_blk = block_params(engine)
    causal = engine.causal
    ids, am = make_inputs(lm.tokenizer, n, seq)
    wids, wam = make_inputs(lm.tokenizer, 1, seq, offset=97)

    def run_seed(x, m):
        tm = {}
        t, c = time.perf_counter(), cpu_seconds()
        seed_loop(seed_m, x, m, layer, timings=tm)
        tm["total_s"] = time.perf_counter() - t
        tm["cpu_per_sample_s"] = (cpu_seconds() - c) / len(x)
        # the seed converts once per batch of 32: charge 1/32 of a conversion per sample
        tm["per_sample_s"] = tm["loop_s"] / len(x) + tm["convert_s"] / 32
        return tm

    def run_raysens(x, m):
        t, c = time.perf_counter(), cpu_seconds()
        for s in range(0, len(x), batch):
            engine.compute(x[s:s + batch], m[s:s + batch], layers=layer, sample_ids=list(range(s, min(len(x), s + batch))))
            chunks.extend(engine.chunks_used)
        dt = time.perf_counter() - t
        return {"total_s": dt, "per_sample_s": dt / len(x), "cpu_per_sample_s": (cpu_seconds() - c) / len(x)}

    log(f"   warm-up (1 sample each), S={seq}, N_blocks={n_blk / 1e6:.1f}M, causal={causal}")
    quiet_wait(max_wait)
    run_seed(wids, wam)
    run_raysens(wids, wam)
    chunks.clear()
    seed_t, rs_t, cont = [], [], {"seed": [], "raysens": []}
    cpu_t = {"seed": [], "raysens": []}

    def timed(tag: str, run, times: list) -> dict:
        """One timed run after the machine went quiet; records wall, CPU and contention figures."""
        quiet_wait(max_wait)
        with Contention() as c:
            res = run(ids, am)
        times.append(res["per_sample_s"])
        cpu_t[tag].append(res["cpu_per_sample_s"])
        cont[tag].append(c.value)
        res["other_cores"] = c.value
        return res

    for r in range(rounds):
        a = timed("seed", run_seed, seed_t)
        log(f"   round {r + 1}: seed loop {a['per_sample_s']:.3f} s/sample "
            f"(loop {a['loop_s']:.2f}s + convert {a['convert_s']:.2f}s per batch, n={n}; "
            f"CPU {a['cpu_per_sample_s']:.3f} s/sample; other processes: {a['other_cores']:.2f} cores)")
        b = timed("raysens", run_raysens, rs_t)
        log(f"   round {r + 1}: raysens   {b['per_sample_s']:.3f} s/sample (CPU {b['cpu_per_sample_s']:.3f} s/sample; "
            f"other processes: {b['other_cores']:.2f} cores)")
    # correctness of the baseline: seed loop == raysens `projection` on the same bf16-rounded weights
    ref = SensitivityEngine(copy.deepcopy(seed_m).float(), SensitivityConfig(estimator="projection"))
    seed_map = seed_loop(seed_m, ids[:1], am[:1], layer)[0]
    proj_map = ref.compute(ids[:1], am[:1], layers=layer).values[engine.resolve_layers(layer)[0]][0]
    check = rel_fro(seed_map, proj_map)
    del ref
    fl = floor_flops(n_blk, seq, 1, causal)
    # rounds during which other processes kept < CLEAN cores busy; ratios use them when both have one
    clean = [i for i in range(rounds) if max(cont["seed"][i], cont["raysens"][i]) < CLEAN]
    use = clean or list(range(rounds))
    seed_u, rs_u = [seed_t[i] for i in use], [rs_t[i] for i in use]
    s_med, r_med = statistics.median(seed_u), statistics.median(rs_u)
    res = {
        "model": name, "class": lm.info["class"], "seq_len": seq, "samples_per_run": n, "rounds": rounds,
        "raysens_batch": batch, "layer": layer, "causal": causal, "block_params": n_blk,
        "vjps_per_sample": seq, "seed_s_per_sample": seed_t, "raysens_s_per_sample": rs_t,
        "seed_samples_per_s": 1 / s_med, "raysens_samples_per_s": 1 / r_med,
        "ratio_median": s_med / r_med, "ratio_best": min(seed_u) / min(rs_u),
        "clean_rounds": clean,
        "floor_gflop_per_sample": fl / 1e9, "raysens_achieved_gflops": fl / r_med / 1e9,
        "strategy": engine.strategy_used, "segments": engine.segments_for(seq),
        "chunks": chunk_sizes(chunks), "seed_vs_projection_rel_err": check,
        "contention_cores": cont, "cpu_s_per_sample": cpu_t,
        "cpu_ratio_median": statistics.median(cpu_t["seed"]) / statistics.median(cpu_t["raysens"]),
    }
    log(f"   seed loop vs raysens projection (same weights): rel. Frobenius diff {check:.2e}")
    del seed_m, engine, model, lm
    return res


# ----------------------------------------------------------------------------- exact vs jacrev
def jacrev_map(engine: SensitivityEngine, emb, mask, layer: int):
    """The full-Jacobian baseline for one sample: ``torch.func.jacrev`` of the engine's own forward
    (``SensitivityEngine.hidden_states``) from embeddings ``[S, D]`` to hidden states ``[S, H]`` of
    ``layer`` (a resolved index), squared and summed to ``[S_out, S_in]``. Returns (map, Jacobian MiB)."""
    def f(e):
        return engine.hidden_states(e.unsqueeze(0), mask, [layer])[layer][0]

    jac = torch.func.jacrev(f)(emb)  # [S, H, S, D], all S·H cotangents in one vmap
    return jac.pow(2).sum((1, 3)).double().numpy(), jac.numel() * jac.element_size() / 2 ** 20


def mem_child(spec: dict) -> dict:
    """Child-process body (``spec``: method, seq, npy, threads): one method, its time and peak RSS
    (VmHWM) above the post-load level; the map is saved to ``spec["npy"]``."""
    method, seq, out_npy, threads = spec["method"], spec["seq"], spec["npy"], spec.get("threads", 2)
    torch.set_num_threads(threads)
    from raysens.core.models import load_model

    lm = load_model("minilm")
    ids, am = make_inputs(lm.tokenizer, 1, seq)
    engine = SensitivityEngine(lm.model, SensitivityConfig(estimator="exact"))
    L = engine.resolve_layers(-1)[0]
    emb0 = lm.model.get_input_embeddings()(ids).detach()[0]  # [S, D]
    # warm both code paths on a tiny input so that library/JIT allocations are in the baseline
    if method == "exact":
        engine.compute(ids[:, :4], am[:, :4])
    else:
        jacrev_map(engine, emb0[:4], am[:, :4], L)
    import gc

    gc.collect()
    reset_peak_rss()  # the peak-RSS mark (VmHWM): the warm-up's peak does not count
    base = proc_status_mib("VmRSS")
    t, c0 = time.perf_counter(), cpu_seconds()
    if method == "exact":
        a = engine.compute(ids, am, layers=-1).values[L][0]
        extra = {"chunks": chunk_sizes(engine.chunks_used)}
    else:
        a, jac_mb = jacrev_map(engine, emb0, am, L)
        extra = {"jacobian_mb": jac_mb}
    dt, cpu = time.perf_counter() - t, cpu_seconds() - c0
    np.save(out_npy, a)
    return {"method": method, "seq": seq, "time_s": dt, "cpu_s": cpu, "rss_before_mb": base,
            "peak_rss_mb": proc_status_mib("VmHWM"), **extra}


def bench_exact_vs_jacrev(seq: int, max_wait: float = 30.0, threads: int = 2) -> dict:
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory() as d:
        for method in ("jacrev", "exact"):
            log(f"\n== MiniLM exact-vs-jacrev, S={seq}: {method} (own subprocess) ...")
            quiet_wait(max_wait)
            npy = os.path.join(d, f"{method}.npy")
            try:
                res[method] = run_child("jobs.bench.cpu:mem_child",
                                        {"method": method, "seq": seq, "npy": npy, "threads": threads})
            except RuntimeError as e:
                log(str(e))
                res[method] = {"error": str(e).strip().splitlines()[-1]}
                continue
            res[method]["map"] = np.load(npy)
            r = res[method]
            log(f"   {method}: {r['time_s']:.2f} s (CPU {r['cpu_s']:.2f} s), peak RSS {r['peak_rss_mb']:.0f} MiB "
                f"(+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MiB over the loaded model)")
    if "map" in res.get("exact", {}) and "map" in res.get("jacrev", {}):
        res["max_rel_diff"] = float(np.max(np.abs(res["exact"]["map"] - res["jacrev"]["map"]))
                                    / np.max(np.abs(res["jacrev"]["map"])))
        log(f"   exact vs jacrev: max |diff| / max = {res['max_rel_diff']:.2e}")
    for m in ("exact", "jacrev"):
        res.get(m, {}).pop("map", None)
    return res


# ----------------------------------------------------------------------------- the mode
def cpu_main(args) -> dict:
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    quiet_wait(args.max_wait)
    gf = matmul_gflops()
    log(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads={torch.get_num_threads()}, "
        f"fp32 1024² matmul: {gf:.0f} GFLOP/s")
    results = {"mode": "cpu", "torch": torch.__version__, "python": platform.python_version(),
               "cpus": os.cpu_count(), "matmul_gflops": gf, "models": []}
    try:
        import transformers
        results["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    plan = [("smollm2", args.samples or 16, args.batch or 16), ("minilm", args.samples or 16, args.batch or 8)]
    for name, n, batch in plan:
        if args.models and name not in args.models:
            continue
        results["models"].append(bench_model_cpu(name, n, args.seq_len, args.rounds, batch, max_wait=args.max_wait))
    if not args.skip_exact:
        results["exact_vs_jacrev"] = bench_exact_vs_jacrev(args.exact_seq_len, args.max_wait, args.threads)
    results["wall_s"] = time.perf_counter() - t_all
    _summary(results, gf, args.exact_seq_len)
    return results


def _summary(results: dict, gf: float, exact_seq_len: int) -> None:
    targets = {"smollm2": 4.0, "minilm": 2.5}
    log("\n" + "=" * 100)
    log(f"{'model':8s} {'S':>3s} {'seed s/smp':>10s} {'raysens s/smp':>13s} {'ratio med':>9s} {'best':>6s} "
        f"{'target':>6s} {'floor GF':>8s} {'floor s':>7s} {'achieved GF/s':>13s}")
    for r in results["models"]:
        t = targets.get(r["model"], 0)
        log(f"{r['model']:8s} {r['seq_len']:3d} {1 / r['seed_samples_per_s']:10.3f} "
            f"{1 / r['raysens_samples_per_s']:13.3f} {r['ratio_median']:8.2f}x {r['ratio_best']:5.2f}x "
            f"{t:5.1f}x {r['floor_gflop_per_sample']:8.1f} {r['floor_gflop_per_sample'] / gf:7.2f} "
            f"{r['raysens_achieved_gflops']:13.1f}")
        log(f"         samples/s: seed {r['seed_samples_per_s']:.3f}, raysens {r['raysens_samples_per_s']:.3f}; "
            f"strategy {r['strategy']}, segments {len(r['segments'])}, chunks {r['chunks']}")
        log(f"         CPU time per sample (robust to other processes at --threads 1): seed "
            f"{statistics.median(r['cpu_s_per_sample']['seed']):.3f} s, raysens "
            f"{statistics.median(r['cpu_s_per_sample']['raysens']):.3f} s, ratio {r['cpu_ratio_median']:.2f}x")
        log(f"         clean rounds (other processes < {CLEAN} cores in both runs): "
            f"{[i + 1 for i in r['clean_rounds']] or 'none: ratios use all rounds'}")
        log(f"         other processes during the timed runs (cores): seed "
            f"{', '.join(f'{x:.2f}' for x in r['contention_cores']['seed'])}; raysens "
            f"{', '.join(f'{x:.2f}' for x in r['contention_cores']['raysens'])}")
    ej = results.get("exact_vs_jacrev")
    if ej:
        for m in ("exact", "jacrev"):
            r = ej.get(m, {})
            if "time_s" in r:
                log(f"MiniLM S={exact_seq_len} {m:7s}: {r['time_s']:6.2f} s/sample (CPU {r['cpu_s']:.2f} s), peak RSS "
                    f"{r['peak_rss_mb']:.0f} MiB (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MiB)")
            elif r:
                log(f"MiniLM {m}: failed: {r.get('error')}")
    log(f"total wall time {results['wall_s']:.0f} s")
