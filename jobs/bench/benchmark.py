"""raysens benchmark: the older tool's VJP loop (the "seed loop") against raysens, side by side.

Run by hand, not in CI. Results and their interpretation are recorded in ``BENCHMARKS.md``.

CPU mode (default; real SmolLM2-135M and MiniLM-L6 from the offline model packages, ~6-9 min on 2 cores)::

    . .venv/bin/activate
    python jobs/benchmark.py cpu                         # defaults: S=32, 2 timed rounds
    python jobs/benchmark.py cpu --samples 4 --seq-len 32 --rounds 2 --json /tmp/bench_cpu.json

  1. seed loop vs raysens ``hutchinson`` K=1 (same number of VJPs per sample, S), alternating
     runs in one process after a warm-up, on SmolLM2 and MiniLM, target layer -1;
  2. raysens ``exact`` vs a ``torch.func.jacrev`` full-Jacobian baseline on MiniLM at S=16, each in
     its own subprocess so that the peak RSS (``VmHWM``) belongs to one method only.

Pipeline mode (Ray overhead with 1 actor vs the in-process core; driver memory at 1k/10k samples;
``PIPELINE_BENCHMARKS.md``): ``python jobs/benchmark.py pipeline overhead|memory|all [...]`` runs
``jobs/bench_pipeline.py`` with the same arguments.

Strategies mode (``manual`` vs ``vmap`` on the same inputs, alternating): ``python jobs/benchmark.py
strategies [--models smollm2 minilm gpt2] [--layers -1 15]`` runs ``jobs/bench_strategies.py``.

GPU mode (no Ray, no raysens install, no network: run from the repository root; only torch,
transformers, numpy and safetensors are needed; random-weight Qwen2-1.5B-shaped model)::

    python jobs/benchmark.py gpu                          # writes $OUT/benchmark_gpu.json if $OUT is set
    python jobs/benchmark.py gpu --out /tmp/bench --batch 32 --seq-len 64 --seed-samples 2
    python jobs/benchmark.py gpu --device cpu --tiny      # smoke test of the code path on a CPU

  strict fp32 and TF32, hutchinson K=1, S=64, batch 32, layer -1: s/sample, peak GPU memory,
  achieved TFLOP/s against the floor, and the seed loop on 1-2 samples for the ratio. Strategy
  ``auto`` (= ``manual`` for this Qwen2 model); ``--strategy vmap`` times the autograd path.

FLOP floor (DESIGN.md §1): one VJP back to the embeddings with frozen parameters costs about one
forward, ``2·N·S`` FLOPs (N = parameters of the transformer blocks); K probes at every output
position cost ``2·N·S²·K``, halved for causal models whose output i only runs over its prefix.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # import raysens from the working tree (the GPU machine has no install)
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raysens.engine import SensitivityConfig, SensitivityEngine  # noqa: E402
from raysens.fused import uninstall_fused_norms  # noqa: E402

SENTENCES = [
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp.",
    "Researchers measured how quickly the glacier retreated over the last three decades.",
    "She folded the letter twice and hid it between the pages of a dusty atlas.",
    "A sudden storm forced the fishing boats back into the harbour before noon.",
    "The committee postponed its decision until the final budget figures were available.",
    "Children in the village learned to read by the light of a single oil lamp.",
    "Engineers tested the bridge with heavy trucks before opening it to the public.",
    "The recipe calls for two cups of flour, a pinch of salt and three fresh eggs.",
    "He missed the last train and walked home through the quiet, snow-covered streets.",
    "Migrating birds use the earth's magnetic field to find their way across oceans.",
    "The museum reopened after a long renovation with a new wing for modern art.",
    "Farmers along the river planted rice as soon as the monsoon rains arrived.",
    "Her grandfather repaired clocks in a small shop near the central market.",
    "The telescope revealed thousands of faint galaxies in a tiny patch of sky.",
    "After the concert the orchestra members gathered for dinner at a nearby cafe.",
    "Volunteers cleaned the beach and collected more than two tons of plastic waste.",
]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- the seed loop
def seed_loop(model, input_ids, attention_mask, target_layer, *, timings: dict | None = None):
    """Faithful re-implementation of the older tool's per-batch loop (its projection estimator).

    As in the seed document's "Batched Processing Flow" and "VJP-Based Computation":
    the model is stored in bfloat16 and converted to float32 once per batch; for each sample:
    embeddings of that sample alone, a forward of the *whole* model (``*ForCausalLM`` including its
    LM head / ``AutoModel`` including its pooler) with ``output_hidden_states=True``, then one
    ``torch.autograd.grad`` per output position with the cotangent ``v[i, :] = 1/√H`` (zeros
    elsewhere), collecting the squared norms ``‖vᵀ J_ij‖²`` over the embedding width; after the
    batch the model is converted back to bfloat16 (and on CUDA the cache emptied every 8 samples,
    as the seed did). S VJPs per sample, each over the full sequence.

    ``model`` is modified in place (fp32 during the call, bf16 after). Returns a list of ``[S, S]``
    float32 arrays (one per sample, S = its unpadded length). ``timings`` (if given) receives
    ``convert_s`` (both dtype conversions) and ``loop_s``.
    """
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    model = model.float()  # 1. bf16 -> fp32, once per batch
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.eval()
    maps = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep].unsqueeze(0).to(dev)  # [1, S]
        am = torch.ones_like(ids)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # a. [1, S, D]
        out = model(inputs_embeds=embeds, attention_mask=am, output_hidden_states=True)  # b.
        hidden = out.hidden_states[target_layer]  # [1, S, H]
        s, h = hidden.shape[1], hidden.shape[2]
        norms = torch.zeros(s, s, device=dev)
        for i in range(s):  # c. one VJP per output position
            v = torch.zeros_like(hidden)
            v[0, i, :] = 1.0 / math.sqrt(h)
            g = torch.autograd.grad(outputs=hidden, inputs=embeds, grad_outputs=v, retain_graph=True)[0]
            norms[i] = g[0].pow(2).sum(-1)
        maps.append(norms.float().cpu().numpy())
        del out, hidden, embeds
        if cuda and (b + 1) % 8 == 0:
            torch.cuda.empty_cache()
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    model.to(torch.bfloat16)  # 3. back to bf16 after the batch
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    t3 = time.perf_counter()
    if timings is not None:
        timings["convert_s"] = (t1 - t0) + (t3 - t2)
        timings["loop_s"] = t2 - t1
    return maps


def seed_model_copy(model):
    """bf16 copy of ``model`` as the older tool held it (its default attention implementation)."""
    m = copy.deepcopy(model).to(torch.bfloat16)
    uninstall_fused_norms(m)  # the seed ran Hugging Face's own modules (an engine may have switched them)
    try:  # HF's default for these architectures is SDPA; the older tool did not switch to eager
        m.set_attn_implementation("sdpa")
    except Exception:  # pragma: no cover - architecture without SDPA
        pass
    return m.eval()


# ----------------------------------------------------------------------------- helpers
def block_params(engine: SensitivityEngine) -> int:
    """N for the FLOP floor: parameters of the transformer blocks (what every VJP multiplies through)."""
    return sum(p.numel() for p in engine.blocks.parameters())


def floor_flops(n_params: int, seq: int, k: int, causal: bool) -> float:
    """≈2·N·S²·K FLOPs per sample (S·K VJPs of 2·N·S each), halved for causal models."""
    f = 2.0 * n_params * seq * seq * k
    return f / 2 if causal else f


def matmul_gflops(device="cpu", n=1024, reps=20) -> float:
    """Achievable fp32 matmul rate on this machine (GFLOP/s, best of 5 timings), for reading times
    against the floor."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best / 1e9


