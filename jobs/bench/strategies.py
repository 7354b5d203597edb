"""Engine strategies side by side: ``manual`` (hand-written stack backward) vs ``vmap`` (autograd,
batched cotangents) on the same inputs, alternating runs in one process, Hutchinson K=1.

Launch from the repository root (by hand, not in CI; also reachable as
``python -m jobs.bench.benchmark strategies ...`` with the same arguments)::

    python -m jobs.bench.strategies                                  # smollm2, minilm, gpt2; S=32
    python -m jobs.bench.strategies --models smollm2 --layers -1 15 --rounds 3 --json /tmp/strat.json
    python -m jobs.bench.strategies --json jobs/results/bench_strategies.json

Models: ``smollm2`` and ``minilm`` are the real offline models; ``gpt2`` is a random-weight
GPT-2-small-shaped model (124 M parameters; no hub download), on random token ids.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from raysens.core.engine import SensitivityConfig, SensitivityEngine

from jobs.harness import log, write_json

from .common import make_inputs


def _model(name: str, n: int, seq: int):
    """(model, input_ids, attention_mask) with ``n`` samples of ``seq`` tokens."""
    if name == "gpt2":
        import transformers as tf

        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(attn_implementation="eager")).eval()
        ids = torch.randint(100, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))
        return model, ids, torch.ones_like(ids)
    from raysens.core.models import load_model

    lm = load_model(name)
    ids, am = make_inputs(lm.tokenizer, n, seq)
    return lm.model, ids, am


def bench(name: str, layers: list[int], n: int, seq: int, batch: int, rounds: int) -> list[dict]:
    model, ids, am = _model(name, n, seq)
    engines = {s: SensitivityEngine(copy.deepcopy(model), SensitivityConfig(strategy=s)) for s in ("vmap", "manual")}
    out = []
    n_layers = engines["manual"].n_layers
    for layer in layers:
        if not -n_layers - 1 <= layer <= n_layers:
            log(f"{name:8s} layer {layer:3d}: skipped (hidden_states 0..{n_layers})")
            continue
        times = {s: [] for s in engines}
        for e in engines.values():
            e.compute(ids[:2], am[:2], layers=layer)  # warm-up
        for _ in range(rounds):
            for s, e in engines.items():
                t = time.perf_counter()
                for b0 in range(0, n, batch):
                    e.compute(ids[b0:b0 + batch], am[b0:b0 + batch], layers=layer)
                times[s].append((time.perf_counter() - t) / n)
        med = {s: statistics.median(v) for s, v in times.items()}
        r = {"model": name, "layer": layer, "seq_len": seq, "samples": n, "batch": batch,
             "s_per_sample": times, "speedup_median": med["vmap"] / med["manual"],
             "segments": {s: len(e.segments_for(seq)) for s, e in engines.items()}}
        log(f"{name:8s} layer {layer:3d}: vmap {med['vmap']:.3f} s/sample, manual {med['manual']:.3f} "
            f"-> {r['speedup_median']:.2f}x (rounds: vmap {', '.join(f'{x:.3f}' for x in times['vmap'])}; "
            f"manual {', '.join(f'{x:.3f}' for x in times['manual'])})")
        out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.strategies", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["smollm2", "minilm", "gpt2"], choices=["smollm2", "minilm", "gpt2"])
    ap.add_argument("--layers", nargs="*", type=int, default=[-1], help="hidden_states indices, each timed separately")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log(f"strategies: torch {torch.__version__}, threads {args.threads}, S={args.seq_len}, "
        f"{args.samples} samples per run, Hutchinson K=1")
    res = []
    for name in args.models:
        res += bench(name, args.layers, args.samples, args.seq_len, args.batch, args.rounds)
    if args.json:
        write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
