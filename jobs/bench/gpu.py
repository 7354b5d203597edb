"""GPU mode of ``jobs.bench.benchmark``: raysens on a random-weight Qwen2-1.5B-shaped model in each
``SensitivityConfig.precision`` (strict fp32, TF32, bf16) in one call, against the seed loop on 1-2
samples.

No Ray, no raysens install, no network: run from the repository root (``python -m`` puts the working
tree's raysens on the import path); only torch, transformers, numpy and safetensors are needed::

    python -m jobs.bench.benchmark gpu --out $OUT          # writes $OUT/benchmark_gpu.json ($OUT is the default)
    python -m jobs.bench.benchmark gpu --out /tmp/bench --batch 32 --seq-len 64 --seed-samples 2
    python -m jobs.bench.benchmark gpu --strategy vmap --out $OUT      # time the autograd path
    python -m jobs.bench.benchmark gpu --modes "" --out $OUT      # last layer only (skip the all-layer part)
    python -m jobs.bench.benchmark gpu --device cpu --tiny --reps 1 --seed-samples 1 --out /tmp/b   # CPU smoke test

Hutchinson K=1, S=64, batch 32, layer -1, per precision (fp32, tf32, bf16; tf32 skipped on a CPU):
s/sample, peak GPU memory, achieved TFLOP/s against the floor (``jobs.bench.common``), and the seed loop for the ratio. Strategy ``auto`` (= ``manual`` for
this Qwen2 model) is first checked against ``vmap`` on 2 samples; if it fails, ``vmap`` is timed.
Then all layers (``--modes``, default ``forward,reverse,auto``; docs/DESIGN.md §1.10): every layer
1..n in one call per mode, TF32, the modes alternating — target: forward ≤ 0.05 s/sample for all 28
layers of the Qwen2-1.5B shape. The result records the strategy each mode ran (``manual`` = the
hand-written tangent/backward stack after its one-off check, else the generic autograd path).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from raysens.core.engine import SensitivityConfig, SensitivityEngine

from jobs.harness import log

from .common import block_params, chunk_sizes, floor_flops, ray_imported, rel_fro, seed_loop, seed_model_copy


PRECISIONS = ("fp32", "tf32", "bf16")  # timed in this order, one call (SensitivityConfig.precision)


def add_arguments(gp: argparse.ArgumentParser) -> None:
    gp.add_argument("--device", default="cuda")
    gp.add_argument("--tiny", action="store_true", help="small Qwen2 config (smoke test)")
    gp.add_argument("--seq-len", type=int, default=64)
    gp.add_argument("--batch", type=int, default=32)
    gp.add_argument("--reps", type=int, default=2, help="timed batches per precision")
    gp.add_argument("--seed-samples", type=int, default=2)
    gp.add_argument("--memory-budget-mb", type=int, default=30000)
    gp.add_argument("--strategy", default="auto", help="engine strategy (auto = manual for this Qwen2 model)")
    gp.add_argument("--modes", default="forward,reverse,auto",
                    help="all-layer part: comma-separated modes to time (empty: skip it)")
    gp.add_argument("--out", default=os.environ.get("OUT"), help="directory for benchmark_gpu.json (default $OUT)")


def qwen2_config(tiny: bool):
    import transformers

    if tiny:
        kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
    else:  # Qwen2-1.5B shape
        kw = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936)
    return transformers.Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True,
                                    attn_implementation="eager", **kw)


def set_precision(tf32: bool):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def checked_strategy(engine, model, ids, am, dev, budget, info):
    """Before timing: the engine's strategy against ``vmap`` on 2 samples of the benchmark input
    (strict fp32). If it raises or disagrees (> 1e-3 relative), log it and time ``vmap`` instead,
    so that one call on a lent device still yields numbers."""
    if engine.strategy_used == "vmap":
        return engine
    set_precision(False)
    ref = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1, strategy="vmap",
                                                     memory_budget_mb=budget), device=dev)
    try:
        want = ref.compute(ids[:2], am[:2], layers=-1).values
        got = engine.compute(ids[:2], am[:2], layers=-1).values
        err = max(rel_fro(got[L], want[L]) for L in want)
        info["strategy_check"] = {"strategy": engine.strategy_used, "rel_fro_vs_vmap": err}
        log(f"strategy check: {engine.strategy_used} vs vmap on 2 samples, relative Frobenius difference {err:.2e}")
        if err <= 1e-3:
            return engine
        reason = f"differs from vmap by {err:.2e}"
    except Exception as exc:  # noqa: BLE001 - any failure of the new path: report it, time the old one
        reason = f"raised {type(exc).__name__}: {exc}"
    log(f"strategy check FAILED: {engine.strategy_used} {reason}; timing vmap instead")
    info["strategy_check"] = {"strategy": engine.strategy_used, "failed": reason}
    return ref


def gpu_main(args) -> dict:
    import transformers

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("benchmark gpu: CUDA is not available (use --device cpu --tiny for a smoke test)")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t_all = time.perf_counter()
    seq, bsz = args.seq_len, args.batch
    info = {"mode": "gpu", "device": str(dev), "tiny": args.tiny, "torch": torch.__version__,
            "transformers": transformers.__version__, "seq_len": seq, "batch": bsz, "layer": -1,
            "estimator": "hutchinson", "num_probes": 1, "strategy_requested": args.strategy,
            "ray_imported": ray_imported()}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(dev)
    log(f"benchmark gpu: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"device {info.get('gpu', dev)}, ray imported: {info['ray_imported']}")
    cfg = qwen2_config(args.tiny)
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.Qwen2ForCausalLM(cfg)
    model = model.float().eval().requires_grad_(False)
    sync()
    log(f"model built in {time.perf_counter() - t:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params)")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (bsz, seq), generator=g)
    am = torch.ones_like(ids)
    budget = args.memory_budget_mb
    engine = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1, strategy=args.strategy,
                                                        memory_budget_mb=budget), device=dev)
    engine = checked_strategy(engine, model, ids, am, dev, budget, info)
    n_blk = block_params(engine)
    fl = floor_flops(n_blk, seq, 1, engine.causal)
    info.update(block_params=n_blk, floor_tflop_per_sample=fl / 1e12, segments=engine.segments_for(seq))
    log(f"N_blocks = {n_blk / 1e9:.3f} B, floor {fl / 1e12:.2f} TFLOP/sample (causal halved), "
        f"segments {engine.segments_for(seq)}")

    def measure(tag: str):
        """``tag``: the engine's ``precision`` (fp32, tf32, bf16); the same strategy as the checked engine."""
        nonlocal budget
        set_precision(False)  # strict fp32 outside the engine; tf32 is switched on by the engine itself
        eng = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1, precision=tag,
                                                         strategy=engine.strategy_used, memory_budget_mb=budget),
                                device=dev)
        while True:
            chunks: list = []  # engine.chunks_used of every timed batch
            try:
                eng.compute(ids[:max(1, bsz // 8)], am[:max(1, bsz // 8)], layers=-1)  # warm-up
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    eng.compute(ids, am, layers=-1, sample_ids=list(range(bsz)))
                    sync()
                    times.append(time.perf_counter() - t0)
                    chunks.extend(eng.chunks_used)
                break
            except torch.cuda.OutOfMemoryError:
                import gc

                if budget <= 256:
                    raise
                gc.collect()
                budget = max(256, budget // 2)
                log(f"   {tag}: CUDA OOM; retrying with memory_budget_mb={budget}")
                torch.cuda.empty_cache()
                eng = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1, precision=tag,
                                                                 strategy=engine.strategy_used,
                                                                 memory_budget_mb=budget), device=dev)
        best = min(times)
        r = {"s_per_batch": times, "s_per_sample": best / bsz, "memory_budget_mb": budget,
             "chunks": chunk_sizes(chunks), "rows_per_segment": sorted({int(c[0]) for c in chunks}),
             "achieved_tflops": fl * bsz / best / 1e12, "strategy": eng.strategy_used, "precision": tag}
        if cuda:
            r["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        log(f"   {tag}: {r['s_per_sample']:.4f} s/sample (batches {', '.join(f'{x:.2f}' for x in times)} s), "
            f"{r['achieved_tflops']:.1f} TFLOP/s vs floor, peak {r.get('peak_mem_gb', float('nan')):.1f} GiB, "
            f"chunk sizes {r['chunks']} (budget {budget} MB)")
        return r

    for tag in PRECISIONS:  # SensitivityConfig.precision, one engine each (bf16: weight copies made once)
        if tag == "tf32" and not cuda:
            info[tag] = {"skipped": "precision tf32 needs a CUDA device"}
            log("raysens tf32: skipped (CPU)")
            continue
        log(f"raysens {tag} ...")
        info[tag] = measure(tag)

    modes = [m for m in args.modes.split(",") if m]
    if modes:
        info["all_layers"] = measure_modes(model, ids, am, dev, budget, modes, args.reps, fl, sync, cuda)

    log(f"seed loop (strict fp32, as PyTorch defaults), {args.seed_samples} sample(s) ...")
    set_precision(False)
    seed_m = seed_model_copy(model)
    tm = {}
    seed_loop(seed_m, ids[:1], am[:1], -1)  # warm-up (also converts back to bf16)
    seed_loop(seed_m, ids[:args.seed_samples], am[:args.seed_samples], -1, timings=tm)
    seed_ps = tm["loop_s"] / args.seed_samples + tm["convert_s"] / 32
    info["seed"] = {"samples": args.seed_samples, "loop_s": tm["loop_s"], "convert_s": tm["convert_s"],
                    "s_per_sample": seed_ps}
    del seed_m
    for tag in PRECISIONS:
        if "s_per_sample" in info[tag]:
            info["ratio_" + tag] = seed_ps / info[tag]["s_per_sample"]
    info["wall_s"] = time.perf_counter() - t_all
    log(f"   seed loop: {seed_ps:.3f} s/sample (loop {tm['loop_s']:.2f} s, conversions {tm['convert_s']:.2f} s "
        f"charged 1/32 per sample)")
    log("\n" + "=" * 90)
    log(f"{'run':10s} {'s/sample':>9s} {'target':>7s} {'TFLOP/s':>8s} {'peak GiB':>8s} {'ratio vs seed':>13s}")
    for tag, tgt in (("fp32", 0.15), ("tf32", 0.03), ("bf16", float("nan"))):
        r = info[tag]
        if "s_per_sample" not in r:
            continue
        log(f"{'raysens ' + tag:10s} {r['s_per_sample']:9.4f} {tgt:7.2f} {r['achieved_tflops']:8.1f} "
            f"{r.get('peak_mem_gb', float('nan')):8.1f} {info['ratio_' + tag]:12.1f}x")
    log(f"{'seed loop':10s} {seed_ps:9.4f}")
    for m, r in (info.get("all_layers") or {}).get("modes", {}).items():
        log(f"{'all ' + m:10s} {r['s_per_sample']:9.4f} {0.05 if m == 'forward' else float('nan'):7.2f} "
            f"{'':8s} {r.get('peak_mem_gb', float('nan')):8.1f}   ({r['strategy']}, {r['mode']}, TF32, "
            f"{info['all_layers']['layers']} layers)")
    log(f"floor {fl / 1e12:.2f} TFLOP/sample; total wall time {info['wall_s']:.0f} s")
    return info


def measure_modes(model, ids, am, dev, budget, modes, reps, floor_last, sync, cuda) -> dict:
    """Every layer 1..n in one ``compute`` per mode (TF32), the modes alternating ``reps`` times after a
    warm-up each; CUDA OOM halves the memory budget and retries. Forward's floor is one tangent pass
    at the deepest layer (= ``floor_last``); reverse's is Σ_L L/n of it."""
    set_precision(True)
    n = model.config.num_hidden_layers
    layers = list(range(1, n + 1))
    bsz = ids.shape[0]
    out = {"layers": n, "precision": "tf32", "floor_tflop_per_sample": {
        "forward": floor_last / 1e12, "reverse": floor_last * sum(layers) / n / 1e12}, "modes": {}}
    engines, times = {}, {m: [] for m in modes}

    def engine_for(m):
        if m not in engines:
            engines[m] = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1, mode=m,
                                                                    memory_budget_mb=budget), device=dev)
        return engines[m]

    for rep in range(-1, reps):  # rep -1: warm-up on a quarter batch
        for m in modes:
            while True:
                try:
                    x, a = (ids[:max(1, bsz // 4)], am[:max(1, bsz // 4)]) if rep < 0 else (ids, am)
                    if cuda and rep == 0:
                        torch.cuda.reset_peak_memory_stats(dev)
                    sync()
                    t0 = time.perf_counter()
                    res = engine_for(m).compute(x, a, layers=layers, sample_ids=list(range(len(x))))
                    sync()
                    break
                except torch.cuda.OutOfMemoryError:
                    if budget <= 256:
                        raise
                    engines.clear()
                    torch.cuda.empty_cache()
                    budget = max(256, budget // 2)
                    log(f"   all layers {m}: CUDA OOM; retrying with memory_budget_mb={budget}")
            if rep < 0:
                continue
            times[m].append(time.perf_counter() - t0)
            r = out["modes"].setdefault(m, {})
            r.update(mode=res.mode, strategy=res.strategy, s_per_batch=times[m], memory_budget_mb=budget,
                     s_per_sample=min(times[m]) / bsz)
            if cuda:
                r["peak_mem_gb"] = max(r.get("peak_mem_gb", 0.0), torch.cuda.max_memory_allocated(dev) / 2 ** 30)
            log(f"   all {n} layers, mode {m} ({res.mode}, {res.strategy}): {times[m][-1] / bsz:.4f} s/sample")
    if "forward" in out["modes"] and "reverse" in out["modes"]:
        out["ratio_reverse_over_forward"] = out["modes"]["reverse"]["s_per_sample"] / out["modes"]["forward"]["s_per_sample"]
    return out