def make_inputs(tok, n: int, seq: int, offset: int = 0):
    """``n`` samples of exactly ``seq`` tokens: windows over the repeated sentence list."""
    text = " ".join(SENTENCES)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    while len(ids) < seq * 4 + n + offset:
        ids = ids + ids
    rows = []
    for r in range(n):
        start = ((offset + r) * 7) % (len(ids) - seq)
        rows.append(ids[start:start + seq])
    x = torch.tensor(rows, dtype=torch.long)
    return x, torch.ones_like(x)


def chunk_recorder(engine: SensitivityEngine) -> list:
    """Record the chunk sizes the engine picks (wraps the instance's ``_chunk``)."""
    seen: list = []
    orig = engine._chunk

    def rec(n_rows, per_row_bytes):
        c = orig(n_rows, per_row_bytes)
        seen.append((int(n_rows), int(c), int(per_row_bytes)))
        return c

    engine._chunk = rec
    return seen


def rel_fro(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _proc_busy() -> tuple[float, float]:
    """(seconds of busy CPU time of the whole machine, of this process) so far (Linux; zeros elsewhere)."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(x) for i, x in enumerate(f[:8]) if i not in (3, 4)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0, 0.0
    t = os.times()
    return busy, t.user + t.system


class Contention:
    """Average number of cores other processes kept busy while the block ran (2-core machines are shared)."""

    def __enter__(self):
        self.t, (self.b, self.o) = time.perf_counter(), _proc_busy()
        return self

    def __exit__(self, *exc):
        b, o = _proc_busy()
        self.value = max(0.0, ((b - self.b) - (o - self.o)) / max(time.perf_counter() - self.t, 1e-9))


CLEAN = 0.2  # a timed round counts as clean when other processes used fewer cores than this


def quiet_wait(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (≤ max_wait_s) until other processes use < ``threshold`` cores over 1 s; return the last level."""
    t0 = time.perf_counter()
    while True:
        with Contention() as c:
            time.sleep(1.0)
        if c.value < threshold or time.perf_counter() - t0 >= max_wait_s:
            return c.value


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def ray_imported() -> bool:
    return "ray" in sys.modules


# ----------------------------------------------------------------------------- CPU mode
def bench_model_cpu(name: str, n: int, seq: int, rounds: int, batch: int, layer: int = -1,
                    max_wait: float = 30.0) -> dict:
    from raysens.models import load_model

    log(f"\n== {name}: loading ...")
    lm = load_model(name)
    model = lm.model
    engine = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1))
    chunks = chunk_recorder(engine)
    seed_m = seed_model_copy(model)
    n_blk = block_params(engine)
    causal = engine.causal
    ids, am = make_inputs(lm.tokenizer, n, seq)
    wids, wam = make_inputs(lm.tokenizer, 1, seq, offset=97)

    def run_seed(x, m):
        tm = {}
        t, c = time.perf_counter(), _cpu_s()
        seed_loop(seed_m, x, m, layer, timings=tm)
        tm["total_s"] = time.perf_counter() - t
        tm["cpu_per_sample_s"] = (_cpu_s() - c) / len(x)
        # the seed converts once per batch of 32: charge 1/32 of a conversion per sample
        tm["per_sample_s"] = tm["loop_s"] / len(x) + tm["convert_s"] / 32
        return tm

    def run_raysens(x, m):
        t, c = time.perf_counter(), _cpu_s()
        for s in range(0, len(x), batch):
            engine.compute(x[s:s + batch], m[s:s + batch], layers=layer, sample_ids=list(range(s, min(len(x), s + batch))))
        dt = time.perf_counter() - t
        return {"total_s": dt, "per_sample_s": dt / len(x), "cpu_per_sample_s": (_cpu_s() - c) / len(x)}

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
        "chunks": sorted({c[1] for c in chunks}), "seed_vs_projection_rel_err": check,
        "contention_cores": cont, "cpu_s_per_sample": cpu_t,
        "cpu_ratio_median": statistics.median(cpu_t["seed"]) / statistics.median(cpu_t["raysens"]),
    }
    log(f"   seed loop vs raysens projection (same weights): rel. Frobenius diff {check:.2e}")
    del seed_m, engine, model, lm
    return res


