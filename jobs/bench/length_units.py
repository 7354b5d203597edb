"""Padding saved by units grouped by length (issue 31, ``cluster.group_by_length``; docs/DESIGN.md §4 "Plan").

A unit is computed at the length of its longest sample (the engine re-packs its rows right-padded),
so a unit of n samples costs n × max(len) positions. For each corpus, ``max_seq_len`` and batch size
this plans the run's units both ways — ``plan_units`` with the driver's length key (characters of
the text) and without (consecutive sample_ids, the layout before) — and counts, with the REAL token
lengths of the run's tokenizer (truncated to ``max_seq_len`` as the worker does):

- ``positions``: Σ over units of n × max(len) (what the engine's batched passes compute over);
- ``positions2``: Σ n × max(len)² (the exact maps' cost grows ~S² per sample: S output positions,
  each a pass over S inputs);
- ``useful`` / ``useful2``: Σ len and Σ len² (no padding at all);
- ``makespan``: the finish time of the units handed out one at a time to 16 actors (each to the
  first actor free), a unit costing n × max(len)²: the consecutive layout, the grouped units in key
  order, and grouped longest first (``run.layout.dispatch_order``), as ratios to the consecutive
  layout's and (grouped) to the perfect balance Σ cost / actors.

Reported as grouped / consecutive ratios (lower is better) and the padding fraction of each layout;
``driver``: the driver's seconds for the length key (``layout.text_lengths``: 10,000 shuffled rows
of a 100,000-row JSONL corpus) and ``plan_units``.
Corpora: the bundled corpus (English prose, 1,377 rows of 160–696 characters) and a length-skewed
synthetic corpus (lognormal word counts: most texts short, a long tail), ``--rows`` rows.

    python -m jobs.bench.length_units --json jobs/results/length_units.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from jobs.harness import add_json_arg, log, write_json


def skewed_texts(rows: int, seed: int = 0) -> list[str]:
    """Texts of lognormal word counts (median 20 words, σ = 1.2: a long tail to ~500 words)."""
    rng = np.random.default_rng(seed)
    words = ("river", "stone", "light", "window", "garden", "mountain", "letter", "market", "winter", "lamp",
             "engine", "harbour", "forest", "quiet", "storm", "bridge")
    n = np.clip(np.round(rng.lognormal(np.log(20), 1.2, rows)), 1, 600).astype(int)
    return [" ".join(words[j % len(words)] for j in rng.integers(0, 10**6, k)) + "." for k in n]


def token_lengths(texts: list[str], tokenizer, max_seq_len: int) -> np.ndarray:
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_seq_len)["input_ids"]
    return np.array([min(len(e), max_seq_len) for e in enc], dtype=np.int64)


def cost(units: list[np.ndarray], tokens: np.ndarray) -> dict:
    m = np.array([tokens[u].max() for u in units], dtype=np.float64)
    n = np.array([len(u) for u in units], dtype=np.float64)
    return {"positions": float((n * m).sum()), "positions2": float((n * m * m).sum())}


def makespan(units: list[np.ndarray], tokens: np.ndarray, actors: int) -> float:
    """Finish time of ``units`` handed out in this order to ``actors`` (each unit to the first actor
    free, one unit at a time: Ray Data with one unit per block and one task in flight per actor), a
    unit costing n × max(len)² (the exact maps' cost)."""
    import heapq

    free = [0.0] * actors
    for u in units:
        t = heapq.heappop(free)
        heapq.heappush(free, t + len(u) * float(tokens[u].max()) ** 2)
    return max(free)


def case(name: str, texts: list[str], tokenizer, seq: int, batch: int, actors: int = 16) -> dict:
    from raysens.run.layout import plan_units

    selected = np.arange(len(texts), dtype=np.int64)
    tokens = token_lengths(texts, tokenizer, seq)
    chars = np.array([len(t) for t in texts], dtype=np.int64)
    before = cost(plan_units(selected, batch), tokens)
    after = cost(plan_units(selected, batch, chars), tokens)
    ideal = cost(plan_units(selected, batch, tokens), tokens)  # grouped by the exact token lengths
    grouped = plan_units(selected, batch, chars)
    lpt = sorted(grouped, key=lambda u: (-int(chars[u].max()), int(u[0])))  # run.layout.dispatch_order
    consecutive = plan_units(selected, batch)
    span = {"consecutive": makespan(consecutive, tokens, actors), "grouped_key_order": makespan(grouped, tokens, actors),
            "grouped_longest_first": makespan(lpt, tokens, actors)}
    useful, useful2 = float(tokens.sum()), float((tokens.astype(np.float64) ** 2).sum())
    return {"corpus": name, "rows": len(texts), "max_seq_len": seq, "batch_size": batch,
            "truncated_share": round(float((tokens >= seq).mean()), 3),
            "positions_ratio": round(after["positions"] / before["positions"], 4),
            "positions2_ratio": round(after["positions2"] / before["positions2"], 4),
            "positions_ratio_by_tokens": round(ideal["positions"] / before["positions"], 4),
            "padding_before": round(1 - useful / before["positions"], 4),
            "padding_after": round(1 - useful / after["positions"], 4),
            "padding2_before": round(1 - useful2 / before["positions2"], 4),
            "padding2_after": round(1 - useful2 / after["positions2"], 4),
            "actors": actors, "makespan_ratio": {k: round(v / span["consecutive"], 4) for k, v in span.items()},
            "makespan_over_bound": {k: round(v / (after["positions2"] / actors), 4) for k, v in span.items()
                                    if k != "consecutive"}}


def driver_cost(rows: int, selected: int) -> dict:
    """Seconds the driver spends on the length key: ``layout.text_lengths`` over ``selected`` shuffled
    rows of a ``rows``-row JSONL corpus (written to a temporary directory; its line index is built
    first, as the driver's row count does), then ``plan_units``."""
    import tempfile
    import time
    from pathlib import Path

    from raysens.config import load_config
    from raysens.corpus.reader import Corpus
    from raysens.run.layout import plan_units, text_lengths

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "corpus.jsonl"
        with open(p, "w") as f:
            for _ in range(rows):
                f.write(json.dumps({"text": "word " * int(rng.integers(5, 400))}) + "\n")
        cfg = load_config(None, [f"--data.source={p}", f"--data.limit={selected}", "--data.shuffle=true"])
        corpus = Corpus(cfg.data)
        sel = corpus.select(corpus.num_rows())
        t0 = time.perf_counter()
        lengths = text_lengths(corpus, sel)
        t1 = time.perf_counter()
        plan_units(sel, 32, lengths)
        t2 = time.perf_counter()
    return {"rows": rows, "selected": selected, "text_lengths_s": round(t1 - t0, 3), "plan_units_s": round(t2 - t1, 4)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.length_units", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="whose tokenizer counts the tokens (packaged short name or path)")
    ap.add_argument("--rows", type=int, default=10000, help="rows of the skewed synthetic corpus")
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--driver-rows", type=int, default=100000, help="rows of the JSONL corpus of the driver-cost case")
    ap.add_argument("--driver-selected", type=int, default=10000, help="shuffled rows it selects")
    add_json_arg(ap)
    a = ap.parse_args(argv)
    from raysens.core.models import load_tokenizer_and_config
    from raysens.corpus.reader import bundled_corpus_path

    tok, _ = load_tokenizer_and_config(a.model)
    with open(bundled_corpus_path()) as f:
        corpora = {"bundled": [json.loads(line)["text"] for line in f], "skewed": skewed_texts(a.rows)}
    res = {"model": a.model, "cases": []}
    for name, texts in corpora.items():
        for seq in a.seq:
            for batch in a.batch:
                r = case(name, texts, tok, seq, batch)
                res["cases"].append(r)
                log(json.dumps(r))
    res["driver"] = driver_cost(a.driver_rows, a.driver_selected)
    log(json.dumps({"driver": res["driver"]}))
    write_json(res, a.json)


if __name__ == "__main__":
    main()
