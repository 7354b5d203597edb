"""Engine helpers shared by the benchmarks in ``jobs/bench/`` and the experiments in ``jobs/experiments/``
(not launched itself; logging, JSON, RSS and child processes are in ``jobs.harness``): the benchmark
sentences and inputs, relative errors, the FLOP floor, timing under contention, and the older tool's
VJP loop (the "seed loop") that the CPU and GPU modes of ``jobs.bench.benchmark`` compare against.

Imports torch and numpy at the top and ``raysens.core`` only inside the functions that need it (no
Ray), so that the GPU mode runs on a machine with torch, transformers, numpy and safetensors and the
working tree (``python -m jobs.bench.benchmark gpu`` from the repository root), and a child measuring
another checkout (``jobs.harness.run_child``) imports this module whatever that tree's layout.

FLOP floor (docs/DESIGN.md §1.7): one VJP back to the embeddings with frozen parameters costs about one
forward, ``2·N·S`` FLOPs (N = parameters of the transformer blocks); K probes at every output
position cost ``2·N·S²·K``, halved for causal models whose output i only runs over its prefix.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from raysens.core.engine import SensitivityEngine

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


# ----------------------------------------------------------------------------- either core layout
def core_module(new: str, old: str):
    """``raysens.core.<new>`` (the split core, e.g. ``"passes.fused"``), or ``raysens.core.<old>`` (the flat
    core before issue 28, e.g. ``"fused"``) in a tree without it: a child measuring a baseline tree
    (``--baseline-tree``) imports its modules through this whatever that tree's layout. Only a missing
    ``raysens.core.<new>`` (or a package on its path) falls back; any other import error is raised."""
    import importlib

    want = f"raysens.core.{new}"
    try:
        return importlib.import_module(want)
    except ModuleNotFoundError as exc:
        if not exc.name or not (want == exc.name or want.startswith(exc.name + ".")):
            raise
        return importlib.import_module(f"raysens.core.{old}")


# ----------------------------------------------------------------------------- inputs and errors
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


def engine(model, **cfg) -> SensitivityEngine:
    """A ``SensitivityEngine`` of ``model`` with ``SensitivityConfig(**cfg)``."""
    from raysens.core.engine import SensitivityConfig, SensitivityEngine

    return SensitivityEngine(model, SensitivityConfig(**cfg))


def rel_fro(a, b) -> float:
    """``‖a − b‖_F / ‖b‖_F`` over all entries (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def rel_fro_per_sample(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-sample ``‖est − ref‖_F / ‖ref‖_F`` over the trailing ``[S, S]`` axes."""
    return np.linalg.norm(est - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))


def chunk_sizes(chunks) -> list[int]:
    """Distinct chunk sizes in ``(n_rows, chunk, per_row_bytes)`` records (``SensitivityEngine.chunks_used``)."""
    return sorted({int(c[1]) for c in chunks})


# ----------------------------------------------------------------------------- FLOP floor
def block_params(engine: SensitivityEngine) -> int:
    """N for the FLOP floor: parameters of the transformer blocks (what every VJP multiplies through)."""
    return sum(p.numel() for p in engine.blocks.parameters())


def forward_floor(engine: SensitivityEngine, seq: int) -> float:
    """FLOPs per sample of forward mode at K=1 over every layer: ``N·S(S+1)`` causal, ``2·N·S²`` else."""
    n = block_params(engine)
    return n * (seq * (seq + 1) if engine.causal else 2 * seq * seq)


def forward_child(spec: dict):
    """A forward-mode benchmark child's inputs (``spec``: model, samples, seq_len, threads optional):
    the loaded model, its layers ``0..n`` and ``spec["samples"]`` sentences of ``seq_len`` tokens."""
    from raysens.core.models import load_model

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    lm = load_model(spec["model"])
    ids, am = make_inputs(lm.tokenizer, spec["samples"], spec["seq_len"])
    return lm, list(range(lm.model.config.num_hidden_layers + 1)), ids, am


def alternate_rounds(engines: dict, ids, am, layers, rounds: int) -> tuple[dict, list, dict]:
    """``rounds`` rounds of each engine's ``compute`` on all of ``ids`` in turn, a 2048² matmul after
    each round: (s/sample per engine name, matmul GFLOP/s per round, each engine's last mean maps
    ``{layer: [S, S]}``)."""
    times: dict = {name: [] for name in engines}
    mm, maps = [], {}
    for _ in range(rounds):
        for name, e in engines.items():
            t0 = time.perf_counter()
            r = e.compute(ids, am, layers=layers, sample_ids=list(range(len(ids))))
            times[name].append((time.perf_counter() - t0) / len(ids))
            maps[name] = {L: r.values[L].mean(0) for L in layers}
        mm.append(matmul_gflops(n=2048, reps=5))
    return times, mm, maps


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


# ----------------------------------------------------------------------------- timing on a shared machine
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    t = os.times()
    return t.user + t.system


def ray_imported() -> bool:
    return "ray" in sys.modules


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
    uninstall_fused_norms = core_module("passes.fused", "fused").uninstall_fused_norms

    m = copy.deepcopy(model).to(torch.bfloat16)
    uninstall_fused_norms(m)  # the seed ran Hugging Face's own modules (an engine may have switched them)
    try:  # HF's default for these architectures is SDPA; the older tool did not switch to eager
        m.set_attn_implementation("sdpa")
    except Exception:  # pragma: no cover - architecture without SDPA
        pass
    return m.eval()