def _mem_child(method: str, seq: int, out_npy: str, threads: int = 2) -> None:
    """Subprocess body: one method, report time and peak RSS (VmHWM) above the post-load level."""
    torch.set_num_threads(threads)
    from raysens.models import load_model

    lm = load_model("minilm")
    ids, am = make_inputs(lm.tokenizer, 1, seq)
    engine = SensitivityEngine(lm.model, SensitivityConfig(estimator="exact"))
    L = engine.resolve_layers(-1)[0]
    emb0 = lm.model.get_input_embeddings()(ids).detach()[0]  # [S, D]

    def f(e):  # [S, D] -> [S, H]: the same differentiated function as the engine's
        return engine._forward(e.unsqueeze(0), am, (L,))[L][0]

    # warm both code paths on a tiny input so that library/JIT allocations are in the baseline
    if method == "exact":
        engine.compute(ids[:, :4], am[:, :4])
    else:
        torch.func.jacrev(lambda e: engine._forward(e.unsqueeze(0), am[:, :4], (L,))[L][0])(emb0[:4])
    import gc

    gc.collect()
    try:  # reset the peak-RSS mark (VmHWM) so that the warm-up's peak does not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _vm("VmRSS")
    t, c0 = time.perf_counter(), _cpu_s()
    if method == "exact":
        chunks = chunk_recorder(engine)
        a = engine.compute(ids, am, layers=-1).values[L][0]
        extra = {"chunks": sorted({c[1] for c in chunks})}
    else:
        jac = torch.func.jacrev(f)(emb0)  # [S, H, S, D], all S·H cotangents in one vmap
        a = jac.pow(2).sum((1, 3)).double().numpy()
        extra = {"jacobian_mb": jac.numel() * 4 / 2 ** 20}
        del jac
    dt, cpu = time.perf_counter() - t, _cpu_s() - c0
    np.save(out_npy, a)
    print(json.dumps({"method": method, "seq": seq, "time_s": dt, "cpu_s": cpu, "rss_before_mb": base,
                      "peak_rss_mb": _vm("VmHWM"), **extra}))


