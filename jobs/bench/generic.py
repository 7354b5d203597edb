"""The generic path (any Hugging Face model: ``inputs_embeds`` + hooks, autograd ``vmap`` /
``torch.func.jvp``) vs the hand-written path (``manual``, ``raysens/core/stacks``) at equal shapes,
side by side in one process, alternating, every layer, Hutchinson K=1 (issue 19, docs/benchmarks.md).

    python -m jobs.bench.generic                                   # both parts, defaults below
    python -m jobs.bench.generic --parts llama --blocks 30 --modes forward reverse --samples 2
    python -m jobs.bench.generic --parts families --json /tmp/generic.json
    python -m jobs.bench.benchmark generic ...                     # the same, through the dispatcher

Parts: ``llama`` — a random Llama of SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads, 3 KV
heads; ``--blocks`` blocks) run by the hand-written stack and forced to the generic path
(``strategy: vmap``), each mode; the ratio generic / hand-written is the figure (target ≤ 2×).
``families`` — tiny random models of families users commonly bring (Gemma, Phi-3, Qwen3, OLMo-2,
GPT-NeoX) at equal width, depth and MLP FLOPs as a Llama, each on the generic path, against the same
Llama by hand (and forced generic): which family is far slower, and the engine facts that say why
(strategy used, norms switched to the fused backward). Random weights, random token ids, no downloads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raysens.core.engine import SensitivityConfig, SensitivityEngine

from jobs.harness import log, write_json

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)


def _llama(blocks: int, width: dict, vocab: int = 512):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, num_hidden_layers=blocks, max_position_embeddings=256,
                         attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         **width)
    return tf.LlamaForCausalLM(cfg).eval()


def _family(name: str, blocks: int, d: int, inter: int, heads: int, kv: int, vocab: int = 512):
    """A random ``name`` model with Llama's width, depth and MLP FLOPs (GPT-NeoX: an ungated MLP
    1.5× wider has the gated one's 3·d·inter multiply-adds per token)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=blocks, num_attention_heads=heads,
                  max_position_embeddings=256, attn_implementation="eager", pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    llama_like = dict(common, intermediate_size=inter, num_key_value_heads=kv)
    specs = {
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(llama_like, head_dim=d // heads)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", llama_like),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(llama_like, head_dim=d // heads)),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", llama_like),
        "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(common, intermediate_size=3 * inter // 2,
                                                                 rotary_pct=0.25, use_parallel_residual=True)),
    }
    cfg_cls, model_cls, kw = specs[name]
    torch.manual_seed(0)
    return getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw)).eval()


def _ids(n: int, seq: int, vocab: int = 512):
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _alternate(engines: dict, ids, am, rounds: int) -> dict:
    """``{name: [s/sample per round]}`` of every layer, each engine once per round, alternating."""
    times = {k: [] for k in engines}
    info = {}
    for k, e in engines.items():  # warm-up (and the path each one takes)
        res = e.compute(ids[:1, :8], am[:1, :8], layers=list(range(e.n_layers + 1)))
        info[k] = {"strategy": res.strategy, "mode": res.mode, "fused_norms": e.fused_norms}
    for _ in range(rounds):
        for k, e in engines.items():
            t0 = time.perf_counter()
            res = e.compute(ids, am, layers=list(range(e.n_layers + 1)), sample_ids=list(range(len(ids))))
            times[k].append((time.perf_counter() - t0) / len(ids))
            info[k].update(strategy=res.strategy, mode=res.mode)
    return {k: {"s_per_sample": v, "median": statistics.median(v), **info[k]} for k, v in times.items()}


def _cfg(mode: str, strategy: str = "auto") -> SensitivityConfig:
    return SensitivityConfig(estimator="hutchinson", num_probes=1, mode=mode, strategy=strategy)


def bench_llama(args) -> list[dict]:
    model = _llama(args.blocks, SMOLLM2)
    ids, am = _ids(args.samples, args.seq_len)
    out = []
    for mode in args.modes:
        engines = {"hand-written": SensitivityEngine(model, _cfg(mode)),
                   "generic": SensitivityEngine(model, _cfg(mode, "vmap"))}
        r = _alternate(engines, ids, am, args.rounds)
        ratio = r["generic"]["median"] / r["hand-written"]["median"]
        log(f"llama {args.blocks} blocks, {mode}: hand-written {r['hand-written']['median']:.3f} s/sample "
            f"({r['hand-written']['strategy']}), generic {r['generic']['median']:.3f} ({r['generic']['strategy']}) "
            f"-> generic / hand-written {ratio:.2f}x (rounds: hand-written "
            f"{', '.join(f'{x:.3f}' for x in r['hand-written']['s_per_sample'])}; generic "
            f"{', '.join(f'{x:.3f}' for x in r['generic']['s_per_sample'])})")
        out.append({"part": "llama", "blocks": args.blocks, "mode": mode, "seq_len": args.seq_len,
                    "samples": args.samples, "results": r, "generic_over_hand": ratio})
    return out


def bench_families(args) -> list[dict]:
    d, inter, heads, kv, blocks = args.fam_width, args.fam_width * 8 // 3, 4, 2, args.fam_blocks
    width = dict(hidden_size=d, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv)
    llama = _llama(blocks, width)
    ids, am = _ids(args.samples, args.seq_len)
    out = []
    for mode in args.modes:
        engines = {"llama (hand-written)": SensitivityEngine(llama, _cfg(mode)),
                   "llama (generic)": SensitivityEngine(llama, _cfg(mode, "vmap"))}
        for fam in args.families:
            engines[fam] = SensitivityEngine(_family(fam, blocks, d, inter, heads, kv), _cfg(mode))
        r = _alternate(engines, ids, am, args.rounds)
        hand, gen = r["llama (hand-written)"]["median"], r["llama (generic)"]["median"]
        for k, v in r.items():
            v["over_hand_llama"], v["over_generic_llama"] = v["median"] / hand, v["median"] / gen
            log(f"families d={d} {blocks} blocks {mode}: {k:22s} {v['median']:.4f} s/sample ({v['strategy']}, "
                f"fused norms {v['fused_norms']}) -> {v['over_hand_llama']:.2f}x hand-written llama, "
                f"{v['over_generic_llama']:.2f}x generic llama "
                f"(rounds {', '.join(f'{x:.3f}' for x in v['s_per_sample'])})")
        out.append({"part": "families", "width": d, "blocks": blocks, "mode": mode, "seq_len": args.seq_len,
                    "samples": args.samples, "results": r})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.generic", description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="*", default=["llama", "families"], choices=["llama", "families"])
    ap.add_argument("--modes", nargs="*", default=["forward", "reverse"], choices=["forward", "reverse"])
    ap.add_argument("--blocks", type=int, default=30, help="blocks of the SmolLM2-shaped Llama (SmolLM2: 30)")
    ap.add_argument("--families", nargs="*", default=["gemma", "phi3", "qwen3", "olmo2", "gpt-neox"])
    ap.add_argument("--fam-width", type=int, default=192, help="hidden width of the family models")
    ap.add_argument("--fam-blocks", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log(f"generic vs hand-written: torch {torch.__version__}, threads {args.threads}, S={args.seq_len}, "
        f"{args.samples} samples per timed call, every layer, Hutchinson K=1, {args.rounds} rounds")
    res = []
    if "llama" in args.parts:
        res += bench_llama(args)
    if "families" in args.parts:
        res += bench_families(args)
    if args.json:
        write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