def _vm(key: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux); ru_maxrss as a fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_exact_vs_jacrev(seq: int, max_wait: float = 30.0, threads: int = 2) -> dict:
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory() as d:
        for method in ("jacrev", "exact"):
            log(f"\n== MiniLM exact-vs-jacrev, S={seq}: {method} (own subprocess) ...")
            quiet_wait(max_wait)
            npy = os.path.join(d, f"{method}.npy")
            p = subprocess.run([sys.executable, __file__, "_mem", method, "--seq-len", str(seq), "--npy", npy,
                                "--threads", str(threads)],
                               capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                log(p.stderr[-3000:])
                res[method] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
                continue
            res[method] = json.loads(p.stdout.strip().splitlines()[-1])
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
                log(f"MiniLM S={args.exact_seq_len} {m:7s}: {r['time_s']:6.2f} s/sample (CPU {r['cpu_s']:.2f} s), peak RSS "
                    f"{r['peak_rss_mb']:.0f} MiB (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MiB)")
            elif r:
                log(f"MiniLM {m}: failed: {r.get('error')}")
    log(f"total wall time {results['wall_s']:.0f} s")
    return results


# ----------------------------------------------------------------------------- GPU mode
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


def _checked_strategy(engine, model, ids, am, dev, budget, info):
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


def set_precision(tf32: bool):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


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
    engine = _checked_strategy(engine, model, ids, am, dev, budget, info)
    n_blk = block_params(engine)
    fl = floor_flops(n_blk, seq, 1, engine.causal)
    info.update(block_params=n_blk, floor_tflop_per_sample=fl / 1e12, segments=engine.segments_for(seq))
    log(f"N_blocks = {n_blk / 1e9:.3f} B, floor {fl / 1e12:.2f} TFLOP/sample (causal halved), "
        f"segments {engine.segments_for(seq)}")

    def measure(tag: str, tf32: bool):
        nonlocal engine, budget
        set_precision(tf32)
        while True:
            chunks = chunk_recorder(engine)
            try:
                engine.compute(ids[:max(1, bsz // 8)], am[:max(1, bsz // 8)], layers=-1)  # warm-up
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                chunks.clear()
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    engine.compute(ids, am, layers=-1, sample_ids=list(range(bsz)))
                    sync()
                    times.append(time.perf_counter() - t0)
                break
            except torch.cuda.OutOfMemoryError:
                import gc

                if budget <= 256:
                    raise
                gc.collect()
                budget = max(256, budget // 2)
                log(f"   {tag}: CUDA OOM; retrying with memory_budget_mb={budget}")
                torch.cuda.empty_cache()
                engine = SensitivityEngine(model, SensitivityConfig(estimator="hutchinson", num_probes=1,
                                                                    strategy=engine.strategy_used,
                                                                    memory_budget_mb=budget), device=dev)
        best = min(times)
        r = {"s_per_batch": times, "s_per_sample": best / bsz, "memory_budget_mb": budget,
             "chunks": sorted({c[1] for c in chunks}), "rows_per_segment": sorted({c[0] for c in chunks}),
             "achieved_tflops": fl * bsz / best / 1e12, "strategy": engine.strategy_used}
        if cuda:
            r["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        log(f"   {tag}: {r['s_per_sample']:.4f} s/sample (batches {', '.join(f'{x:.2f}' for x in times)} s), "
            f"{r['achieved_tflops']:.1f} TFLOP/s vs floor, peak {r.get('peak_mem_gb', float('nan')):.1f} GiB, "
            f"chunk sizes {r['chunks']} (budget {budget} MB)")
        return r

    log("raysens strict fp32 ...")
    info["fp32"] = measure("fp32", False)
    log("raysens TF32 ...")
    info["tf32"] = measure("tf32", True)

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
    info["ratio_fp32"] = seed_ps / info["fp32"]["s_per_sample"]
    info["ratio_tf32"] = seed_ps / info["tf32"]["s_per_sample"]
    info["wall_s"] = time.perf_counter() - t_all
    log(f"   seed loop: {seed_ps:.3f} s/sample (loop {tm['loop_s']:.2f} s, conversions {tm['convert_s']:.2f} s "
        f"charged 1/32 per sample)")
    log("\n" + "=" * 90)
    log(f"{'run':10s} {'s/sample':>9s} {'target':>7s} {'TFLOP/s':>8s} {'peak GiB':>8s} {'ratio vs seed':>13s}")
    for tag, tgt in (("fp32", 0.15), ("tf32", 0.03)):
        r = info[tag]
        log(f"{'raysens ' + tag:10s} {r['s_per_sample']:9.4f} {tgt:7.2f} {r['achieved_tflops']:8.1f} "
            f"{r.get('peak_mem_gb', float('nan')):8.1f} {info['ratio_' + tag]:12.1f}x")
    log(f"{'seed loop':10s} {seed_ps:9.4f}")
    log(f"floor {fl / 1e12:.2f} TFLOP/sample; total wall time {info['wall_s']:.0f} s")
    return info


# ----------------------------------------------------------------------------- entry point
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pipeline"]:  # the distributed pipeline's benchmarks live in bench_pipeline.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_pipeline

        return bench_pipeline.main(argv[1:])
    if argv[:1] == ["strategies"]:  # manual vs vmap: bench_strategies.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_strategies

        return bench_strategies.main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode")
    c = sub.add_parser("cpu", help="seed loop vs raysens on SmolLM2 and MiniLM; exact vs jacrev")
    sub.add_parser("pipeline", help="the distributed pipeline: see jobs/bench_pipeline.py (arguments passed on)")
    sub.add_parser("strategies", help="manual vs vmap engine strategies: see jobs/bench_strategies.py")
    c.add_argument("--samples", type=int, default=None, help="samples per timed run (default 16 SmolLM2, 16 MiniLM)")
    c.add_argument("--batch", type=int, default=None, help="raysens batch size (default 16 SmolLM2, 8 MiniLM; the engine splits it into cache-sized groups on CPU)")
    c.add_argument("--seq-len", type=int, default=32)
    c.add_argument("--rounds", type=int, default=2, help="timed rounds (alternating seed, raysens)")
    c.add_argument("--models", nargs="*", choices=["smollm2", "minilm"], default=None)
    c.add_argument("--exact-seq-len", type=int, default=16)
    c.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core dev machines: 2)")
    c.add_argument("--skip-exact", action="store_true", help="skip exact-vs-jacrev")
    c.add_argument("--json", default=None, help="write the results here")
    c.add_argument("--max-wait", type=float, default=30.0,
                   help="before each timed run wait up to this many seconds for other processes to go quiet")
    gp = sub.add_parser("gpu", help="random-weight Qwen2-1.5B shape, strict fp32 and TF32")
    gp.add_argument("--device", default="cuda")
    gp.add_argument("--tiny", action="store_true", help="small Qwen2 config (smoke test)")
    gp.add_argument("--seq-len", type=int, default=64)
    gp.add_argument("--batch", type=int, default=32)
    gp.add_argument("--reps", type=int, default=2, help="timed batches per precision")
    gp.add_argument("--seed-samples", type=int, default=2)
    gp.add_argument("--memory-budget-mb", type=int, default=30000)
    gp.add_argument("--strategy", default="auto", help="engine strategy (auto = manual for this Qwen2 model)")
    gp.add_argument("--out", default=os.environ.get("OUT"), help="directory for benchmark_gpu.json (default $OUT)")
    m = sub.add_parser("_mem")  # internal: one method of exact-vs-jacrev in its own process
    m.add_argument("method", choices=["exact", "jacrev"])
    m.add_argument("--seq-len", type=int, default=16)
    m.add_argument("--npy", required=True)
    m.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.mode in (None, "cpu"):
        if args.mode is None:
            args = ap.parse_args(["cpu"] + argv)
        res = cpu_main(args)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
            log(f"wrote {args.json}")
    elif args.mode == "gpu":
        res = gpu_main(args)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "benchmark_gpu.json").write_text(json.dumps(res, indent=1, default=str))
            log(f"wrote {out / 'benchmark_gpu.json'}")
    else:
        _mem_child(args.method, args.seq_len, args.npy, args.threads)


if __name__ == "__main__":
    main()
